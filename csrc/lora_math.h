// Per-thread pieces of the LoRA dropout kernels (csrc/lora_linear.cu), shared with the host.
//
// The dense GEMMs of the LoRA linear run on cuBLAS; what cuBLAS cannot do is apply the
// dropout mask without materialising it. These kernels are one small tiled GEMM,
//     C[M, N] (+)= alpha * mask? (A[M, K] @ B[K, N]),
// with the keep-mask regenerated from (seed, token row, feature column) on one operand or on
// the output, so nothing of size [tokens, in_features] is stored between forward and backward:
//   forward   xa  = drop(x) A^T             mask on A  (m = token, k = feature)
//   backward  dx += s drop'((dy B) A)       mask on C  (m = token, n = feature)
//             dA  = s (dy B)^T drop(x)      mask on B  (k = token, n = feature), split over tokens
// Each phase of a block (stage a tile to shared memory, accumulate, store) is a function of
// the thread index only, so tests/csrc/lora_host_harness.cpp runs the same code on the host.
// Accumulation is fp32 (fp64 for fp64 inputs); offsets are int64.
#pragma once

#include "ce_math.h"  // FASTMEM_HD, FASTMEM_UNROLL, AccumOf, to_accum, from_accum
#include "fastmem_kernels.h"

namespace fastmem {

// ---- dropout mask: a counter-based hash, the same bits in every kernel and on the host ----

FASTMEM_HD uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Element (row, col) is kept iff its 32 hash bits are >= drop_below = floor(p * 2^32).
FASTMEM_HD bool dropout_keep(uint32_t seed, uint32_t drop_below, int64_t row, int64_t col) {
  const uint64_t z = mix64(mix64((static_cast<uint64_t>(seed) << 32) ^ static_cast<uint64_t>(row)) ^
                           (static_cast<uint64_t>(col) * 0x9E3779B97F4A7C15ull));
  return static_cast<uint32_t>(z >> 32) >= drop_below;
}

enum MaskOn : int { kMaskNone = 0, kMaskA = 1, kMaskB = 2, kMaskC = 3 };

// One GEMM call. A element (m, k) is at a[m * a_rs + k * a_cs], likewise B and C.
template <typename T, typename OutT> struct TileGemm {
  const T* a;
  int64_t a_rs, a_cs;
  const T* b;
  int64_t b_rs, b_cs;
  OutT* c;
  int64_t c_rs, c_cs;
  int64_t c_split_stride;  // split z writes its partial C at c + z * c_split_stride
  int64_t m, n, k;
  int64_t k_per_split;  // the K range of split z is [z * k_per_split, (z + 1) * k_per_split)
  typename AccumOf<T>::type alpha;
  int mask_on;  // MaskOn
  uint32_t seed, drop_below;
  bool accumulate;  // C += result (else C = result)
};

// Block tile 32 x 64, K step 32; 256 threads, each owning a 2 x 4 micro-tile of C.
constexpr int kTileM = 32;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kTileThreads = 256;
constexpr int kMicroM = 2;
constexpr int kMicroN = 4;

template <typename Acc> struct TileSmem {
  Acc a[kTileM][kTileK];
  Acc b[kTileK][kTileN + 1];  // +1: the staging writes down columns of b without bank conflicts
};

template <typename Acc> struct MicroTile {
  Acc v[kMicroM][kMicroN];
};

template <typename Acc> FASTMEM_HD void clear_micro(MicroTile<Acc>& acc) {
FASTMEM_UNROLL
  for (int i = 0; i < kMicroM; ++i) {
FASTMEM_UNROLL
    for (int j = 0; j < kMicroN; ++j) acc.v[i][j] = Acc(0);
  }
}

// Phase 1: thread `tid` stages its share of the A tile (rows m0.., cols k0..) and B tile;
// elements past the matrix or the split's K range stage as 0, dropped ones as 0.
template <typename T, typename OutT>
FASTMEM_HD void stage_tiles(const TileGemm<T, OutT>& g, TileSmem<typename AccumOf<T>::type>& smem, int tid,
                            int64_t m0, int64_t n0, int64_t k0, int64_t k_end) {
  using Acc = typename AccumOf<T>::type;
  for (int e = tid; e < kTileM * kTileK; e += kTileThreads) {
    const int i = e / kTileK, kk = e % kTileK;  // consecutive threads walk k: coalesced for a_cs = 1
    const int64_t m = m0 + i, k = k0 + kk;
    Acc value = Acc(0);
    if (m < g.m && k < k_end) {
      value = to_accum(g.a[m * g.a_rs + k * g.a_cs]);
      if (g.mask_on == kMaskA && !dropout_keep(g.seed, g.drop_below, m, k)) value = Acc(0);
    }
    smem.a[i][kk] = value;
  }
  for (int e = tid; e < kTileK * kTileN; e += kTileThreads) {
    const int kk = e / kTileN, j = e % kTileN;
    const int64_t k = k0 + kk, n = n0 + j;
    Acc value = Acc(0);
    if (k < k_end && n < g.n) {
      value = to_accum(g.b[k * g.b_rs + n * g.b_cs]);
      if (g.mask_on == kMaskB && !dropout_keep(g.seed, g.drop_below, k, n)) value = Acc(0);
    }
    smem.b[kk][j] = value;
  }
}

// Phase 2: the thread's micro-tile += A tile @ B tile.
template <typename Acc> FASTMEM_HD void accumulate_tile(const TileSmem<Acc>& smem, MicroTile<Acc>& acc, int tid) {
  const int row0 = (tid / (kTileN / kMicroN)) * kMicroM;
  const int col0 = (tid % (kTileN / kMicroN)) * kMicroN;
FASTMEM_UNROLL
  for (int kk = 0; kk < kTileK; ++kk) {
    Acc a_vals[kMicroM], b_vals[kMicroN];
FASTMEM_UNROLL
    for (int i = 0; i < kMicroM; ++i) a_vals[i] = smem.a[row0 + i][kk];
FASTMEM_UNROLL
    for (int j = 0; j < kMicroN; ++j) b_vals[j] = smem.b[kk][col0 + j];
FASTMEM_UNROLL
    for (int i = 0; i < kMicroM; ++i) {
FASTMEM_UNROLL
      for (int j = 0; j < kMicroN; ++j) acc.v[i][j] += a_vals[i] * b_vals[j];
    }
  }
}

// Phase 3: write the micro-tile (split z's partial when split over K), rounded once.
template <typename T, typename OutT>
FASTMEM_HD void store_tile(const TileGemm<T, OutT>& g, const MicroTile<typename AccumOf<T>::type>& acc, int tid,
                           int64_t m0, int64_t n0, int64_t split) {
  using Acc = typename AccumOf<T>::type;
  const int row0 = (tid / (kTileN / kMicroN)) * kMicroM;
  const int col0 = (tid % (kTileN / kMicroN)) * kMicroN;
  OutT* c = g.c + split * g.c_split_stride;
FASTMEM_UNROLL
  for (int i = 0; i < kMicroM; ++i) {
FASTMEM_UNROLL
    for (int j = 0; j < kMicroN; ++j) {
      const int64_t m = m0 + row0 + i, n = n0 + col0 + j;
      if (m >= g.m || n >= g.n) continue;
      Acc value = g.alpha * acc.v[i][j];
      if (g.mask_on == kMaskC && !dropout_keep(g.seed, g.drop_below, m, n)) value = Acc(0);
      OutT& out = c[m * g.c_rs + n * g.c_cs];
      if (g.accumulate) value += static_cast<Acc>(to_accum(out));
      out = from_accum<OutT>(value);
    }
  }
}

// ---- host side of a launch (the .cu launcher and the host harness share these) ----

// floor(p * 2^32), the hash threshold below which an element is dropped (p in [0, 1)).
inline uint32_t drop_below_for(double p) {
  const double scaled = p * 4294967296.0;
  if (!(scaled > 0.0)) return 0u;
  return scaled >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(scaled);
}

inline bool lora_gemm_invalid(const fastmem_lora_gemm& p) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.splits < 1) return true;
  if (p.mask_on < kMaskNone || p.mask_on > kMaskC) return true;
  return p.accumulate != 0 && (p.splits > 1 || p.out_accum != 0);  // partials are written, not added
}

template <typename T, typename OutT> TileGemm<T, OutT> tile_gemm_from(const fastmem_lora_gemm& p) {
  using Acc = typename AccumOf<T>::type;
  TileGemm<T, OutT> g;
  g.a = static_cast<const T*>(p.a);
  g.a_rs = p.a_row_stride;
  g.a_cs = p.a_col_stride;
  g.b = static_cast<const T*>(p.b);
  g.b_rs = p.b_row_stride;
  g.b_cs = p.b_col_stride;
  g.c = static_cast<OutT*>(p.c);
  g.c_rs = p.c_row_stride;
  g.c_cs = p.c_col_stride;
  g.c_split_stride = p.c_split_stride;
  g.m = p.m;
  g.n = p.n;
  g.k = p.k;
  g.k_per_split = (p.k + p.splits - 1) / p.splits;
  g.alpha = static_cast<Acc>(p.alpha);
  g.mask_on = p.mask_on;
  g.seed = p.seed;
  g.drop_below = p.drop_below;
  g.accumulate = p.accumulate != 0;
  return g;
}

}  // namespace fastmem
