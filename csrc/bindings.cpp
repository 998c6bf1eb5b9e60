// The only torch-facing file of the CUDA extension: registers the `fastmem_cuda::` custom
// ops (so torch.compile sees them as opaque ops with fake impls), checks tensors, allocates
// outputs and calls the torch-free launchers of fastmem_kernels.h on the current stream.
//
// The schemas below must equal SCHEMAS in fastmem/ops/cross_entropy/backend_cuda.py and
// fastmem/ops/lora_linear_cuda.py (where the fake impls live); tests/csrc checks that they do.
#include <algorithm>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "fastmem_kernels.h"

namespace {

fastmem_dtype logits_dtype(const at::Tensor& logits) {  // the element type of any float operand
  switch (logits.scalar_type()) {
    case at::kFloat: return FASTMEM_FLOAT32;
    case at::kHalf: return FASTMEM_FLOAT16;
    case at::kBFloat16: return FASTMEM_BFLOAT16;
    case at::kDouble: return FASTMEM_FLOAT64;
    default: break;
  }
  TORCH_CHECK(false, "fastmem_cuda: logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
}

// Per-row outputs and inputs are fp32, or fp64 for fp64 logits.
at::ScalarType accum_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_chunk(const char* op, const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must have shape [rows, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one column, got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1, op, ": logits must have column stride 1, got strides ",
              logits.strides());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), op,
              ": logits rows must not overlap, got strides ", logits.strides(), " for shape ", logits.sizes());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.is_contiguous(), op,
              ": labels must be a contiguous [rows] = [", logits.size(0), "] tensor, got ", labels.sizes());
}

void check_row_vector(const char* op, const char* name, const at::Tensor& values, const at::Tensor& logits) {
  TORCH_CHECK(values.device() == logits.device(), op, ": ", name, " is on ", values.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(values.scalar_type() == accum_type(logits), op, ": ", name, " must be ", accum_type(logits),
              " for ", logits.scalar_type(), " logits, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == logits.size(0) && values.is_contiguous(), op, ": ", name,
              " must be a contiguous [rows] = [", logits.size(0), "] tensor, got ", values.sizes());
}

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(status));
}

void check_options(const char* op, double softcap, double label_smoothing, double lse_square_scale) {
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be >= 0 (0: off), got ", softcap);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(lse_square_scale >= 0.0, op, ": lse_square_scale must be >= 0, got ", lse_square_scale);
}

// -> (row_max, log_sum, target, best_other, sum_z, entropy), each [rows]; lse = row_max + log_sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_row_stats(
    const at::Tensor& logits, const at::Tensor& labels, double softcap) {
  constexpr const char* op = "fastmem_cuda::ce_row_stats";
  check_chunk(op, logits, labels);
  check_options(op, softcap, 0.0, 0.0);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const auto options = logits.options().dtype(accum_type(logits));
  const int64_t rows = logits.size(0);
  at::Tensor row_max = at::empty({rows}, options);
  at::Tensor log_sum = at::empty({rows}, options);
  at::Tensor target = at::empty({rows}, options);
  at::Tensor best_other = at::empty({rows}, options);
  at::Tensor sum_z = at::empty({rows}, options);
  at::Tensor entropy = at::empty({rows}, options);
  check_launch(op, fastmem_ce_row_stats(logits_dtype(logits), logits.data_ptr(), rows, logits.size(1),
                                        logits.stride(0), labels.data_ptr<int64_t>(), row_max.data_ptr(),
                                        log_sum.data_ptr(), target.data_ptr(), best_other.data_ptr(),
                                        sum_z.data_ptr(), entropy.data_ptr(), softcap,
                                        c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()));
  return std::make_tuple(row_max, log_sum, target, best_other, sum_z, entropy);
}

