// CUDA kernels of the head-affine op: the LoFiT-specific work around cuBLAS's GEMMs, and the fused decode GEMV.
// Declarations and conventions: head_affine_kernels.cuh. Only CUDA and c10 macro headers here (no ATen), so
// this file compiles quickly for every architecture.
#include <c10/cuda/CUDAException.h>  // C10_CUDA_KERNEL_LAUNCH_CHECK
#include <c10/macros/Macros.h>        // CUDA_KERNEL_ASSERT_MSG
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "head_affine_kernels.cuh"

namespace lofit {
namespace cuda_kernels {

namespace {

// ---------------------------------------------------------------------------------------------------------
// Types: accumulation in float32 (float64 for float64 inputs), 16-byte packs of elements.

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Cast;
template <>
struct Cast<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct Cast<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct Cast<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cast<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T e[V];
};

// V consecutive elements at p (V > 1: p is 16-byte aligned and contiguous), or V = 1 element. kReadOnly: the
// memory is not written while the kernel runs, so the read-only (non-coherent) data path may serve it.
template <typename T, int V, bool kReadOnly = true>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  Pack<T, V> r;
  if constexpr (V * sizeof(T) == 16) {
    const uint4 u = kReadOnly ? __ldg(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
    memcpy(&r, &u, sizeof(r));
  } else {
    static_assert(V == 1, "packs are 16 bytes or one element");
    r.e[0] = p[0];
  }
  return r;
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> zero_pack() {
  Pack<T, V> r;
  memset(&r, 0, sizeof(r));
  return r;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Heads: validated on the device (the host never reads them: no synchronization, CUDA-graph safe), and every
// access stays in bounds even for invalid values.

__device__ __forceinline__ void check_heads(const int64_t* heads, int K, int H) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x, nthreads = blockDim.x * blockDim.y;
  for (int k = tid; k < K; k += nthreads) {
    const int64_t h = heads[k];
    CUDA_KERNEL_ASSERT_MSG(h >= 0 && h < H, "lofit_fast: a head index is out of range [0, num_heads)");
    CUDA_KERNEL_ASSERT_MSG(k == 0 || h > heads[k - 1], "lofit_fast: heads must be sorted and unique");
  }
}

// Unsigned 32-bit division by a divisor fixed at launch: a multiply-high, an add and a shift instead of the
// ~20-instruction integer division (the method of PyTorch's IntDivider: n and the divisor below 2^31).
struct DivMod32 {
  uint32_t divisor, magic, shift;

  static DivMod32 make(int64_t d) {
    DivMod32 r{static_cast<uint32_t>(d), 0, 0};
    while (r.shift < 32 && (uint64_t(1) << r.shift) < uint64_t(d)) ++r.shift;
    r.magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << r.shift) - uint64_t(d))) / uint64_t(d) + 1);
    return r;
  }
  __device__ __forceinline__ int div(int n) const {
    const uint32_t t = __umulhi(static_cast<uint32_t>(n), magic);
    return static_cast<int>((t + static_cast<uint32_t>(n)) >> shift);
  }
};

// (1 + A) * x + v on V consecutive columns whose parameters start at A[j0], v[j0].
template <typename T, int V>
__device__ __forceinline__ void apply_affine(Pack<T, V>& p, const acc_t<T>* A, const acc_t<T>* v, int j0) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    acc_t<T> val = to_acc(p.e[e]);
    if (A) val = val * (acc_t<T>(1) + A[j0 + e]);
    if (v) val = val + v[j0 + e];
    p.e[e] = Cast<T>::from(val);
  }
}

// Index of the first parameter of column c (its slot * d + its offset in the head), or -1 when c's head is not
// selected. c lies in [0, C).
__device__ __forceinline__ int param_index(const int32_t* __restrict__ slots, int K, int d, DivMod32 div_d, int c) {
  const int h = div_d.div(c);
  const int k = __ldg(slots + h);
  return (k >= 0 && k < K) ? k * d + (c - h * d) : -1;
}

// ---------------------------------------------------------------------------------------------------------
// Launch helpers.

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev] = std::max(n, 1);
  }
  return cached[dev];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Rows of m can be read as 16-byte packs of V elements starting at any column that is a multiple of V.
bool rows_vectorizable(const Matrix& m, int64_t rows, int V) {
  return aligned16(m.ptr) && m.s1 == 1 && (rows <= 1 || m.s0 % V == 0);
}

