// CUDA kernels of one chunk of the fused cross-entropy (the GEMMs around them run on cuBLAS).
//
// ce_row_stats_kernel: one block per row, one read of the row with 128-bit loads: online
//   log-sum-exp (as row max + log sum exp(z - max)), target logit, best non-target logit and
//   entropy, reduced across the block by warp shuffles and a 32-entry shared-memory stage.
// ce_softmax_grad_kernel: one block per row, overwrites the row with w dloss/dz (softmax -
//   onehot plus the softcap / label-smoothing / z-loss terms) formed in fp32 and rounded once;
//   a row with w = 0 is written as zeros without being read.
// The per-thread math is in ce_math.h, shared with the host-side test harness.
#include "ce_math.h"
#include "fastmem_kernels.h"

namespace fastmem {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename Acc> __device__ __forceinline__ RowState<Acc> warp_merge(RowState<Acc> s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    RowState<Acc> other;
    other.max = __shfl_xor_sync(kFullMask, s.max, offset);
    other.rest = __shfl_xor_sync(kFullMask, s.rest, offset);
    other.best_other = __shfl_xor_sync(kFullMask, s.best_other, offset);
    other.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
    other.shifted = __shfl_xor_sync(kFullMask, s.shifted, offset);
    s = merge_states(s, other);
  }
  return s;
}

// Whole-block merge; the result is valid in warp 0. blockDim.x is a multiple of 32.
template <typename Acc> __device__ __forceinline__ RowState<Acc> block_merge(RowState<Acc> s, RowState<Acc>* partials) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  s = warp_merge(s);
  if (lane == 0) partials[warp] = s;
  __syncthreads();
  if (warp == 0) s = warp_merge(lane < n_warps ? partials[lane] : empty_state<Acc>());
  __syncthreads();  // `partials` is reused by the block's next row
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
ce_row_stats_kernel(const T* __restrict__ logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                    const int64_t* __restrict__ labels, typename AccumOf<T>::type* __restrict__ row_max,
                    typename AccumOf<T>::type* __restrict__ log_sum, typename AccumOf<T>::type* __restrict__ target,
                    typename AccumOf<T>::type* __restrict__ best_other, typename AccumOf<T>::type* __restrict__ sum_z,
                    typename AccumOf<T>::type* __restrict__ entropy, typename AccumOf<T>::type softcap) {
  using Acc = typename AccumOf<T>::type;
  __shared__ RowState<Acc> partials[32];
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const T* row_ptr = logits + row * stride_row;
    const int64_t label = labels[row];
    RowState<Acc> s = row_state_partial<T>(row_ptr, n_cols, label, static_cast<int>(threadIdx.x),
                                           static_cast<int>(blockDim.x), softcap);
    s = block_merge(s, partials);
    if (threadIdx.x == 0) {
      const bool label_in_row = label >= 0 && label < n_cols;
      row_max[row] = s.max;
      log_sum[row] = finish_log_sum(s);
      target[row] = label_in_row ? cap_logit<Acc>(to_accum(row_ptr[label]), softcap) : static_cast<Acc>(NAN);
      best_other[row] = s.best_other;
      sum_z[row] = s.sum;
      entropy[row] = finish_entropy(s);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
ce_softmax_grad_kernel(T* __restrict__ logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                       const int64_t* __restrict__ labels, const typename AccumOf<T>::type* __restrict__ row_max,
                       const typename AccumOf<T>::type* __restrict__ log_sum,
                       const typename AccumOf<T>::type* __restrict__ weight, GradTerms<typename AccumOf<T>::type> terms) {
  using Acc = typename AccumOf<T>::type;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const Acc w = weight[row];
    if (w == Acc(0)) {  // inactive (MemFT-OT, an ignored row): a zero gradient row, never read
      zero_row_partial<T>(logits + row * stride_row, n_cols, static_cast<int>(threadIdx.x),
                          static_cast<int>(blockDim.x));
      continue;
    }
    softmax_grad_partial<T>(logits + row * stride_row, n_cols, labels[row], row_max[row], log_sum[row], w,
                            static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), terms);
  }
}

// Rows beyond this many blocks are covered by the kernels' grid-stride loop.
constexpr int64_t kMaxGridRows = 1 << 20;