void ce_softmax_grad_(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_max,
                      const at::Tensor& log_sum, const at::Tensor& weight, double softcap, double label_smoothing,
                      double lse_square_scale) {
  constexpr const char* op = "fastmem_cuda::ce_softmax_grad_";
  check_chunk(op, logits, labels);
  check_options(op, softcap, label_smoothing, lse_square_scale);
  check_row_vector(op, "row_max", row_max, logits);
  check_row_vector(op, "log_sum", log_sum, logits);
  check_row_vector(op, "weight", weight, logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  check_launch(op, fastmem_ce_softmax_grad(logits_dtype(logits), logits.data_ptr(), logits.size(0), logits.size(1),
                                           logits.stride(0), labels.data_ptr<int64_t>(), row_max.data_ptr(),
                                           log_sum.data_ptr(), weight.data_ptr(),
                                           fastmem_ce_options{softcap, label_smoothing, lse_square_scale},
                                           c10::cuda::getCurrentCUDAStream(logits.device().index()).stream()));
}

// ---- LoRA dropout GEMMs (csrc/lora_linear.cu): the mask comes from (seed, token, feature) ----

void check_lora_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must be ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
}

fastmem_lora_gemm lora_gemm_params(const char* op, const at::Tensor& x, int64_t seed, double p, double alpha,
                                   int mask_on) {
  TORCH_CHECK(seed >= 0 && seed <= 4294967295ll, op, ": seed must be in [0, 2^32), got ", seed);
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  fastmem_lora_gemm g{};
  g.dtype = logits_dtype(x);
  g.splits = 1;
  g.alpha = alpha;
  g.mask_on = mask_on;
  g.seed = static_cast<uint32_t>(seed);
  g.drop_below = fastmem_lora_drop_below(p);
  return g;
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// scale * drop(x) @ lora_A^T: x [N, I], lora_A [r, I] -> [N, r] in x's dtype (x read once).
at::Tensor lora_dropout_project(const at::Tensor& x, const at::Tensor& lora_A, int64_t seed, double p, double scale) {
  constexpr const char* op = "fastmem_cuda::lora_dropout_project";
  check_lora_operand(op, "x", x, x);
  check_lora_operand(op, "lora_A", lora_A, x);
  TORCH_CHECK(lora_A.size(1) == x.size(1), op, ": lora_A ", lora_A.sizes(), " does not match x ", x.sizes());
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor xa = at::empty({x.size(0), lora_A.size(0)}, x.options());
  fastmem_lora_gemm g = lora_gemm_params(op, x, seed, p, scale, /*mask on A*/ 1);
  g.a = x.data_ptr(), g.a_row_stride = x.stride(0), g.a_col_stride = x.stride(1);
  g.b = lora_A.data_ptr(), g.b_row_stride = lora_A.stride(1), g.b_col_stride = lora_A.stride(0);
  g.c = xa.data_ptr(), g.c_row_stride = xa.stride(0), g.c_col_stride = xa.stride(1);
  g.m = x.size(0), g.n = lora_A.size(0), g.k = x.size(1);
  check_launch(op, fastmem_lora_gemm_launch(&g, stream_of(x)));
  return xa;
}

// out += alpha * drop(c @ d): out [N, I], c [N, r], d [r, I] (dx's LoRA term, mask on the output).
void lora_dropout_expand_(at::Tensor& out, const at::Tensor& c, const at::Tensor& d, int64_t seed, double p,
                          double alpha) {
  constexpr const char* op = "fastmem_cuda::lora_dropout_expand_";
  check_lora_operand(op, "out", out, out);
  check_lora_operand(op, "c", c, out);
  check_lora_operand(op, "d", d, out);
  TORCH_CHECK(c.size(0) == out.size(0) && d.size(1) == out.size(1) && c.size(1) == d.size(0), op,
              ": shapes out ", out.sizes(), ", c ", c.sizes(), ", d ", d.sizes(), " do not chain");
  const c10::cuda::CUDAGuard device_guard(out.device());
  fastmem_lora_gemm g = lora_gemm_params(op, out, seed, p, alpha, /*mask on C*/ 3);
  g.a = c.data_ptr(), g.a_row_stride = c.stride(0), g.a_col_stride = c.stride(1);
  g.b = d.data_ptr(), g.b_row_stride = d.stride(0), g.b_col_stride = d.stride(1);
  g.c = out.data_ptr(), g.c_row_stride = out.stride(0), g.c_col_stride = out.stride(1);
  g.m = out.size(0), g.n = out.size(1), g.k = c.size(1);
  g.accumulate = 1;
  check_launch(op, fastmem_lora_gemm_launch(&g, stream_of(out)));
}

// alpha * c^T @ drop(x): c [N, r], x [N, I] -> [r, I] float32 (float64 for float64 inputs),
// the token reduction split in parts (fp32 partials, summed here) so small r still fills the GPU.
at::Tensor lora_dropout_rank_grad(const at::Tensor& c, const at::Tensor& x, int64_t seed, double p, double alpha) {
  constexpr const char* op = "fastmem_cuda::lora_dropout_rank_grad";
  check_lora_operand(op, "x", x, x);
  check_lora_operand(op, "c", c, x);
  TORCH_CHECK(c.size(0) == x.size(0), op, ": c ", c.sizes(), " and x ", x.sizes(), " must have the same rows");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rank = c.size(1), n_cols = x.size(1), n_rows = x.size(0);
  const int64_t splits = std::min<int64_t>(64, std::max<int64_t>(1, (n_rows + 1023) / 1024));
  at::Tensor partial = at::empty({splits, rank, n_cols}, x.options().dtype(accum_type(x)));
  fastmem_lora_gemm g = lora_gemm_params(op, x, seed, p, alpha, /*mask on B*/ 2);
  g.a = c.data_ptr(), g.a_row_stride = c.stride(1), g.a_col_stride = c.stride(0);
  g.b = x.data_ptr(), g.b_row_stride = x.stride(0), g.b_col_stride = x.stride(1);
  g.c = partial.data_ptr(), g.c_row_stride = n_cols, g.c_col_stride = 1, g.c_split_stride = rank * n_cols;
  g.m = rank, g.n = n_cols, g.k = n_rows, g.splits = splits;
  g.out_accum = 1;
  check_launch(op, fastmem_lora_gemm_launch(&g, stream_of(x)));
  return splits == 1 ? partial.squeeze(0) : partial.sum(0);
}

// int8 [n_rows, n_cols] keep-mask (1 = kept) on like's device.
at::Tensor lora_keep_mask(const at::Tensor& like, int64_t n_rows, int64_t n_cols, int64_t seed, double p) {
  constexpr const char* op = "fastmem_cuda::lora_keep_mask";
  TORCH_CHECK(like.is_cuda(), op, ": like must be a CUDA tensor, got ", like.device());
  TORCH_CHECK(n_rows >= 0 && n_cols >= 0, op, ": n_rows and n_cols must be >= 0");
  const fastmem_lora_gemm g = lora_gemm_params(op, like, seed, p, 1.0, 0);
  const c10::cuda::CUDAGuard device_guard(like.device());
  at::Tensor out = at::empty({n_rows, n_cols}, like.options().dtype(at::kChar));
  check_launch(op, fastmem_lora_keep_mask(out.data_ptr<int8_t>(), n_rows, n_cols, g.seed, g.drop_below,
                                          stream_of(like)));
  return out;
}

}  // namespace