void check_index_range(int64_t n, const char* what) {
  TORCH_CHECK(n >= 0 && n <= kMaxIndex, "lofit_fast CUDA kernels: ", what, " = ", n,
              " does not fit the kernels' 32-bit index math (at most 2^31 - 1)");
}

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

// Blocks of (tx, ty) threads over a [rows, cols] grid of packs: tx consecutive packs of ty rows each, tx a power
// of two no wider than needed (narrow rows still fill the block), at most ~8 blocks per SM in all; the kernels
// loop over what the grid does not cover.
struct Grid2D {
  dim3 grid, block;
};

Grid2D rows_grid(int64_t rows, int64_t cols) {
  int tx = 1;
  while (tx < kThreads && tx < cols) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t gx = ceil_div(std::max<int64_t>(cols, 1), tx);
  const int64_t budget = std::max<int64_t>(1, int64_t(sm_count()) * 8 / std::max<int64_t>(gx, 1));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({ceil_div(std::max<int64_t>(rows, 1), ty), budget,
                                                             int64_t(kMaxGridY)}));
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(tx, ty)};
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      f(Tag<float>{});
      break;
    case DType::kFloat16:
      f(Tag<__half>{});
      break;
    case DType::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    case DType::kFloat64:
      f(Tag<double>{});
      break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The head -> slot table.

__global__ void __launch_bounds__(kThreads)
    head_slots_kernel(const int64_t* __restrict__ heads, int K, int H, int32_t* __restrict__ slots) {
  check_heads(heads, K, H);
  for (int h = threadIdx.x; h < H; h += blockDim.x) slots[h] = -1;
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t h = heads[k];
    if (h >= 0 && h < H) slots[h] = k;  // invalid heads tripped the assert above; stay in bounds regardless
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward, large N: the operands around cuBLAS's GEMMs. A thread owns one pack column (its slot looked up once)
// and walks rows; threadIdx.x runs over consecutive packs, so each row's accesses are coalesced.

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    materialize_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1, T* __restrict__ out, int64_t N, int C,
                       const int32_t* __restrict__ slots, int K, int d, DivMod32 div_d,
                       const acc_t<T>* __restrict__ A, const acc_t<T>* __restrict__ v) {
  const int Cv = C / V;
  for (int cv = blockIdx.x * blockDim.x + threadIdx.x; cv < Cv; cv += gridDim.x * blockDim.x) {
    const int c = cv * V;
    const int q = param_index(slots, K, d, div_d, c);  // packs never straddle heads: V divides d
    for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N; n += int64_t(gridDim.y) * blockDim.y) {
      Pack<T, V> p;
      if constexpr (V == 1) {
        p.e[0] = x[n * sx0 + int64_t(c) * sx1];
      } else {
        p = load<T, V>(x + n * sx0 + c);
      }
      if (q >= 0) apply_affine<T, V>(p, A, v, q);
      store<T, V>(out + n * C + c, p);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gather_scale_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1, T* __restrict__ out, int64_t N, int C,
                        const int64_t* __restrict__ heads, int K, int d, DivMod32 div_d,
                        const acc_t<T>* __restrict__ A) {
  const int H = C / d;
  if (blockIdx.x == 0 && blockIdx.y == 0) check_heads(heads, K, H);
  const int KD = K * d, KDv = KD / V;
  for (int qv = blockIdx.x * blockDim.x + threadIdx.x; qv < KDv; qv += gridDim.x * blockDim.x) {
    const int q = qv * V, k = div_d.div(q), j = q - k * d;
    const int64_t h = heads[k];
    const bool valid = h >= 0 && h < H;
    const int col = valid ? int(h) * d + j : 0;
    acc_t<T> a[V];
#pragma unroll
    for (int e = 0; e < V; ++e) a[e] = A[q + e];
    for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N; n += int64_t(gridDim.y) * blockDim.y) {
      Pack<T, V> p = zero_pack<T, V>();
      if (valid) {
        if constexpr (V == 1) {
          p.e[0] = x[n * sx0 + int64_t(col) * sx1];
        } else {
          p = load<T, V>(x + n * sx0 + col);
        }
#pragma unroll
        for (int e = 0; e < V; ++e) p.e[e] = Cast<T>::from(to_acc(p.e[e]) * a[e]);
      }
      store<T, V>(out + n * KD + q, p);
    }
  }
}

