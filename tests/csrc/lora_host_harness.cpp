// Host build of the LoRA dropout GEMM (csrc/lora_math.h): every block of the launch grid runs
// its 256 threads phase by phase (stage tiles, accumulate, store) as the kernel does between
// its __syncthreads, over the same functions. Built by tests/csrc/test_lora_host_math.py.
#include <vector>

#include "fastmem_kernels.h"
#include "lora_math.h"

namespace {

using namespace fastmem;

template <typename T, typename OutT> void run_grid(const fastmem_lora_gemm& p) {
  using Acc = typename AccumOf<T>::type;
  const TileGemm<T, OutT> g = tile_gemm_from<T, OutT>(p);
  const int64_t blocks_m = (p.m + kTileM - 1) / kTileM;
  const int64_t blocks_n = (p.n + kTileN - 1) / kTileN;
  TileSmem<Acc> smem;
  std::vector<MicroTile<Acc>> acc(kTileThreads);
  for (int64_t split = 0; split < p.splits; ++split) {
    const int64_t k_begin = split * g.k_per_split;
    const int64_t k_end = k_begin + g.k_per_split < g.k ? k_begin + g.k_per_split : g.k;
    for (int64_t bm = 0; bm < blocks_m; ++bm) {
      for (int64_t bn = 0; bn < blocks_n; ++bn) {
        const int64_t m0 = bm * kTileM, n0 = bn * kTileN;
        for (auto& a : acc) clear_micro(a);
        for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
          for (int tid = 0; tid < kTileThreads; ++tid) stage_tiles(g, smem, tid, m0, n0, k0, k_end);
          for (int tid = 0; tid < kTileThreads; ++tid) accumulate_tile(smem, acc[tid], tid);
        }
        for (int tid = 0; tid < kTileThreads; ++tid) store_tile(g, acc[tid], tid, m0, n0, split);
      }
    }
  }
}

}  // namespace

extern "C" {

// Same contract as fastmem_lora_gemm_launch on host pointers: 0, or -1 for invalid parameters.
int fm_host_lora_gemm(const fastmem_lora_gemm* params) {
  if (params == nullptr || lora_gemm_invalid(*params)) return -1;
  const fastmem_lora_gemm& p = *params;
  if (p.m == 0 || p.n == 0) return 0;
  const bool partial = p.out_accum != 0;
  switch (p.dtype) {
    case FASTMEM_FLOAT32: run_grid<float, float>(p); return 0;
    case FASTMEM_FLOAT64: run_grid<double, double>(p); return 0;
    case FASTMEM_FLOAT16: partial ? run_grid<__half, float>(p) : run_grid<__half, __half>(p); return 0;
    case FASTMEM_BFLOAT16:
      partial ? run_grid<__nv_bfloat16, float>(p) : run_grid<__nv_bfloat16, __nv_bfloat16>(p);
      return 0;
  }
  return -1;
}

void fm_host_lora_keep_mask(int8_t* out, int64_t n_rows, int64_t n_cols, uint32_t seed, uint32_t drop_below) {
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t c = 0; c < n_cols; ++c) out[r * n_cols + c] = dropout_keep(seed, drop_below, r, c) ? 1 : 0;
  }
}

uint32_t fm_host_drop_below(double p) { return drop_below_for(p); }

}  // extern "C"
