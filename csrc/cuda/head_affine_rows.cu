// CUDA per-row tables (many adapters in one batch): row n uses adapter a = row_ids[n] (-1 = none) of
// A, v [n_adapters, K, d]:  y[n] = x[n] W^T + (x_S[n] * A[a]) W_S^T + off[a] + b,  off = v W_S^T [n_adapters, D_out].
//
// Paths:
//   forward, N <= 16:  rows_decode_gemv_kernel, one fused GEMV that reads each row's table: the block stages its
//                      rows' x' (x with x_S scaled by that row's 1 + A[a], rounded once to x's dtype) in shared
//                      memory, streams W once for all of them, and adds the row's float32 offset row off[a] and the
//                      bias to the float32 dot products before y's single rounding.
//   forward, N > 16:   cuBLAS GEMM with the bias, the thin GEMM over the gathered t = x_S * A[rid] (a gather of
//                      the rows' table entries, then one GEMM for all rows), and off[rid] added per row.
//   backward:          g = dy W (cuBLAS); dv, dA are segmented sums of g_S and g_S * x_S over each adapter's rows
//                      (index_add), and dx's selected columns are scaled by each row's 1 + A[rid].
// The offset rows (and W_S) are prepared once per parameter version by lofit_fast/ops/cuda_backend.py and passed
// as the op's optional arguments; the op computes them itself when they are not given (compiled graphs).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>

#include "../lofit.h"

namespace lofit {

namespace {

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half(v);
}

constexpr int kDecodeMaxRows = 16;
constexpr int kRowsPerBlock = 4;
constexpr int kThreads = 256;

// grid: (ceil(D_out / (kThreads / 32 * OUT_PER_WARP)), ceil(N / ROWS)); block: kThreads.
// Shared memory (dynamic): ROWS * C elements of x' in x's dtype. slots: int32 [H], head -> k or -1.
template <typename T, int ROWS, int OUT_PER_WARP>
__global__ void __launch_bounds__(kThreads) rows_decode_gemv_kernel(
    const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw, const T* __restrict__ bias,
    const int* __restrict__ slots, const float* __restrict__ A, const float* __restrict__ off,
    const int64_t* __restrict__ row_ids, T* __restrict__ y, int64_t ldy, int N, int C, int D_out, int KD,
    int head_dim, int n_adapters) {
  extern __shared__ unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int row0 = blockIdx.y * ROWS;
  int64_t rid[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int n = row0 + r;
    int64_t a = n < N ? row_ids[n] : -1;
    // Out-of-range ids are a device-side assert, like torch's own index ops (no host sync).
    if (a < -1 || a >= n_adapters) __trap();
    rid[r] = a;
  }
  // Stage x' for the block's rows: x with each row's selected columns scaled by its 1 + A[a].
  for (int r = 0; r < ROWS; ++r) {
    const int n = row0 + r;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      T val = from_f<T>(0.0f);
      if (n < N) {
        val = x[static_cast<int64_t>(n) * ldx + c];
        if (A != nullptr && rid[r] >= 0) {
          const int k = slots[c / head_dim];
          if (k >= 0) {
            const float s = 1.0f + A[rid[r] * KD + static_cast<int64_t>(k) * head_dim + c % head_dim];
            val = from_f<T>(to_f(val) * s);
          }
        }
      }
      xs[r * C + c] = val;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int o_base = (blockIdx.x * (kThreads / 32) + warp) * OUT_PER_WARP;
#pragma unroll
  for (int oi = 0; oi < OUT_PER_WARP; ++oi) {
    const int o = o_base + oi;
    if (o >= D_out) break;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    const T* wrow = w + static_cast<int64_t>(o) * ldw;
    for (int c = lane; c < C; c += 32) {
      const float wv = to_f(wrow[c]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[r] += wv * to_f(xs[r * C + c]);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], s);
    }
    if (lane == 0) {
      const float b = bias != nullptr ? to_f(bias[o]) : 0.0f;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int n = row0 + r;
        if (n >= N) continue;
        float val = acc[r] + b;
        if (off != nullptr && rid[r] >= 0) val += off[rid[r] * D_out + o];
        y[static_cast<int64_t>(n) * ldy + o] = from_f<T>(val);
      }
    }
  }
}

constexpr int kOutPerWarp = 4;

template <typename T>
void launch_decode(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& slots,
                   const at::Tensor& A32, const at::Tensor& off, const at::Tensor& row_ids, at::Tensor& y,
                   int64_t head_dim, int64_t n_adapters) {
  const int N = x.size(0), C = x.size(1), D_out = weight.size(0);
  const int KD = A32.defined() ? A32.size(1) * A32.size(2) : 0;
  const dim3 grid((D_out + (kThreads / 32) * kOutPerWarp - 1) / ((kThreads / 32) * kOutPerWarp),
                  (N + kRowsPerBlock - 1) / kRowsPerBlock);
  const size_t smem = static_cast<size_t>(kRowsPerBlock) * C * sizeof(T);
  auto kernel = rows_decode_gemv_kernel<T, kRowsPerBlock, kOutPerWarp>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), reinterpret_cast<const T*>(weight.data_ptr()),
      weight.stride(0), bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr,
      slots.data_ptr<int>(), A32.defined() ? A32.data_ptr<float>() : nullptr,
      off.defined() ? off.data_ptr<float>() : nullptr, row_ids.data_ptr<int64_t>(), reinterpret_cast<T*>(y.data_ptr()),
      y.stride(0), N, C, D_out, KD, static_cast<int>(head_dim), static_cast<int>(n_adapters));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor extended(const at::Tensor& t, int64_t width) {
  auto flat = t.reshape({-1, width});
  return at::cat({at::zeros({1, width}, flat.options()), flat}, 0);
}

}  // namespace