// One warp per output row: f[o] = bias[o] + W[o, S] . v, in the accumulation type; written to out_acc and/or
// (rounded once) to out_x.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    bias_row_kernel(const T* __restrict__ w, int64_t ws0, int64_t ws1, const T* __restrict__ bias, int64_t bstride,
                    acc_t<T>* __restrict__ out_acc, T* __restrict__ out_x, int D_out, int C,
                    const int64_t* __restrict__ heads, int K, int d, DivMod32 div_d,
                    const acc_t<T>* __restrict__ v) {
  const int H = C / d;
  if (blockIdx.x == 0) check_heads(heads, K, H);
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  if (o >= D_out) return;
  const int KD = K * d;
  const T* wrow = w + int64_t(o) * ws0;
  acc_t<T> acc = 0;
  for (int q = lane * V; q < KD; q += 32 * V) {
    const int k = div_d.div(q), j = q - k * d;
    const int64_t h = heads[k];
    if (h < 0 || h >= H) continue;
    const int col = int(h) * d + j;
    Pack<T, V> p;
    if constexpr (V == 1) {
      p.e[0] = wrow[int64_t(col) * ws1];
    } else {
      p = load<T, V>(wrow + col);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) acc += to_acc(p.e[e]) * v[q + e];
  }
  acc = warp_sum(acc);
  if (lane == 0) {
    const acc_t<T> f = acc + (bias ? to_acc(bias[int64_t(o) * bstride]) : acc_t<T>(0));
    if (out_acc) out_acc[o] = f;
    if (out_x) out_x[o] = Cast<T>::from(f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward, decode: the fused GEMV.
//
// Block = WARPS warps; warp w owns ROWS consecutive rows of W. For each chunk of columns the block stages
// x'[0:N, chunk] in shared memory (the head affine applied while loading: the prologue), then every lane
// streams 16-byte packs of its ROWS rows of W and accumulates ROWS x N dot products in float32 registers.
// One iteration of the main loop uses 2 * ROWS packs of W per lane (columns cv and cv + 32 of each row); they
// are double-buffered in registers: iteration i + 1's packs are loaded (into `nxt`) before iteration i's are
// used (from `cur`), including across a chunk boundary, where the next chunk's first packs are in flight while
// its x' is staged. So every lane keeps 2 * ROWS packs in flight while it computes, and 4 * ROWS right after a
// load: the grid has only D_out / 16 blocks (2 per SM at 7B shapes), and without the prefetch HBM would idle
// while a warp computes. NB >= N bounds the register tile; rows n >= N are skipped (uniform branch). W is read
// exactly once: the kernel is bound by HBM bandwidth for small N.

constexpr int kSmemBytes = 48 * 1024;  // the default dynamic shared memory limit: no opt-in needed

template <int NB>
struct GemvShape {
  static constexpr int rows = NB >= 16 ? 2 : 4;   // rows of W per warp (register tile ROWS x NB)
  static constexpr int warps = NB >= 16 ? 8 : 4;  // 16 rows of W per block either way
};

// One main-loop iteration covers 64 packs of a chunk; the loop is unrolled by two (the register ping-pong).
constexpr int kGemvPacksPerIter = 64;

// Columns of x' staged per chunk: all of x when N rows fit in the shared memory budget, otherwise as many as fit,
// rounded down to a multiple of 2 * kGemvPacksPerIter packs, so that every chunk but the last has an even
// number of main-loop iterations (the next chunk's first packs then land in the first register buffer).
template <typename T>
int64_t gemv_chunk_cols(int64_t C, int64_t N) {
  constexpr int V = kVec<T>;
  constexpr int64_t kStep = 2 * kGemvPacksPerIter * V;
  static_assert(kSmemBytes / (kDecodeMaxRows * int64_t(sizeof(T))) >= kStep, "a chunk must hold two iterations");
  const int64_t fit = kSmemBytes / (N * int64_t(sizeof(T)));
  return C <= fit ? C : fit / kStep * kStep;
}

// The decode GEMV keeps its packs of W as raw 16-byte words (uint4): a predicated load or a zero is then four
// 32-bit moves, where a struct of eight 16-bit elements costs a byte permute (PRMT) per element.
// raw_to_float converts from the 32-bit words: a shift or a mask per bfloat16, one conversion per float16 pair.
template <typename T, int V>
__device__ __forceinline__ void raw_to_float(const uint4& raw, float (&f)[V]) {
  static_assert(V * sizeof(T) == 16, "16-byte packs");
  const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h2;
      memcpy(&h2, &u[i], sizeof(h2));
      const float2 f2 = __half22float2(h2);
      f[2 * i] = f2.x;
      f[2 * i + 1] = f2.y;
    }
  } else {
    static_assert(std::is_same_v<T, float>, "the decode GEMV takes float32, bfloat16, float16");
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(u[i]);
  }
}

template <typename T, int NB, int ROWS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
    decode_gemv_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1, bool x_vec, const T* __restrict__ w,
                       int64_t ldw, const T* __restrict__ bias, int64_t bstride, const float* __restrict__ bias_acc,
                       T* __restrict__ y, int N, int C, int D_out, const int32_t* __restrict__ slots, int K, int d,
                       DivMod32 div_d, const float* __restrict__ A, const float* __restrict__ v, int chunk_cols) {
  constexpr int V = kVec<T>;
  using P = Pack<T, V>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [N][chunk_cols]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * WARPS + warp) * ROWS;
  const T* wrow = w + int64_t(row0) * ldw;

  float acc[ROWS][NB];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int n = 0; n < NB; ++n) acc[r][n] = 0.f;
  }

  // The packs of W of one main-loop iteration: rows row0 .. row0+ROWS-1, packs cv and cv + 32 of the chunk at
  // column c0 (zeros past the chunk or past D_out).
  auto load_w = [&](uint4 (&buf)[2][ROWS], int c0, int ccv, int cv) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int cu = cv + 32 * u;
        buf[u][r] = (row0 + r < D_out && cu < ccv)
                        ? __ldg(reinterpret_cast<const uint4*>(wrow + r * ldw + c0 + cu * V))
                        : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  auto compute = [&](const uint4 (&buf)[2][ROWS], int ccv, int cv) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int cu = cv + 32 * u;
      if (cu >= ccv) break;
      float wf[ROWS][V];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) raw_to_float<T, V>(buf[u][r], wf[r]);
