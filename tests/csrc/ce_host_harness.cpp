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
               typename fastmem::AccumOf<T>::type* sum_z, typename fastmem::AccumOf<T>::type* entropy, double softcap,
               int n_threads) {
  using Acc = typename fastmem::AccumOf<T>::type;
  const Acc cap = static_cast<Acc>(softcap);
  const int threads = n_threads > 0 ? n_threads : fastmem::row_block_threads(n_cols, static_cast<int>(sizeof(T)));
  const int n_warps = threads / 32;
  std::vector<RowState<Acc>> lanes(threads);
  for (int64_t row = 0; row < n_rows; ++row) {
    const T* row_ptr = logits + row * stride_row;
    const int64_t label = labels[row];
    for (int tid = 0; tid < threads; ++tid) {
      lanes[tid] = fastmem::row_state_partial<T>(row_ptr, n_cols, label, tid, threads, cap);
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
    target[row] = label_in_row ? fastmem::cap_logit<Acc>(fastmem::to_accum(row_ptr[label]), cap) : static_cast<Acc>(NAN);
    best_other[row] = warp0[0].best_other;
    sum_z[row] = warp0[0].sum;
    entropy[row] = fastmem::finish_entropy(warp0[0]);
  }
}

template <typename T>
void softmax_grad(T* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row, const int64_t* labels,
                  const typename fastmem::AccumOf<T>::type* row_max, const typename fastmem::AccumOf<T>::type* log_sum,
                  const typename fastmem::AccumOf<T>::type* weight, const fastmem_ce_options& options, int n_threads) {
  using Acc = typename fastmem::AccumOf<T>::type;
  const fastmem::GradTerms<Acc> terms = fastmem::grad_terms<Acc>(options, n_cols);
  const int threads = n_threads > 0 ? n_threads : fastmem::row_block_threads(n_cols, static_cast<int>(sizeof(T)));
  for (int64_t row = 0; row < n_rows; ++row) {
    if (weight[row] == Acc(0)) {
      for (int tid = 0; tid < threads; ++tid) fastmem::zero_row_partial<T>(logits + row * stride_row, n_cols, tid, threads);
      continue;
    }
    for (int tid = 0; tid < threads; ++tid) {
      fastmem::softmax_grad_partial<T>(logits + row * stride_row, n_cols, labels[row], row_max[row], log_sum[row],
                                       weight[row], tid, threads, terms);
    }
  }
}

template <typename T> using Acc = typename fastmem::AccumOf<T>::type;

template <typename T>
void row_stats_as(const void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row, const int64_t* labels,
                  void* const* outs, double softcap, int n_threads) {
  row_stats(static_cast<const T*>(logits), n_rows, n_cols, stride_row, labels, static_cast<Acc<T>*>(outs[0]),
            static_cast<Acc<T>*>(outs[1]), static_cast<Acc<T>*>(outs[2]), static_cast<Acc<T>*>(outs[3]),
            static_cast<Acc<T>*>(outs[4]), static_cast<Acc<T>*>(outs[5]), softcap, n_threads);
}

template <typename T>
void softmax_grad_as(void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row, const int64_t* labels,
                     const void* row_max, const void* log_sum, const void* weight, const fastmem_ce_options& options,
                     int n_threads) {
  softmax_grad(static_cast<T*>(logits), n_rows, n_cols, stride_row, labels, static_cast<const Acc<T>*>(row_max),
               static_cast<const Acc<T>*>(log_sum), static_cast<const Acc<T>*>(weight), options, n_threads);
}

}  // namespace

extern "C" {

// Same arguments as the launchers in csrc/fastmem_kernels.h (the six outputs of row stats as
// an array), plus the block size to emulate. Returns 0, or -1 for an unknown dtype / a thread
// count that is not a multiple of 32 up to 1024 (0 picks the kernels' own choice).
int fm_host_row_stats(int dtype, const void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                      const int64_t* labels, void* const* outs, double softcap, int n_threads) {
  if (n_threads < 0 || n_threads % 32 != 0 || n_threads > 1024) return -1;
  switch (dtype) {
    case FASTMEM_FLOAT32: row_stats_as<float>(logits, n_rows, n_cols, stride_row, labels, outs, softcap, n_threads); return 0;
    case FASTMEM_FLOAT16: row_stats_as<__half>(logits, n_rows, n_cols, stride_row, labels, outs, softcap, n_threads); return 0;
    case FASTMEM_BFLOAT16:
      row_stats_as<__nv_bfloat16>(logits, n_rows, n_cols, stride_row, labels, outs, softcap, n_threads);
      return 0;
    case FASTMEM_FLOAT64: row_stats_as<double>(logits, n_rows, n_cols, stride_row, labels, outs, softcap, n_threads); return 0;
  }
  return -1;
}

int fm_host_softmax_grad(int dtype, void* logits, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                         const int64_t* labels, const void* row_max, const void* log_sum, const void* weight,
                         double softcap, double label_smoothing, double lse_square_scale, int n_threads) {
  if (n_threads < 0 || n_threads % 32 != 0 || n_threads > 1024) return -1;
  const fastmem_ce_options options{softcap, label_smoothing, lse_square_scale};
  switch (dtype) {
    case FASTMEM_FLOAT32:
      softmax_grad_as<float>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight, options, n_threads);
      return 0;
    case FASTMEM_FLOAT16:
      softmax_grad_as<__half>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight, options, n_threads);
      return 0;
    case FASTMEM_BFLOAT16:
      softmax_grad_as<__nv_bfloat16>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight, options,
                                     n_threads);
      return 0;
    case FASTMEM_FLOAT64:
      softmax_grad_as<double>(logits, n_rows, n_cols, stride_row, labels, row_max, log_sum, weight, options, n_threads);
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