at::Tensor rows_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight, const OptTensor& bias,
                             const at::Tensor& heads, const OptTensor& A, const OptTensor& v, const at::Tensor& row_ids,
                             int64_t head_dim, const OptTensor& weight_sel, const OptTensor& offset_table) {
  const int64_t n_adapters = A.has_value() ? A->size(0) : (v.has_value() ? v->size(0) : 0);
  check_rows_inputs(x_in, weight, bias, heads, A, v, row_ids, head_dim, n_adapters);
  TORCH_CHECK(x_in.is_cuda(), "rows_forward_cuda needs CUDA tensors, x is on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = (x_in.stride(1) == 1) ? x_in : x_in.contiguous();
  const int64_t N = x.size(0), K = heads.size(0), C = x.size(1), d = head_dim, KD = K * d, D_out = weight.size(0);
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (K == 0 || n_adapters == 0 || N == 0) return at::linear(x, weight, b);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w_sel = weight_sel.has_value() ? *weight_sel : weight.index_select(1, selected_columns(heads, d));
  at::Tensor off;
  if (v.has_value()) {
    off = offset_table.has_value() ? offset_table->contiguous()
                                   : at::mm(v->to(acc).reshape({n_adapters, KD}), w_sel.to(acc).t()).contiguous();
    TORCH_CHECK(off.size(0) == n_adapters && off.size(1) == D_out && off.scalar_type() == acc,
                "offset_table must be [", n_adapters, ", ", D_out, "] ", acc, ", got ", off.sizes());
  }
  const at::Tensor ids = row_ids.contiguous();
  const bool fused_decode = N <= kDecodeMaxRows && x.scalar_type() != at::kDouble && weight.stride(1) == 1;
  if (fused_decode) {
    const int64_t H = C / d;
    auto slots = at::full({H}, -1, heads.options().dtype(at::kInt));
    slots.index_copy_(0, heads, at::arange(K, heads.options().dtype(at::kInt)));
    const at::Tensor A32 = A.has_value() ? A->to(at::kFloat).contiguous() : at::Tensor();
    auto y = at::empty({N, D_out}, x.options());
    const at::Tensor bc = b.defined() ? b.contiguous() : b;
    switch (x.scalar_type()) {
      case at::kFloat:
        launch_decode<float>(x, weight, bc, slots, A32, off, ids, y, d, n_adapters);
        break;
      case at::kHalf:
        launch_decode<__half>(x, weight, bc, slots, A32, off, ids, y, d, n_adapters);
        break;
      case at::kBFloat16:
        launch_decode<__nv_bfloat16>(x, weight, bc, slots, A32, off, ids, y, d, n_adapters);
        break;
      default:
        TORCH_CHECK(false, "rows decode GEMV: unsupported dtype ", x.scalar_type());
    }
    return y;
  }
  auto y = at::linear(x, weight, b);
  const auto idx = ids + 1;
  if (A.has_value()) {
    auto t = (x.index_select(1, selected_columns(heads, d)).to(acc) * extended(A->to(acc), KD).index_select(0, idx))
                 .to(x.scalar_type());
    y.addmm_(t, w_sel.t());
  }
  if (v.has_value()) y.add_(extended(off, D_out).index_select(0, idx).to(y.scalar_type()));
  return y;
}

Grads rows_backward_cuda(const at::Tensor& dy_in, const OptTensor& x_sel, const at::Tensor& weight,
                         const at::Tensor& heads, const OptTensor& A, const at::Tensor& row_ids, int64_t head_dim,
                         int64_t n_adapters, bool need_dx, bool need_dA, bool need_dv, const OptTensor& weight_sel) {
  TORCH_CHECK(dy_in.is_cuda(), "rows_backward_cuda needs CUDA tensors, dy is on ", dy_in.device());
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(1) == weight.size(0), "dy must be [N, ", weight.size(0), "], got ",
              dy_in.sizes());
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.scalar_type() == at::kLong && row_ids.size(0) == dy_in.size(0),
              "row_ids must be int64 [", dy_in.size(0), "]");
  if (need_dA) TORCH_CHECK(x_sel.has_value(), "x_sel is required for the gradient of A");
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t K = heads.size(0), d = head_dim, KD = K * d;
  const auto acc = acc_type(dy.scalar_type());
  const auto idx = row_ids + 1;
  const at::Tensor cols = selected_columns(heads, d);
  OptTensor dx, dA_out, dv_out;
  at::Tensor g_sel;
  if (need_dx) {
    auto g = at::mm(dy, weight);
    g_sel = g.index_select(1, cols);
    if (A.has_value() && K > 0)
      g.index_copy_(1, cols, (g_sel.to(acc) * (1 + extended(A->to(acc), KD).index_select(0, idx))).to(g.scalar_type()));
    dx = g;
  } else if (need_dA || need_dv) {
    g_sel = at::mm(dy, weight_sel.has_value() ? *weight_sel : weight.index_select(1, cols));
  }
  auto segment = [&](const at::Tensor& t) {
    auto out = at::zeros({n_adapters + 1, KD}, t.options().dtype(acc));
    out.index_add_(0, idx, t.to(acc));
    return out.narrow(0, 1, n_adapters).reshape({n_adapters, K, d});
  };
  if (need_dA) dA_out = segment(g_sel.to(acc) * x_sel->to(acc));
  if (need_dv) dv_out = segment(g_sel);
  return {dx, dA_out, dv_out};
}

}  // namespace lofit
