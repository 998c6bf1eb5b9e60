// Per-thread math of the fused cross-entropy chunk kernels, shared by nvcc and the host.
//
// Everything here is `__host__ __device__` and torch-free: csrc/cross_entropy.cu runs it on
// the GPU, and tests/csrc/ce_host_harness.cpp compiles the very same functions with g++ to
// check them against the torch reference on a machine without a GPU. Only the cross-thread
// reductions (warp shuffles, shared memory) live in the .cu file.
//
// Numerics (see docs/design.md, section 4):
// * every reduction runs in fp32 (fp64 for fp64 logits), whatever the logits' dtype;
// * dloss/dz (softmax - onehot plus the options' terms) is formed in the accumulation type and
//   rounded once, so the target
//   column's p_y - 1 survives when p_y is within bf16's 2^-8 of 1;
// * columns >= n_cols never enter the max, the lse, the argmax or the target match;
// * all offsets are int64 (C * V passes 2^31 at long vocabularies).
#pragma once

#include "fastmem_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FASTMEM_HD __host__ __device__ __forceinline__
#else
#define FASTMEM_HD inline
#endif
// Unroll hints only where the device compiler reads them (host compilers warn on them).
#if defined(__CUDA_ARCH__)
#define FASTMEM_UNROLL _Pragma("unroll")
#else
#define FASTMEM_UNROLL
#endif