#pragma unroll
      for (int n = 0; n < NB; ++n) {
        if (n < N) {
          float xf[V];
          raw_to_float<T, V>(*reinterpret_cast<const uint4*>(xs + n * chunk_cols + cu * V), xf);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float xv = xf[e];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r][n] = fmaf(wf[r][e], xv, acc[r][n]);
          }
        }
      }
    }
  };
  const int nchunks = (C - 1) / chunk_cols + 1;  // C >= 1; no overflow near 2^31
  auto chunk_packs = [&](int c0) { return (C - c0 < chunk_cols ? C - c0 : chunk_cols) / V; };

  // Two register buffers, used alternately (static indices only: no copies, no local memory).
  uint4 wa[2][ROWS], wb[2][ROWS];
  // The first iteration's loads are issued before the first prologue, so HBM is busy while x' is staged.
  load_w(wa, 0, chunk_packs(0), lane);

  for (int ch = 0; ch < nchunks; ++ch) {
    const int c0 = ch * chunk_cols, ccv = chunk_packs(c0);
    const int iters = (ccv + kGemvPacksPerIter - 1) / kGemvPacksPerIter;  // the same for every lane
    // Loads iteration `it` of this chunk into buf; it == iters means the next chunk's first iteration.
    auto prefetch = [&](uint4 (&buf)[2][ROWS], int it) {
      if (it < iters) {
        load_w(buf, c0, ccv, lane + kGemvPacksPerIter * it);
      } else if (ch + 1 < nchunks) {
        const int c1 = c0 + chunk_cols;
        load_w(buf, c1, chunk_packs(c1), lane);
      }
    };

    // Prologue: x' for this chunk into shared memory.
    __syncthreads();  // the previous chunk has been consumed
    for (int n = 0; n < N; ++n) {
      for (int cv = threadIdx.x; cv < ccv; cv += WARPS * 32) {
        const int c = c0 + cv * V;
        P p;
        if (x_vec) {
          p = load<T, V>(x + n * sx0 + c);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) p.e[e] = x[n * sx0 + int64_t(c + e) * sx1];
        }
        const int q = (A || v) ? param_index(slots, K, d, div_d, c) : -1;
        if (q >= 0) apply_affine<T, V>(p, A, v, q);
        store<T, V>(xs + n * chunk_cols + cv * V, p);
      }
    }
    __syncthreads();

    // Main loop: stream W one iteration ahead. wa holds iteration `it` on entry: every chunk but the last has an
    // even trip count (gemv_chunk_cols), so the next chunk's first iteration is always prefetched into wa.