TORCH_LIBRARY(fastmem_cuda, m) {
  // torch.compile finds the fake (shape-only) impls by importing this module.
  m.set_python_module("fastmem.ops.cross_entropy.backend_cuda");
  m.def("ce_row_stats(Tensor logits, Tensor labels, float softcap) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ce_softmax_grad_(Tensor(a!) logits, Tensor labels, Tensor row_max, Tensor log_sum, Tensor weight, float softcap, float label_smoothing, float lse_square_scale) -> ()");
  m.set_python_module("fastmem.ops.lora_linear_cuda");
  m.def("lora_dropout_project(Tensor x, Tensor lora_A, int seed, float p, float scale) -> Tensor");
  m.def("lora_dropout_expand_(Tensor(a!) out, Tensor c, Tensor d, int seed, float p, float alpha) -> ()");
  m.def("lora_dropout_rank_grad(Tensor c, Tensor x, int seed, float p, float alpha) -> Tensor");
  m.def("lora_keep_mask(Tensor like, int n_rows, int n_cols, int seed, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmem_cuda, CUDA, m) {
  m.impl("ce_row_stats", &ce_row_stats);
  m.impl("ce_softmax_grad_", &ce_softmax_grad_);
  m.impl("lora_dropout_project", &lora_dropout_project);
  m.impl("lora_dropout_expand_", &lora_dropout_expand_);
  m.impl("lora_dropout_rank_grad", &lora_dropout_rank_grad);
  m.impl("lora_keep_mask", &lora_keep_mask);
}

// Importing the module (prebuilt `fastmem._cuda_ext` or the JIT build) runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastmem CUDA kernels; the ops are torch.ops.fastmem_cuda.*";
}
