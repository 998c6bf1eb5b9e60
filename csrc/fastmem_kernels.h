// Torch-free launchers of the fastmem CUDA kernels: raw pointers, sizes, strides, a stream.
//
// The .cu files compile with nvcc alone (no torch headers); csrc/bindings.cpp is the only
// file that sees torch. Every launcher returns cudaSuccess, cudaErrorInvalidValue for bad
// sizes / dtype, or the launch error. Offsets are int64 throughout.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of a logits buffer.
typedef enum {
  FASTMEM_FLOAT32 = 0,
  FASTMEM_FLOAT16 = 1,
  FASTMEM_BFLOAT16 = 2,
  FASTMEM_FLOAT64 = 3,
} fastmem_dtype;

// Options of the fused cross-entropy (see fastmem/ops/cross_entropy/row_math.py); all 0 = off.
typedef struct {
  double softcap;           // > 0: every logit z becomes softcap * tanh(z / softcap) on load
  double label_smoothing;   // eps in [0, 1]: loss (1 - eps) nll + eps (lse - mean z)
  double lse_square_scale;  // s >= 0: z-loss s lse^2
} fastmem_ce_options;

// Pass 1 of the fused cross-entropy, over one chunk of logits from the lm_head GEMM.
//   logits      [n_rows, n_cols] of `dtype`, row stride `stride_row` (elements, >= n_cols),
//               column stride 1; any storage offset (unaligned rows take a scalar head).
//   labels      [n_rows] int64, each in [0, n_cols) (out of range: target NaN, no read).
//   row_max, log_sum, target, best_other, sum_z, entropy  [n_rows] outputs, float64 for
//               FASTMEM_FLOAT64 logits, else float32: the row's max, log sum exp(z - max) (so
//               the log-sum-exp is row_max + log_sum), the target logit, the largest non-target
//               logit, the sum of the logits, the entropy lse - sum_c p_c z_c; all of the
//               capped logits when softcap > 0.
// The token is greedy-correct iff target > best_other (a tie counts as wrong).
cudaError_t fastmem_ce_row_stats(fastmem_dtype dtype, const void* logits, int64_t n_rows, int64_t n_cols,
                                 int64_t stride_row, const int64_t* labels, void* row_max, void* log_sum,
                                 void* target, void* best_other, void* sum_z, void* entropy, double softcap,
                                 cudaStream_t stream);

// Pass 2: overwrite each row r with weight[r] * d loss / d z (softmax - onehot, plus the
// options' terms, times the softcap derivative), formed in fp32 (fp64 for fp64 logits) from
// row_max and log_sum of pass 1 and rounded once to `dtype`. The target column takes
// expm1(log p_y), so a confident target keeps its p_y - 1.
// Rows with weight 0 are written as zeros without being read (a gradient GEMM over the whole
// chunk then needs no host-side list of active rows).
//   row_max, log_sum, weight [n_rows], float64 for FASTMEM_FLOAT64 logits, else float32.
cudaError_t fastmem_ce_softmax_grad(fastmem_dtype dtype, void* logits, int64_t n_rows, int64_t n_cols,
                                    int64_t stride_row, const int64_t* labels, const void* row_max,
                                    const void* log_sum, const void* weight, fastmem_ce_options options,
                                    cudaStream_t stream);

// LoRA dropout GEMM (csrc/lora_linear.cu): C[m, n] (+)= alpha * (A[m, k] @ B[k, n]) with the
// dropout keep-mask of (seed, token row, feature column) applied to A (mask_on = 1, A's
// (row, col) = (token, feature)), to B (2, B's (row, col) = (token, feature)) or to C (3, C's
// (row, col) = (token, feature)); 0 = no mask. Element (i, j) of X is at X + i * x_row_stride +
// j * x_col_stride (elements). Accumulation in fp32 (fp64 for FASTMEM_FLOAT64).
//   out_accum = 0: C has `dtype`; accumulate = 1 adds to it (one rounding of the sum).
//   out_accum = 1: C is float32 (float64 for FASTMEM_FLOAT64) and K is split into `splits`
//               parts, part z written to C + z * c_split_stride (the caller sums them).
// A kept element is kept with probability 1 - drop_below / 2^32 (drop_below = floor(p 2^32));
// the 1 / (1 - p) scale is the caller's, folded into alpha.
typedef struct {
  fastmem_dtype dtype;
  const void* a;
  int64_t a_row_stride, a_col_stride;
  const void* b;
  int64_t b_row_stride, b_col_stride;
  void* c;
  int64_t c_row_stride, c_col_stride, c_split_stride;
  int64_t m, n, k, splits;
  double alpha;
  int mask_on;
  uint32_t seed, drop_below;
  int accumulate, out_accum;
} fastmem_lora_gemm;

cudaError_t fastmem_lora_gemm_launch(const fastmem_lora_gemm* params, cudaStream_t stream);

// floor(p * 2^32) for a dropout probability p in [0, 1): the `drop_below` of the calls here.
uint32_t fastmem_lora_drop_below(double p);

// The int8 [n_rows, n_cols] keep-mask (1 = kept) the GEMM above applies, for tests/debugging.
cudaError_t fastmem_lora_keep_mask(int8_t* out, int64_t n_rows, int64_t n_cols, uint32_t seed, uint32_t drop_below,
                                   cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