#pragma unroll 1
    for (int it = 0; it < iters; it += 2) {
      prefetch(wb, it + 1);
      compute(wa, ccv, lane + kGemvPacksPerIter * it);
      if (it + 1 >= iters) break;  // an odd trip count: the last chunk only
      prefetch(wa, it + 2);
      compute(wb, ccv, lane + kGemvPacksPerIter * (it + 1));
    }
  }

  // Epilogue: reduce each dot product across the warp, add the bias, write y.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    float b = 0.f;
    if (row < D_out) {
      if (bias_acc) {
        b = bias_acc[row];
      } else if (bias) {
        b = to_acc(bias[int64_t(row) * bstride]);
      }
    }
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      if (n < N) {
        const float s = warp_sum(acc[r][n]);
        if (lane == 0 && row < D_out) y[int64_t(n) * D_out + row] = Cast<T>::from(s + b);
      }
    }
  }
}

template <typename T, int NB>
void launch_decode_gemv(Matrix x, Matrix w, const void* bias, int64_t bstride, const float* bias_acc, void* y,
                        int64_t N, int64_t C, int64_t D_out, const int32_t* slots, int64_t K, int64_t d,
                        const void* A, const void* v, cudaStream_t stream) {
  constexpr int ROWS = GemvShape<NB>::rows, WARPS = GemvShape<NB>::warps, V = kVec<T>;
  const int64_t chunk_cols = gemv_chunk_cols<T>(C, N);
  const size_t smem = size_t(N) * chunk_cols * sizeof(T);
  const dim3 grid(static_cast<unsigned>(ceil_div(D_out, int64_t(ROWS) * WARPS)));
  const bool x_vec = rows_vectorizable(x, N, V);
  decode_gemv_kernel<T, NB, ROWS, WARPS><<<grid, WARPS * 32, smem, stream>>>(
      static_cast<const T*>(x.ptr), x.s0, x.s1, x_vec, static_cast<const T*>(w.ptr), w.s0,
      static_cast<const T*>(bias), bstride, bias_acc, static_cast<T*>(y), static_cast<int>(N), static_cast<int>(C),
      static_cast<int>(D_out), slots, static_cast<int>(K), static_cast<int>(d), DivMod32::make(d),
      static_cast<const float*>(A), static_cast<const float*>(v), static_cast<int>(chunk_cols));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------
// Backward: the head-restricted reductions.
//
// Block = 32 x 8 threads. threadIdx.x walks 32 consecutive packs of the selected columns (coalesced: the
// selected columns are runs of d contiguous columns), threadIdx.y walks the block's chunk of rows with stride
// 8. Each thread accumulates in registers, the block reduces over threadIdx.y in shared memory and writes one
// partial row per chunk; finish_partials_kernel sums the chunks in a fixed order (deterministic, no atomics).

constexpr int kReduceTX = 32, kReduceTY = 8;
constexpr int64_t kMinRowsPerChunk = 32;

template <typename T, int V>
__global__ void __launch_bounds__(kReduceTX * kReduceTY)
    head_reduce_kernel(T* __restrict__ g, int64_t gs0, int64_t gs1, int64_t R, int H,
                       const int64_t* __restrict__ heads, int K, int d, const T* __restrict__ xs, int64_t xs0,
                       int64_t xs1, const acc_t<T>* __restrict__ row_weight, const acc_t<T>* __restrict__ scale,
                       acc_t<T>* __restrict__ part_dA, acc_t<T>* __restrict__ part_dv, int64_t rows_per_chunk) {
  using Acc = acc_t<T>;
  if (heads && blockIdx.x == 0 && blockIdx.y == 0) check_heads(heads, K, H);
  const int KD = K * d;
  const int q = (blockIdx.x * kReduceTX + threadIdx.x) * V;  // first selected column of this thread
  bool active = q < KD;
  int64_t gcol = 0;
  if (active) {  // once per thread: a plain division
    const int k = q / d, j = q - k * d;
    const int64_t h = heads ? heads[k] : k;
    active = !heads || (h >= 0 && h < H);
    gcol = h * d + j;
  }
  Acc sum_A[V], sum_v[V], s[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    sum_A[e] = sum_v[e] = 0;
    s[e] = (active && scale) ? Acc(1) + scale[q + e] : Acc(1);
  }
  if (active) {
    const int64_t chunk_end = (int64_t(blockIdx.y) + 1) * rows_per_chunk;
    const int64_t r_end = chunk_end < R ? chunk_end : R;
#pragma unroll 4
    for (int64_t r = int64_t(blockIdx.y) * rows_per_chunk + threadIdx.y; r < r_end; r += kReduceTY) {
      T* gp = g + r * gs0 + gcol * gs1;
      Pack<T, V> gv;
      Pack<T, V> xv;
      if constexpr (V == 1) {
        gv.e[0] = gp[0];
        if (part_dA) xv.e[0] = xs[r * xs0 + int64_t(q) * xs1];
      } else {
        gv = load<T, V, /*kReadOnly=*/false>(gp);  // g is scaled in place
        if (part_dA) xv = load<T, V>(xs + r * xs0 + q);
      }
      const Acc wr = row_weight ? row_weight[r] : Acc(1);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const Acc gval = to_acc(gv.e[e]);
        if (part_dv) sum_v[e] += wr * gval;
        if (part_dA) sum_A[e] += gval * to_acc(xv.e[e]);
        if (scale) gv.e[e] = Cast<T>::from(gval * s[e]);
      }
      if (scale) {
        if constexpr (V == 1) {
          gp[0] = gv.e[0];
        } else {
          store<T, V>(gp, gv);
        }
      }
    }
  }

  __shared__ Acc red[2][V][kReduceTY][kReduceTX];  // [e][y][x]: conflict-free for consecutive threadIdx.x
#pragma unroll
  for (int e = 0; e < V; ++e) {
    red[0][e][threadIdx.y][threadIdx.x] = sum_A[e];
    red[1][e][threadIdx.y][threadIdx.x] = sum_v[e];
  }
  __syncthreads();
  if (threadIdx.y == 0 && q < KD) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      Acc a = 0, b = 0;
#pragma unroll
      for (int y = 0; y < kReduceTY; ++y) {
        a += red[0][e][y][threadIdx.x];
        b += red[1][e][y][threadIdx.x];
      }
      if (part_dA) part_dA[int64_t(blockIdx.y) * KD + q + e] = a;
      if (part_dv) part_dv[int64_t(blockIdx.y) * KD + q + e] = b;
    }
  }
}