bool bad_shape(int64_t n_rows, int64_t n_cols, int64_t stride_row) {
  return n_rows < 0 || n_cols <= 0 || (n_rows > 1 && stride_row < n_cols);
}

bool bad_options(const fastmem_ce_options& o) {
  // NaN fails every comparison, so it is rejected too
  return !(o.softcap >= 0.0) || !(o.label_smoothing >= 0.0 && o.label_smoothing <= 1.0) || !(o.lse_square_scale >= 0.0);
}

template <typename T>
cudaError_t launch_row_stats(const void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                             const int64_t* labels, void* row_max, void* log_sum, void* target, void* best_other,
                             void* sum_z, void* entropy, double softcap, cudaStream_t stream) {
  using Acc = typename AccumOf<T>::type;
  const int threads = row_block_threads(n_cols, static_cast<int>(sizeof(T)));
  const unsigned blocks = static_cast<unsigned>(n_rows < kMaxGridRows ? n_rows : kMaxGridRows);
  ce_row_stats_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(logits), n_rows, n_cols, stride_row,
                                                         labels, static_cast<Acc*>(row_max), static_cast<Acc*>(log_sum),
                                                         static_cast<Acc*>(target), static_cast<Acc*>(best_other),
                                                         static_cast<Acc*>(sum_z), static_cast<Acc*>(entropy),
                                                         static_cast<Acc>(softcap));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_softmax_grad(void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                                const int64_t* labels, const void* row_max, const void* log_sum, const void* weight,
                                fastmem_ce_options options, cudaStream_t stream) {
  using Acc = typename AccumOf<T>::type;
  const GradTerms<Acc> terms = grad_terms<Acc>(options, n_cols);
  const int threads = row_block_threads(n_cols, static_cast<int>(sizeof(T)));
  const unsigned blocks = static_cast<unsigned>(n_rows < kMaxGridRows ? n_rows : kMaxGridRows);
  ce_softmax_grad_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<T*>(logits), n_rows, n_cols, stride_row,
                                                            labels, static_cast<const Acc*>(row_max),
                                                            static_cast<const Acc*>(log_sum),
                                                            static_cast<const Acc*>(weight), terms);
  return cudaGetLastError();
}

}  // namespace
}  // namespace fastmem

extern "C" cudaError_t fastmem_ce_row_stats(fastmem_dtype dtype, const void* logits, int64_t n_rows, int64_t n_cols,
                                            int64_t stride_row, const int64_t* labels, void* row_max, void* log_sum,
                                            void* target, void* best_other, void* sum_z, void* entropy,
                                            double softcap, cudaStream_t stream) {
  using namespace fastmem;
  if (bad_shape(n_rows, n_cols, stride_row) || !(softcap >= 0.0)) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  switch (dtype) {
    case FASTMEM_FLOAT32:
      return launch_row_stats<float>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, target, best_other,
                                     sum_z, entropy, softcap, stream);
    case FASTMEM_FLOAT16:
      return launch_row_stats<__half>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, target, best_other,
                                      sum_z, entropy, softcap, stream);
    case FASTMEM_BFLOAT16:
      return launch_row_stats<__nv_bfloat16>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, target,
                                             best_other, sum_z, entropy, softcap, stream);
    case FASTMEM_FLOAT64:
      return launch_row_stats<double>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, target, best_other,
                                      sum_z, entropy, softcap, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t fastmem_ce_softmax_grad(fastmem_dtype dtype, void* logits, int64_t n_rows, int64_t n_cols,
                                               int64_t stride_row, const int64_t* labels, const void* row_max,
                                               const void* log_sum, const void* weight, fastmem_ce_options options,
                                               cudaStream_t stream) {
  using namespace fastmem;
  if (bad_shape(n_rows, n_cols, stride_row) || bad_options(options)) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  switch (dtype) {
    case FASTMEM_FLOAT32:
      return launch_softmax_grad<float>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight, options,
                                        stream);
    case FASTMEM_FLOAT16:
      return launch_softmax_grad<__half>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight, options,
                                         stream);
    case FASTMEM_BFLOAT16:
      return launch_softmax_grad<__nv_bfloat16>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight,
                                                options, stream);
    case FASTMEM_FLOAT64:
      return launch_softmax_grad<double>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight, options,
                                         stream);
  }
  return cudaErrorInvalidValue;
}
