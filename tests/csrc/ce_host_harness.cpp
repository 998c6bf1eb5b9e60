// Host build of the cross-entropy kernels' math (csrc/ce_math.h), for tests without a GPU.
//
// Each function runs a CUDA block's threads one after another over the same per-thread code
// the kernels run (row_state_partial / softmax_grad_partial), then merges the partial states
// in the kernel's order: a xor butterfly inside each warp of 32 lanes, then warp 0 over the
// per-warp results. Built with g++ by tests/csrc/test_ce_host_math.py and called with ctypes.
#include <vector>

#include "ce_math.h"
#include "fastmem_kernels.h"

namespace {

using fastmem::RowState;

template <typename Acc> void butterfly(RowState<Acc>* lanes) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    RowState<Acc> next[32];
    for (int lane = 0; lane < 32; ++lane) next[lane] = fastmem::merge_states(lanes[lane], lanes[lane ^ offset]);
    for (int lane = 0; lane < 32; ++lane) lanes[lane] = next[lane];
  }
}

template <typename T>
void row_stats(const T* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row, const int64_t* labels,
               typename fastmem::AccumOf<T>::type* row_max, typename fastmem::AccumOf<T>::type* log_sum,
               typename fastmem::AccumOf<T>::type* target, typename fastmem::AccumOf<T>::type* best_other,
               int n_threads) {
  using Acc = typename fastmem::AccumOf<T>::type;
  const int threads = n_threads > 0 ? n_threads : fastmem::row_block_threads(n_cols, static_cast<int>(sizeof(T)));
  const int n_warps = threads / 32;
  std::vector<RowState<Acc>> lanes(threads);
  for (int64_t row = 0; row < n_rows; ++row) {
    const T* row_ptr = logits + row * stride_row;
    const int64_t label = labels[row];
    for (int tid = 0; tid < threads; ++tid) {
      lanes[tid] = fastmem::row_state_partial<T>(row_ptr, n_cols, label, tid, threads);
    }
    RowState<Acc> warp0[32];
    for (int warp = 0; warp < 32; ++warp) {
      if (warp < n_warps) {
        butterfly(&lanes[32 * warp]);
        warp0[warp] = lanes[32 * warp];
      } else {
        warp0[warp] = fastmem::empty_state<Acc>();
      }
    }
    butterfly(warp0);
    const bool label_in_row = label >= 0 && label < n_cols;
    row_max[row] = warp0[0].max;
    log_sum[row] = fastmem::finish_log_sum(warp0[0]);
    target[row] = label_in_row ? fastmem::to_accum(row_ptr[label]) : static_cast<Acc>(NAN);
    best_other[row] = warp0[0].best_other;
  }
}

template <typename T>
void softmax_grad(T* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row, const int64_t* labels,
                  const typename fastmem::AccumOf<T>::type* row_max, const typename fastmem::AccumOf<T>::type* log_sum,
                  const typename fastmem::AccumOf<T>::type* weight, int n_threads) {
  using Acc = typename fastmem::AccumOf<T>::type;
  const int threads = n_threads > 0 ? n_threads : fastmem::row_block_threads(n_cols, static_cast<int>(sizeof(T)));
  for (int64_t row = 0; row < n_rows; ++row) {
    if (weight[row] == Acc(0)) continue;
    for (int tid = 0; tid < threads; ++tid) {
      fastmem::softmax_grad_partial<T>(logits + row * stride_row, n_cols, labels[row], row_max[row], log_sum[row],
                                       weight[row], tid, threads);
    }
  }
}

}  // namespace

extern "C" {

// Same arguments as the launchers in csrc/fastmem_kernels.h, plus the block size to emulate.
// Returns 0, or -1 for an unknown dtype / a thread count that is not a multiple of 32 up to
// 1024 (0 picks the kernels' own choice).
int fm_host_row_stats(int dtype, const void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                      const int64_t* labels, void* row_max, void* log_sum, void* target, void* best_other,
                      int n_threads) {
  if (n_threads < 0 || n_threads % 32 != 0 || n_threads > 1024) return -1;
  switch (dtype) {
    case FASTMEM_FLOAT32:
      row_stats(static_cast<const float*>(logits), n_rows, n_cols, stride_row, labels, static_cast<float*>(row_max),
                static_cast<float*>(log_sum), static_cast<float*>(target), static_cast<float*>(best_other), n_threads);
      return 0;
    case FASTMEM_FLOAT16:
      row_stats(static_cast<const __half*>(logits), n_rows, n_cols, stride_row, labels, static_cast<float*>(row_max),
                static_cast<float*>(log_sum), static_cast<float*>(target), static_cast<float*>(best_other), n_threads);
      return 0;
    case FASTMEM_BFLOAT16:
      row_stats(static_cast<const __nv_bfloat16*>(logits), n_rows, n_cols, stride_row, labels,
                static_cast<float*>(row_max), static_cast<float*>(log_sum), static_cast<float*>(target),
                static_cast<float*>(best_other), n_threads);
      return 0;
    case FASTMEM_FLOAT64:
      row_stats(static_cast<const double*>(logits), n_rows, n_cols, stride_row, labels, static_cast<double*>(row_max),
                static_cast<double*>(log_sum), static_cast<double*>(target), static_cast<double*>(best_other),
                n_threads);
      return 0;
  }
  return -1;
}

int fm_host_softmax_grad(int dtype, void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                         const int64_t* labels, const void* row_max, const void* log_sum, const void* weight,
                         int n_threads) {
  if (n_threads < 0 || n_threads % 32 != 0 || n_threads > 1024) return -1;
  switch (dtype) {
    case FASTMEM_FLOAT32:
      softmax_grad(static_cast<float*>(logits), n_rows, n_cols, stride_row, labels, static_cast<const float*>(row_max),
                   static_cast<const float*>(log_sum), static_cast<const float*>(weight), n_threads);
      return 0;
    case FASTMEM_FLOAT16:
      softmax_grad(static_cast<__half*>(logits), n_rows, n_cols, stride_row, labels,
                   static_cast<const float*>(row_max), static_cast<const float*>(log_sum),
                   static_cast<const float*>(weight), n_threads);
      return 0;
    case FASTMEM_BFLOAT16:
      softmax_grad(static_cast<__nv_bfloat16*>(logits), n_rows, n_cols, stride_row, labels,
                   static_cast<const float*>(row_max), static_cast<const float*>(log_sum),
                   static_cast<const float*>(weight), n_threads);
      return 0;
    case FASTMEM_FLOAT64:
      softmax_grad(static_cast<double*>(logits), n_rows, n_cols, stride_row, labels,
                   static_cast<const double*>(row_max), static_cast<const double*>(log_sum),
                   static_cast<const double*>(weight), n_threads);
      return 0;
  }
  return -1;
}

void fm_host_split_row(uint64_t row_address, int64_t n_cols, int elem_bytes, int64_t* out) {
  const fastmem::RowSplit split = fastmem::split_row(static_cast<uintptr_t>(row_address), n_cols, elem_bytes);
  out[0] = split.head;
  out[1] = split.n_vec;
  out[2] = split.tail_start;
}

int fm_host_row_block_threads(int64_t n_cols, int elem_bytes) { return fastmem::row_block_threads(n_cols, elem_bytes); }

}  // extern "C"
