// Launchers of the CUDA kernels of the head-affine op (head_affine_kernels.cu).
//
// Raw pointers and strides only, so that the kernels' translation unit does not parse ATen (nvcc compiles
// every .cu once per GPU architecture). head_affine_cuda.cu does the checks, allocation and the cuBLAS GEMMs
// through ATen and calls these. Every launcher runs on `stream`, checks the launch, and accepts any row and
// column strides: it takes 16-byte vector loads when the pointers, strides and head_dim allow them and falls
// back to scalar accesses otherwise.
//
// Conventions: C = H * d columns, selected heads `heads` int64 [K] (sorted, unique, in [0, H): asserted on
// the device by every kernel that reads them, and by head_slots), KD = K * d selected columns, A and v [K, d]
// contiguous in the accumulation type (float32, float64 for float64 inputs), `acc` buffers in the accumulation
// type.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lofit {
namespace cuda_kernels {

enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// The fused decode GEMV handles at most this many rows of x.
constexpr int kDecodeMaxRows = 16;

struct Matrix {  // a 2-D view: element (r, c) at ptr + r * s0 + c * s1 (in elements)
  const void* ptr;
  int64_t s0, s1;
};

// Index math inside the kernels is 32-bit along a row: every launcher requires C = H * d, K * d and D_out to be
// at most kMaxIndex (row offsets, r * stride, stay 64-bit, so N is not limited).
constexpr int64_t kMaxIndex = (int64_t(1) << 31) - 1;

// slots [H] int32 = k for heads[k], -1 for every other head: the head -> slot table the forward kernels take
// instead of searching `heads` per element. One single-block kernel; it also checks the heads (device assert).
void head_slots(const int64_t* heads, int64_t K, int64_t H, int32_t* slots, cudaStream_t stream);

// out [N, C] contiguous = x with the selected heads' columns replaced by (1 + A) * x + v (A or v may be null);
// slots from head_slots (an entry outside [0, K) counts as unselected).
void materialize(DType t, Matrix x, void* out, int64_t N, int64_t C, const int32_t* slots, int64_t K, int64_t d,
                 const void* A, const void* v, cudaStream_t stream);

// out [N, K*d] contiguous: out[n, k*d + j] = x[n, heads[k]*d + j] * A[k, j]   (the thin-GEMM operand).
void gather_scale(DType t, Matrix x, void* out, int64_t N, int64_t C, const int64_t* heads, int64_t K, int64_t d,
                  const void* A, cudaStream_t stream);

// The constant row v W_S^T folded into the bias, accumulated in the accumulation type:
//   f[o] = bias[o] + sum_{k,j} W[o, heads[k]*d + j] * v[k, j]      (bias may be null)
// written to out_acc [D_out] (accumulation type) and/or out_x [D_out] (x's dtype, f rounded once); either may
// be null.
void bias_row(DType t, Matrix w, const void* bias, int64_t bias_stride, void* out_acc, void* out_x, int64_t D_out,
              int64_t C, const int64_t* heads, int64_t K, int64_t d, const void* v, cudaStream_t stream);

// Whether decode_gemv can run on these operands (dtype, row count, 16-byte aligned rows of W, head_dim).
bool decode_gemv_supported(DType t, int64_t N, Matrix w, int64_t C, int64_t d);

// y [N, D_out] contiguous = x' W^T + bias, x' = x with (1 + A) * x + v on the selected heads, in one kernel:
// each block stages x' in shared memory (the affine applied while loading) and streams its rows of W once, the
// next iteration's packs of W loaded while the current ones are used (two register buffers).
// bias_acc, when given, is a float32 [D_out] bias added in float32 before y's one rounding (the folded
// b + v W_S^T of bias_row: pass v = null then); otherwise `bias` (x's dtype, may be null) is added.
void decode_gemv(DType t, Matrix x, Matrix w, const void* bias, int64_t bias_stride, const float* bias_acc, void* y,
                 int64_t N, int64_t C, int64_t D_out, const int32_t* slots, int64_t K, int64_t d, const void* A,
                 const void* v, cudaStream_t stream);

// One pass over the R rows of g for the K selected heads (the backward's head-restricted work):
//   dv[k, j] = sum_r w_r g[r, col],   dA[k, j] = sum_r g[r, col] * xs[r, k*d + j],
//   and, when scale is given, g[r, col] *= 1 + scale[k, j] in place (g becomes dx),
// where col = heads[k]*d + j (or k*d + j when heads is null: g holds only the selected columns) and
// w_r = row_weight[r] (1 when null). dA / dv may be null. Float accumulation; a two-level reduction:
// per-block partial sums for a fixed split of the rows, then one deterministic pass over the partials.
// `workspace` must hold head_reduce_workspace_elems(...) accumulation-type elements.
int64_t head_reduce_workspace_elems(int64_t R, int64_t K, int64_t d, int parts);
void head_reduce(DType t, void* g, int64_t g_s0, int64_t g_s1, int64_t R, int64_t C, const int64_t* heads, int64_t K,
                 int64_t d, Matrix xs, const void* row_weight, const void* scale, void* dA, void* dv, void* workspace,
                 cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace lofit