// out_p[c] = sum over chunks of partial[p][chunk][c], chunks in order; blockIdx.y picks p.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    finish_partials_kernel(const Acc* __restrict__ partial, int64_t chunks, int64_t KD, Acc* __restrict__ out0,
                           Acc* __restrict__ out1) {
  const Acc* src = partial + int64_t(blockIdx.y) * chunks * KD;
  Acc* dst = blockIdx.y == 0 ? out0 : out1;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < KD; c += int64_t(gridDim.x) * blockDim.x) {
    Acc s = 0;
    for (int64_t i = 0; i < chunks; ++i) s += src[i * KD + c];
    dst[c] = s;
  }
}

struct ReduceSplit {
  int64_t chunks, rows_per_chunk;
};

// A fixed split of the rows into chunks: about 4 blocks per SM in all, at least kMinRowsPerChunk rows each.
ReduceSplit reduce_split(int64_t R, int64_t KD) {
  const int64_t col_tiles = std::max<int64_t>(1, ceil_div(KD, int64_t(kReduceTX) * 8));
  const int64_t want = ceil_div(4LL * sm_count(), col_tiles);
  const int64_t chunks = std::max<int64_t>(1, std::min(want, ceil_div(R, kMinRowsPerChunk)));
  const int64_t rows = ceil_div(std::max<int64_t>(R, 1), chunks);
  return {ceil_div(std::max<int64_t>(R, 1), rows), rows};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Launchers.

void head_slots(const int64_t* heads, int64_t K, int64_t H, int32_t* slots, cudaStream_t stream) {
  check_index_range(H, "the number of heads");
  if (H == 0) return;
  head_slots_kernel<<<1, kThreads, 0, stream>>>(heads, static_cast<int>(K), static_cast<int>(H), slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void materialize(DType t, Matrix x, void* out, int64_t N, int64_t C, const int32_t* slots, int64_t K, int64_t d,
                 const void* A, const void* v, cudaStream_t stream) {
  if (N == 0 || C == 0) return;
  check_index_range(C, "H * head_dim");
  dispatch(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    constexpr int V = kVec<T>;
    auto* xp = static_cast<const T*>(x.ptr);
    auto* op = static_cast<T*>(out);
    const DivMod32 div_d = DivMod32::make(d);
    const int Ci = static_cast<int>(C), Ki = static_cast<int>(K), di = static_cast<int>(d);
    if (d % V == 0 && rows_vectorizable(x, N, V)) {
      const Grid2D g = rows_grid(N, C / V);
      materialize_kernel<T, V><<<g.grid, g.block, 0, stream>>>(xp, x.s0, x.s1, op, N, Ci, slots, Ki, di, div_d,
                                                               static_cast<const Acc*>(A), static_cast<const Acc*>(v));
    } else {
      const Grid2D g = rows_grid(N, C);
      materialize_kernel<T, 1><<<g.grid, g.block, 0, stream>>>(xp, x.s0, x.s1, op, N, Ci, slots, Ki, di, div_d,
                                                               static_cast<const Acc*>(A), static_cast<const Acc*>(v));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void gather_scale(DType t, Matrix x, void* out, int64_t N, int64_t C, const int64_t* heads, int64_t K, int64_t d,
                  const void* A, cudaStream_t stream) {
  if (N == 0 || K == 0) return;
  check_index_range(C, "H * head_dim");
  dispatch(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    constexpr int V = kVec<T>;
    auto* xp = static_cast<const T*>(x.ptr);
    auto* op = static_cast<T*>(out);
    const DivMod32 div_d = DivMod32::make(d);
    const int Ci = static_cast<int>(C), Ki = static_cast<int>(K), di = static_cast<int>(d);
    if (d % V == 0 && rows_vectorizable(x, N, V)) {
      const Grid2D g = rows_grid(N, K * d / V);
      gather_scale_kernel<T, V><<<g.grid, g.block, 0, stream>>>(xp, x.s0, x.s1, op, N, Ci, heads, Ki, di, div_d,
                                                                static_cast<const Acc*>(A));
    } else {
      const Grid2D g = rows_grid(N, K * d);
      gather_scale_kernel<T, 1><<<g.grid, g.block, 0, stream>>>(xp, x.s0, x.s1, op, N, Ci, heads, Ki, di, div_d,
                                                                static_cast<const Acc*>(A));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bias_row(DType t, Matrix w, const void* bias, int64_t bias_stride, void* out_acc, void* out_x, int64_t D_out,
              int64_t C, const int64_t* heads, int64_t K, int64_t d, const void* v, cudaStream_t stream) {
  if (D_out == 0) return;
  check_index_range(C, "H * head_dim");
  check_index_range(D_out, "D_out");
  dispatch(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    constexpr int V = kVec<T>;
    const dim3 grid(static_cast<unsigned>(ceil_div(D_out, kThreads / 32)));
    auto* wp = static_cast<const T*>(w.ptr);
    auto* bp = static_cast<const T*>(bias);
    auto* oa = static_cast<Acc*>(out_acc);
    auto* ox = static_cast<T*>(out_x);
    const DivMod32 div_d = DivMod32::make(d);
    const int Di = static_cast<int>(D_out), Ci = static_cast<int>(C), Ki = static_cast<int>(K),
              di = static_cast<int>(d);
    if (d % V == 0 && rows_vectorizable(w, D_out, V)) {
      bias_row_kernel<T, V><<<grid, kThreads, 0, stream>>>(wp, w.s0, w.s1, bp, bias_stride, oa, ox, Di, Ci, heads, Ki,
                                                           di, div_d, static_cast<const Acc*>(v));
    } else {
      bias_row_kernel<T, 1><<<grid, kThreads, 0, stream>>>(wp, w.s0, w.s1, bp, bias_stride, oa, ox, Di, Ci, heads, Ki,
                                                           di, div_d, static_cast<const Acc*>(v));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

bool decode_gemv_supported(DType t, int64_t N, Matrix w, int64_t C, int64_t d) {
  if (t == DType::kFloat64 || N < 1 || N > kDecodeMaxRows) return false;
  const int V = t == DType::kFloat32 ? 4 : 8;
  return C % V == 0 && d % V == 0 && aligned16(w.ptr) && w.s1 == 1 && w.s0 % V == 0;
}

void decode_gemv(DType t, Matrix x, Matrix w, const void* bias, int64_t bias_stride, const float* bias_acc, void* y,
                 int64_t N, int64_t C, int64_t D_out, const int32_t* slots, int64_t K, int64_t d, const void* A,
                 const void* v, cudaStream_t stream) {
  if (D_out == 0) return;
  check_index_range(C, "H * head_dim");
  check_index_range(D_out + 16, "D_out + 16");
  dispatch(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, double>) {
      auto go = [&](auto nb) {
        constexpr int NB = decltype(nb)::value;
        launch_decode_gemv<T, NB>(x, w, bias, bias_stride, bias_acc, y, N, C, D_out, slots, K, d, A, v, stream);
      };
      if (N <= 1) {
        go(std::integral_constant<int, 1>{});
      } else if (N <= 2) {
        go(std::integral_constant<int, 2>{});
      } else if (N <= 4) {
        go(std::integral_constant<int, 4>{});
      } else if (N <= 8) {
        go(std::integral_constant<int, 8>{});
      } else {
        go(std::integral_constant<int, 16>{});
      }
    }
  });
}

int64_t head_reduce_workspace_elems(int64_t R, int64_t K, int64_t d, int parts) {
  return reduce_split(R, K * d).chunks * K * d * parts;
}

void head_reduce(DType t, void* g, int64_t g_s0, int64_t g_s1, int64_t R, int64_t C, const int64_t* heads, int64_t K,
                 int64_t d, Matrix xs, const void* row_weight, const void* scale, void* dA, void* dv, void* workspace,
                 cudaStream_t stream) {
  const int64_t KD = K * d;
  if (R == 0 || KD == 0) return;
  check_index_range(C, "H * head_dim");
  check_index_range(KD + int64_t(kReduceTX) * 8, "K * head_dim");
  const ReduceSplit split = reduce_split(R, KD);
  const int parts = (dA ? 1 : 0) + (dv ? 1 : 0);
  dispatch(t, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    constexpr int V = kVec<T>;
    Acc* ws = static_cast<Acc*>(workspace);
    Acc* part_dA = dA ? ws : nullptr;
    Acc* part_dv = dv ? ws + (dA ? split.chunks * KD : 0) : nullptr;
    const Matrix gm{g, g_s0, g_s1};
    const bool vec = d % V == 0 && rows_vectorizable(gm, R, V) && (!dA || rows_vectorizable(xs, R, V));
    const dim3 block(kReduceTX, kReduceTY);
    const dim3 grid(static_cast<unsigned>(ceil_div(KD / (vec ? V : 1), kReduceTX)),
                    static_cast<unsigned>(split.chunks));
    auto* gp = static_cast<T*>(g);
    auto* xp = static_cast<const T*>(xs.ptr);
    const int Hi = static_cast<int>(C / d), Ki = static_cast<int>(K), di = static_cast<int>(d);
    if (vec) {
      head_reduce_kernel<T, V><<<grid, block, 0, stream>>>(
          gp, g_s0, g_s1, R, Hi, heads, Ki, di, xp, xs.s0, xs.s1, static_cast<const Acc*>(row_weight),
          static_cast<const Acc*>(scale), part_dA, part_dv, split.rows_per_chunk);
    } else {
      head_reduce_kernel<T, 1><<<grid, block, 0, stream>>>(
          gp, g_s0, g_s1, R, Hi, heads, Ki, di, xp, xs.s0, xs.s1, static_cast<const Acc*>(row_weight),
          static_cast<const Acc*>(scale), part_dA, part_dv, split.rows_per_chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (parts > 0) {
      Acc* out0 = static_cast<Acc*>(dA ? dA : dv);
      Acc* out1 = static_cast<Acc*>(dv);
      const dim3 fgrid(static_cast<unsigned>(std::min<int64_t>(ceil_div(KD, kThreads), 1024)), parts);
      finish_partials_kernel<Acc><<<fgrid, kThreads, 0, stream>>>(ws, split.chunks, KD, out0, out1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace cuda_kernels
}  // namespace lofit
