// LoRA dropout kernels: the GEMMs whose operand or output carries the dropout mask, the mask
// regenerated in-kernel from (seed, token row, feature column) instead of stored. The dense
// GEMMs without a mask (x W^T, dy W, dy B, dy^T xa) run on cuBLAS; see lora_math.h.
#include "fastmem_kernels.h"
#include "lora_math.h"

namespace fastmem {
namespace {

template <typename T, typename OutT>
__global__ void __launch_bounds__(kTileThreads) lora_tile_gemm_kernel(TileGemm<T, OutT> g) {
  using Acc = typename AccumOf<T>::type;
  __shared__ TileSmem<Acc> smem;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * g.k_per_split;
  const int64_t k_end = k_begin + g.k_per_split < g.k ? k_begin + g.k_per_split : g.k;
  MicroTile<Acc> acc;
  clear_micro(acc);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    stage_tiles(g, smem, tid, m0, n0, k0, k_end);
    __syncthreads();
    accumulate_tile(smem, acc, tid);
    __syncthreads();  // the next stage overwrites the tiles
  }
  store_tile(g, acc, tid, m0, n0, split);
}

__global__ void lora_keep_mask_kernel(int8_t* __restrict__ out, int64_t n_rows, int64_t n_cols, uint32_t seed,
                                      uint32_t drop_below) {
  const int64_t total = n_rows * n_cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = dropout_keep(seed, drop_below, e / n_cols, e % n_cols) ? 1 : 0;
  }
}

constexpr int64_t kMaxGridX = (1ll << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

template <typename T, typename OutT> cudaError_t launch_tile_gemm(const fastmem_lora_gemm& p, cudaStream_t stream) {
  const TileGemm<T, OutT> g = tile_gemm_from<T, OutT>(p);
  const int64_t blocks_m = (p.m + kTileM - 1) / kTileM;
  const int64_t blocks_n = (p.n + kTileN - 1) / kTileN;
  if (blocks_m > kMaxGridX || blocks_n > kMaxGridYZ || p.splits > kMaxGridYZ) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_n), static_cast<unsigned>(p.splits));
  lora_tile_gemm_kernel<T, OutT><<<grid, kTileThreads, 0, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace
}  // namespace fastmem

extern "C" cudaError_t fastmem_lora_gemm_launch(const fastmem_lora_gemm* params, cudaStream_t stream) {
  using namespace fastmem;
  if (params == nullptr) return cudaErrorInvalidValue;
  const fastmem_lora_gemm& p = *params;
  if (lora_gemm_invalid(p)) return cudaErrorInvalidValue;
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const bool partial = p.out_accum != 0;  // C holds fp32 (fp64) partials instead of `dtype`
  switch (p.dtype) {
    case FASTMEM_FLOAT32: return launch_tile_gemm<float, float>(p, stream);
    case FASTMEM_FLOAT64: return launch_tile_gemm<double, double>(p, stream);
    case FASTMEM_FLOAT16:
      return partial ? launch_tile_gemm<__half, float>(p, stream) : launch_tile_gemm<__half, __half>(p, stream);
    case FASTMEM_BFLOAT16:
      return partial ? launch_tile_gemm<__nv_bfloat16, float>(p, stream)
                     : launch_tile_gemm<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t fastmem_lora_keep_mask(int8_t* out, int64_t n_rows, int64_t n_cols, uint32_t seed,
                                              uint32_t drop_below, cudaStream_t stream) {
  if (n_rows < 0 || n_cols < 0) return cudaErrorInvalidValue;
  const int64_t total = n_rows * n_cols;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  fastmem::lora_keep_mask_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(
      out, n_rows, n_cols, seed, drop_below);
  return cudaGetLastError();
}

extern "C" uint32_t fastmem_lora_drop_below(double p) { return fastmem::drop_below_for(p); }