namespace fastmem {

// Reductions run in fp32, or fp64 for fp64 logits (the reference precision).
template <typename T> struct AccumOf { using type = float; };
template <> struct AccumOf<double> { using type = double; };

FASTMEM_HD float to_accum(float x) { return x; }
FASTMEM_HD double to_accum(double x) { return x; }
FASTMEM_HD float to_accum(__half x) { return __half2float(x); }
FASTMEM_HD float to_accum(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round once, to nearest even (the only rounding of the gradient).
template <typename T> FASTMEM_HD T from_accum(typename AccumOf<T>::type x);
template <> FASTMEM_HD float from_accum<float>(float x) { return x; }
template <> FASTMEM_HD double from_accum<double>(double x) { return x; }
template <> FASTMEM_HD __half from_accum<__half>(float x) { return __float2half_rn(x); }
template <> FASTMEM_HD __nv_bfloat16 from_accum<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Accurate exp/log on purpose (no --use_fast_math): the kernels are memory-bound, and the
// loss of a memorized token is a small difference lse - z_y that approximate exps would blur.
FASTMEM_HD float accum_exp(float x) { return expf(x); }
FASTMEM_HD double accum_exp(double x) { return exp(x); }
FASTMEM_HD float accum_expm1(float x) { return expm1f(x); }
FASTMEM_HD double accum_expm1(double x) { return expm1(x); }
FASTMEM_HD float accum_log1p(float x) { return log1pf(x); }
FASTMEM_HD double accum_log1p(double x) { return log1p(x); }
FASTMEM_HD float accum_tanh(float x) { return tanhf(x); }
FASTMEM_HD double accum_tanh(double x) { return tanh(x); }
// fmax ignores a NaN operand, so a NaN logit cannot hide in the max; it still reaches the
// sum through exp(NaN) and makes the lse NaN, as in the torch reference.
FASTMEM_HD float accum_max(float a, float b) { return fmaxf(a, b); }
FASTMEM_HD double accum_max(double a, double b) { return fmax(a, b); }

// 128-bit accesses: one uint4 holds this many elements of T.
constexpr int kVecBytes = 16;
template <typename T> struct VecWidth { static constexpr int value = kVecBytes / static_cast<int>(sizeof(T)); };

// A row seen as [scalar head | 16-byte-aligned vectors | scalar tail]. Any row stride and any
// storage offset works: the head walks up to the next 16-byte boundary. A row start that is
// not even element-aligned (never produced by torch) runs fully on the scalar path.
struct RowSplit {
  int64_t head;        // scalar elements [0, head)
  int64_t n_vec;       // vectors covering [head, tail_start)
  int64_t tail_start;  // scalar elements [tail_start, n_cols)
};

FASTMEM_HD RowSplit split_row(uintptr_t row_address, int64_t n_cols, int elem_bytes) {
  const int64_t per_vec = kVecBytes / elem_bytes;
  const int64_t misalign = static_cast<int64_t>(row_address % kVecBytes);
  int64_t head = 0;
  if (misalign != 0) head = (misalign % elem_bytes == 0) ? (kVecBytes - misalign) / elem_bytes : n_cols;
  if (head > n_cols) head = n_cols;
  const int64_t n_vec = (n_cols - head) / per_vec;
  return RowSplit{head, n_vec, head + n_vec * per_vec};
}

// Online log-sum-exp state of a set of logits, plus the best logit other than the target and
// the entropy's sum.
//
// The sum of exp(z - max) is kept as `rest` = sum - 1, the sum over every element but one
// at the max. A confident target (the max, p_y = 1 / (1 + rest)) then keeps its p_y - 1 =
// -rest / (1 + rest) to full fp32 precision through log1p / expm1, where a sum near 1 or an
// lse of magnitude ~20 rounded to fp32 would lose up to 1e-7 / 1e-6 of it absolutely: 0.1-1%
// of the gradient at p_y = 1 - 1e-4, the regime memorization training lives in.
//
// Entropy: `shifted` = sum exp(z - max) (z - max) moves with the max like the sum does
// (a max that rises by -d, d <= 0, turns it into e^d (shifted + d (1 + rest))), and
// H = lse - sum p z = log1p(rest) - shifted / (1 + rest): two terms >= 0, no cancellation, so a
// confident row's H -> 0 keeps its relative precision. The element at the max adds 0.
template <typename Acc> struct RowState {
  Acc max;         // running max (-inf while empty)
  Acc rest;        // sum of exp(z - max) minus 1 (-1 while empty)
  Acc best_other;  // max over non-target columns (-inf while empty)
  Acc sum;         // sum of z (label smoothing's mean logit)
  Acc shifted;     // sum of exp(z - max) (z - max) (entropy; 0 while empty)
};

template <typename Acc> FASTMEM_HD RowState<Acc> empty_state() {
  return RowState<Acc>{-static_cast<Acc>(INFINITY), Acc(-1), -static_cast<Acc>(INFINITY), Acc(0), Acc(0)};
}

// Logit soft-capping (Gemma 2): z -> softcap * tanh(z / softcap); softcap <= 0 is off.
template <typename Acc> FASTMEM_HD Acc cap_logit(Acc z, Acc softcap) {
  return softcap > Acc(0) ? softcap * accum_tanh(z / softcap) : z;
}

// The options' terms of d loss / d z (see fastmem/ops/cross_entropy/row_math.py):
//   d/dz_c = [p_c (1 + 2 s lse) - eps / V - (1 - eps) [c == y]] * (1 - tanh(z_c / softcap)^2)
template <typename Acc> struct GradTerms {
  Acc softcap;         // <= 0: off
  Acc smooth;          // label smoothing eps
  Acc smooth_per_col;  // eps / V
  Acc zloss2;          // 2 s (z-loss lse_square_scale s)
};

template <typename Acc> FASTMEM_HD GradTerms<Acc> grad_terms(const fastmem_ce_options& o, int64_t n_cols) {
  return GradTerms<Acc>{static_cast<Acc>(o.softcap), static_cast<Acc>(o.label_smoothing),
                        static_cast<Acc>(o.label_smoothing / static_cast<double>(n_cols)),
                        static_cast<Acc>(2.0 * o.lse_square_scale)};
}

// `s.shifted` re-based from s.max to new_max >= s.max (an empty s has nothing to move).
template <typename Acc> FASTMEM_HD Acc moved_shifted(const RowState<Acc>& s, Acc new_max) {
  if (s.max == -static_cast<Acc>(INFINITY) || s.max == new_max) return s.shifted;
  const Acc d = s.max - new_max;
  return accum_exp(d) * (s.shifted + d * (Acc(1) + s.rest));
}

// exp(d) d of one element, 0 where exp(d) underflows (d = -inf would give 0 * -inf = NaN).
template <typename Acc> FASTMEM_HD Acc shifted_term(Acc d) {
  const Acc e = accum_exp(d);
  return e > Acc(0) ? e * d : Acc(0);
}

// Fold N consecutive logits z[0..N) starting at column col0 into s: one rescale per group.
template <typename Acc, int N>
FASTMEM_HD void fold_group(RowState<Acc>& s, const Acc (&z)[N], int64_t col0, int64_t label) {
  Acc group_max = z[0];
FASTMEM_UNROLL
  for (int i = 0; i < N; ++i) {
    s.sum += z[i];
    group_max = accum_max(group_max, z[i]);
    // Greedy correctness counts ties as wrong, so the target column is excluded here and the
    // caller compares target > best_other strictly.
    if (col0 + i != label) s.best_other = accum_max(s.best_other, z[i]);
  }
  const Acc new_max = accum_max(s.max, group_max);
  if (new_max == -static_cast<Acc>(INFINITY)) {
    // Still all -inf (exp(-inf - -inf) would be NaN): the empty sum stays, unless a NaN came.
FASTMEM_UNROLL
    for (int i = 0; i < N; ++i) {
      if (z[i] != z[i]) s.rest = z[i];
    }
    return;
  }
  // When this group holds the new max, one element at it becomes the implicit 1 and the old
  // state (its own 1 included) is rescaled into `rest`; an empty old state adds 0 * 0.
  bool skip_one = group_max > s.max;
  Acc rest = skip_one ? (Acc(1) + s.rest) * accum_exp(s.max - new_max) : s.rest;
  Acc shifted = moved_shifted(s, new_max);
FASTMEM_UNROLL
  for (int i = 0; i < N; ++i) {
    if (skip_one && z[i] == new_max) {
      skip_one = false;
    } else {
      rest += accum_exp(z[i] - new_max);
      shifted += shifted_term(z[i] - new_max);
    }
  }
  s.rest = rest;
  s.shifted = shifted;
  s.max = new_max;
}

// Combine two partial states; symmetric in a and b, so the lanes of a butterfly agree.
template <typename Acc> FASTMEM_HD RowState<Acc> merge_states(const RowState<Acc>& a, const RowState<Acc>& b) {
  RowState<Acc> out;
  out.max = accum_max(a.max, b.max);
  out.best_other = accum_max(a.best_other, b.best_other);
  out.sum = a.sum + b.sum;
  out.shifted = moved_shifted(a, out.max) + moved_shifted(b, out.max);
  if (out.max == -static_cast<Acc>(INFINITY)) {
    out.rest = a.rest + b.rest + Acc(1);  // both empty (-1), or NaN if a NaN was seen
  } else if (a.max == b.max) {
    out.rest = (a.rest + b.rest) + Acc(1);  // two elements at the max: one of them is the 1
  } else if (a.max > b.max) {
    out.rest = a.rest + (Acc(1) + b.rest) * accum_exp(b.max - a.max);
  } else {
    out.rest = b.rest + (Acc(1) + a.rest) * accum_exp(a.max - b.max);
  }
  return out;
}

// log sum exp(z - max) >= 0 (-inf for an empty row); the lse is max + log_sum.
template <typename Acc> FASTMEM_HD Acc finish_log_sum(const RowState<Acc>& s) { return accum_log1p(s.rest); }

// H = lse - sum_c p_c z_c (see RowState).
template <typename Acc> FASTMEM_HD Acc finish_entropy(const RowState<Acc>& s) {
  return accum_log1p(s.rest) - s.shifted / (Acc(1) + s.rest);
}

// d loss_t / d z_c of the stored (uncapped) logit z_raw, scaled by the token weight, in Acc.
// The target column takes expm1: p_y - 1 without the cancellation of exp(.) - 1.
template <typename Acc>
FASTMEM_HD Acc softmax_grad_value(Acc z_raw, Acc row_max, Acc log_sum, Acc weight, bool is_target,
                                  const GradTerms<Acc>& o) {
  Acc z = z_raw;
  Acc dcap = Acc(1);
  if (o.softcap > Acc(0)) {
    const Acc t = accum_tanh(z_raw / o.softcap);
    z = o.softcap * t;
    dcap = Acc(1) - t * t;
  }
  const Acc log_p = (z - row_max) - log_sum;
  const Acc lse_term = o.zloss2 * (row_max + log_sum);  // 2 s lse
  Acc g;
  if (is_target) {
    g = accum_expm1(log_p);
    if (o.zloss2 != Acc(0)) g += lse_term * accum_exp(log_p);
    g += o.smooth - o.smooth_per_col;
  } else {
    g = accum_exp(log_p);
    if (o.zloss2 != Acc(0)) g *= Acc(1) + lse_term;
    g -= o.smooth_per_col;
  }
  return weight * g * dcap;
}

template <typename T, int N> FASTMEM_HD void load_vec(const T* src, T (&dst)[N]) {
  static_assert(sizeof(T) * N == sizeof(uint4), "one 128-bit access");
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  memcpy(static_cast<void*>(dst), &raw, sizeof(raw));  // __half / bf16 are trivially copyable
}

template <typename T, int N> FASTMEM_HD void store_vec(T* dst, const T (&src)[N]) {
  static_assert(sizeof(T) * N == sizeof(uint4), "one 128-bit access");
  uint4 raw;
  memcpy(&raw, static_cast<const void*>(src), sizeof(raw));
  *reinterpret_cast<uint4*>(dst) = raw;
}

// This thread's share of one row (columns tid, tid + n_threads, ... in each section).
template <typename T>
FASTMEM_HD RowState<typename AccumOf<T>::type> row_state_partial(const T* row, int64_t n_cols, int64_t label,
                                                                 int tid, int n_threads,
                                                                 typename AccumOf<T>::type softcap) {
  using Acc = typename AccumOf<T>::type;
  constexpr int kVec = VecWidth<T>::value;
  RowState<Acc> s = empty_state<Acc>();
  const RowSplit split = split_row(reinterpret_cast<uintptr_t>(row), n_cols, static_cast<int>(sizeof(T)));
  for (int64_t c = tid; c < split.head; c += n_threads) {
    const Acc z[1] = {cap_logit<Acc>(to_accum(row[c]), softcap)};
    fold_group<Acc, 1>(s, z, c, label);
  }
  for (int64_t v = tid; v < split.n_vec; v += n_threads) {
    const int64_t col0 = split.head + v * kVec;
    T raw[kVec];
    load_vec<T, kVec>(row + col0, raw);
    Acc z[kVec];
FASTMEM_UNROLL
    for (int i = 0; i < kVec; ++i) z[i] = cap_logit<Acc>(to_accum(raw[i]), softcap);
    fold_group<Acc, kVec>(s, z, col0, label);
  }
  for (int64_t c = split.tail_start + tid; c < n_cols; c += n_threads) {
    const Acc z[1] = {cap_logit<Acc>(to_accum(row[c]), softcap)};
    fold_group<Acc, 1>(s, z, c, label);
  }
  return s;
}

// This thread's share of overwriting one row with w dloss/dz, rounded once.
template <typename T>
FASTMEM_HD void softmax_grad_partial(T* row, int64_t n_cols, int64_t label, typename AccumOf<T>::type row_max,
                                     typename AccumOf<T>::type log_sum, typename AccumOf<T>::type weight, int tid,
                                     int n_threads, const GradTerms<typename AccumOf<T>::type>& o) {
  using Acc = typename AccumOf<T>::type;
  constexpr int kVec = VecWidth<T>::value;
  const RowSplit split = split_row(reinterpret_cast<uintptr_t>(row), n_cols, static_cast<int>(sizeof(T)));
  for (int64_t c = tid; c < split.head; c += n_threads) {
    row[c] = from_accum<T>(softmax_grad_value<Acc>(to_accum(row[c]), row_max, log_sum, weight, c == label, o));
  }
  for (int64_t v = tid; v < split.n_vec; v += n_threads) {
    const int64_t col0 = split.head + v * kVec;
    T vals[kVec];
    load_vec<T, kVec>(row + col0, vals);
FASTMEM_UNROLL
    for (int i = 0; i < kVec; ++i) {
      vals[i] = from_accum<T>(softmax_grad_value<Acc>(to_accum(vals[i]), row_max, log_sum, weight, col0 + i == label, o));
    }
    store_vec<T, kVec>(row + col0, vals);
  }
  for (int64_t c = split.tail_start + tid; c < n_cols; c += n_threads) {
    row[c] = from_accum<T>(softmax_grad_value<Acc>(to_accum(row[c]), row_max, log_sum, weight, c == label, o));
  }
}

// This thread's share of zeroing one row (a row of weight 0: its gradient is 0, and the
// gradient GEMM may then take the whole chunk without a host-side list of active rows).
template <typename T> FASTMEM_HD void zero_row_partial(T* row, int64_t n_cols, int tid, int n_threads) {
  for (int64_t c = tid; c < n_cols; c += n_threads) row[c] = from_accum<T>(typename AccumOf<T>::type(0));
}

// Threads per row block: enough for one 128-bit access per thread per sweep of a long row
// (up to 512, so several rows' blocks share an SM), and whole warps (the shuffles use full masks).
constexpr int kMaxRowThreads = 512;

FASTMEM_HD int row_block_threads(int64_t n_cols, int elem_bytes) {
  const int64_t per_vec = kVecBytes / elem_bytes;
  const int64_t vectors = (n_cols + per_vec - 1) / per_vec;
  const int64_t warps = (vectors + 31) / 32;
  const int64_t threads = 32 * (warps < 1 ? 1 : warps);
  return static_cast<int>(threads < kMaxRowThreads ? threads : kMaxRowThreads);
}

}  // namespace fastmem
