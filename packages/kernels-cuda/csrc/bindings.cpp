// Python bindings of the kernel launchers (module `_C`). Plain host C++: addresses arrive
// as Python ints, so this file needs neither torch nor a GPU vendor header. A launcher's
// error message becomes a RuntimeError.
#include <pybind11/pybind11.h>

#include <string>

#include "kernels.h"

namespace py = pybind11;

#ifndef DS_KERNELS_PLATFORM
#define DS_KERNELS_PLATFORM "unknown"
#endif
#ifndef DS_KERNELS_ARCHITECTURES
#define DS_KERNELS_ARCHITECTURES "unknown"
#endif
#ifndef DS_KERNELS_COMPILER
#define DS_KERNELS_COMPILER "unknown"
#endif

namespace {

void check(const char* error, const char* op) {
  if (error != nullptr) throw std::runtime_error(std::string(op) + ": " + error);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ds fused kernels: launchers taking device addresses, sizes, dtype codes, a stream";
  using ds::Ptr;
  using std::int64_t;
  using Stream = std::uintptr_t;

  m.def("build_info", [] {
    py::dict info;
    info["platform"] = DS_KERNELS_PLATFORM;
    info["architectures"] = DS_KERNELS_ARCHITECTURES;
    info["compiler"] = DS_KERNELS_COMPILER;
    return info;
  });
  m.attr("ADAM_CHUNK") = ds::kAdamChunk;
  m.attr("ADAM_TABLE_COLUMNS") = ds::kAdamTableColumns;

  m.def("adam_step",
        [](Ptr table, int64_t num_tensors, int64_t total_chunks, int param_dtype, int grad_dtype,
           int copy_dtype, bool vectorized, double lr, double beta1, double beta2, double eps,
           double weight_decay, double bias_correction1, double bias_correction2, double grad_scale,
           bool decoupled, Stream stream) {
          const ds::AdamHyper hyper{static_cast<float>(lr), static_cast<float>(beta1),
                                    static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
                                    static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                                    static_cast<float>(weight_decay),
                                    static_cast<float>(bias_correction1),
                                    static_cast<float>(bias_correction2),
                                    static_cast<float>(grad_scale), decoupled};
          check(ds::adam_step(table, num_tensors, total_chunks, param_dtype, grad_dtype, copy_dtype,
                              vectorized, hyper, stream),
                "adam_step");
        });

  m.def("lamb_step",
        [](Ptr table, Ptr workspace, int64_t num_tensors, int64_t total_chunks, int param_dtype, int grad_dtype,
           int copy_dtype, bool vectorized, double beta1, double beta2, double eps, double weight_decay,
           double step_size, double max_coeff, double min_coeff, bool eps_inside_sqrt, Stream stream) {
          const ds::LambHyper hyper{static_cast<float>(beta1), static_cast<float>(beta2),
                                    static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                                    static_cast<float>(eps), static_cast<float>(weight_decay),
                                    static_cast<float>(step_size), static_cast<float>(max_coeff),
                                    static_cast<float>(min_coeff), eps_inside_sqrt};
          check(ds::lamb_step(table, workspace, num_tensors, total_chunks, param_dtype, grad_dtype, copy_dtype,
                              vectorized, hyper, stream),
                "lamb_step");
        });
  m.def("lamb_workspace_floats", &ds::lamb_workspace_floats);

  m.def("norm_forward", [](Ptr x, Ptr w, Ptr b, Ptr y, Ptr mean, Ptr rstd, int64_t rows,
                           int64_t hidden, float eps, bool rms, int x_dtype, int w_dtype, Stream s) {
    check(ds::norm_forward(x, w, b, y, mean, rstd, rows, hidden, eps, rms, x_dtype, w_dtype, s), "norm_forward");
  });
  m.def("norm_backward", [](Ptr dy, Ptr x, Ptr w, Ptr dx, Ptr dw_partial, Ptr db_partial, int64_t rows,
                            int64_t hidden, float eps, bool rms, int num_partials, int x_dtype,
                            int w_dtype, Stream s) {
    check(ds::norm_backward(dy, x, w, dx, dw_partial, db_partial, rows, hidden, eps, rms, num_partials,
                            x_dtype, w_dtype, s),
          "norm_backward");
  });
  m.def("column_sum", [](Ptr partial, Ptr out, int64_t rows, int64_t columns, int out_dtype, Stream s) {
    check(ds::column_sum(partial, out, rows, columns, out_dtype, s), "column_sum");
  });
  m.def("column_sum2", [](Ptr partial0, Ptr out0, int out0_dtype, Ptr partial1, Ptr out1, int out1_dtype,
                          int64_t rows, int64_t columns, Stream s) {
    check(ds::column_sum2(partial0, out0, out0_dtype, partial1, out1, out1_dtype, rows, columns, s), "column_sum2");
  });
  m.def("norm_max_hidden", &ds::norm_max_hidden);
  m.def("norm_backward_partials", [](int64_t rows, int64_t hidden, bool rms, int x_dtype, int w_dtype) {
    int partials = 0;
    check(ds::norm_backward_partials(rows, hidden, rms, x_dtype, w_dtype, &partials), "norm_backward_partials");
    return partials;
  });

  m.def("swiglu_forward", [](Ptr x, Ptr y, int64_t rows, int64_t hidden, int dtype, Stream s) {
    check(ds::swiglu_forward(x, y, rows, hidden, dtype, s), "swiglu_forward");
  });
  m.def("swiglu_backward", [](Ptr dy, Ptr x, Ptr dx, int64_t rows, int64_t hidden, int dtype, Stream s) {
    check(ds::swiglu_backward(dy, x, dx, rows, hidden, dtype, s), "swiglu_backward");
  });
  m.def("bias_gelu_forward", [](Ptr x, Ptr bias, Ptr y, int64_t rows, int64_t hidden, bool tanh_approx,
                                int dtype, Stream s) {
    check(ds::bias_gelu_forward(x, bias, y, rows, hidden, tanh_approx, dtype, s), "bias_gelu_forward");
  });
  m.def("bias_gelu_backward_partials", [](int64_t rows, int64_t hidden, bool tanh_approx, int dtype) {
    int partials = 0;
    check(ds::bias_gelu_backward_partials(rows, hidden, tanh_approx, dtype, &partials), "bias_gelu_backward_partials");
    return partials;
  });
  m.def("bias_gelu_backward", [](Ptr dy, Ptr x, Ptr bias, Ptr dx, Ptr dbias_partial, int64_t rows,
                                 int64_t hidden, int num_partials, bool tanh_approx, int dtype, Stream s) {
    check(ds::bias_gelu_backward(dy, x, bias, dx, dbias_partial, rows, hidden, num_partials, tanh_approx,
                                 dtype, s),
          "bias_gelu_backward");
  });

  m.attr("MOE_MAX_EXPERTS") = ds::kMoeMaxExperts;
  m.attr("MOE_MAX_K") = ds::kMoeMaxK;
  m.attr("MOE_GATING_TOKENS_PER_BLOCK") = ds::kMoeGatingTokensPerBlock;
  m.def("moe_topk_gating", [](Ptr logits, int64_t tokens, int experts, int k, int capacity, bool normalize,
                              int dtype, Ptr expert_index, Ptr gate_weight, Ptr position, Ptr expert_counts,
                              Ptr mean_prob, Ptr block_counts, Ptr prob_partial, Stream s) {
    check(ds::moe_topk_gating(logits, tokens, experts, k, capacity, normalize, dtype, expert_index, gate_weight,
                              position, expert_counts, mean_prob, block_counts, prob_partial, s),
          "moe_topk_gating");
  });
  m.def("moe_slot_sources", [](Ptr expert_index, Ptr position, int64_t assignments, int experts, int capacity,
                               Ptr sources, Stream s) {
    check(ds::moe_slot_sources(expert_index, position, assignments, experts, capacity, sources, s),
          "moe_slot_sources");
  });
  m.def("moe_gather_rows", [](Ptr rows, Ptr sources, Ptr scale, int k, int64_t slots, int64_t hidden, Ptr out,
                              int dtype, Stream s) {
    check(ds::moe_gather_rows(rows, sources, scale, k, slots, hidden, out, dtype, s), "moe_gather_rows");
  });
  m.def("moe_combine_rows", [](Ptr buffer, Ptr expert_index, Ptr position, Ptr weight, int64_t tokens, int k,
                               int experts, int capacity, int64_t hidden, Ptr out, int dtype, Stream s) {
    check(ds::moe_combine_rows(buffer, expert_index, position, weight, tokens, k, experts, capacity, hidden, out,
                               dtype, s),
          "moe_combine_rows");
  });
  m.def("moe_gate_grad", [](Ptr grad_out, Ptr buffer, Ptr expert_index, Ptr position, int64_t tokens, int k,
                            int experts, int capacity, int64_t hidden, Ptr grad_gate, int dtype, Stream s) {
    check(ds::moe_gate_grad(grad_out, buffer, expert_index, position, tokens, k, experts, capacity, hidden,
                            grad_gate, dtype, s),
          "moe_gate_grad");
  });

  m.def("quantize_blockwise", [](Ptr x, Ptr codes, Ptr scales, Ptr offsets, int64_t numel, int group_size,
                                 int bits, bool symmetric, int dtype, Stream s) {
    check(ds::quantize_blockwise(x, codes, scales, offsets, numel, group_size, bits, symmetric, dtype, s),
          "quantize_blockwise");
  });
  m.def("dequantize_blockwise", [](Ptr codes, Ptr scales, Ptr offsets, Ptr y, int64_t numel, int group_size,
                                   int bits, bool symmetric, int dtype, Stream s) {
    check(ds::dequantize_blockwise(codes, scales, offsets, y, numel, group_size, bits, symmetric, dtype, s),
          "dequantize_blockwise");
  });
  m.attr("WOQ_MAX_ROWS") = ds::kWoqMaxRows;
  m.def("woq_matmul", [](Ptr x, Ptr codes, Ptr scales, Ptr offsets, Ptr y, int64_t m_rows, int64_t n, int64_t k,
                         int group_size, int bits, bool symmetric, int dtype, Stream s) {
    check(ds::woq_matmul(x, codes, scales, offsets, y, m_rows, n, k, group_size, bits, symmetric, dtype, s),
          "woq_matmul");
  });

  m.def("cross_entropy_fwd_bwd", [](Ptr logits, int64_t row_stride, Ptr target, Ptr loss, Ptr lse, int64_t rows,
                                    int64_t vocab, int64_t ignore_index, float label_smoothing, float grad_scale,
                                    int dtype, Stream s) {
    check(ds::cross_entropy_fwd_bwd(logits, row_stride, target, loss, lse, rows, vocab, ignore_index,
                                    label_smoothing, grad_scale, dtype, s),
          "cross_entropy_fwd_bwd");
  });

  m.def("fp8_compiled", &ds::fp8_compiled);
  m.def("quantize_fp8", [](Ptr x, Ptr codes, Ptr scales, int64_t numel, int group_size, int fp8_format, int dtype,
                           Stream s) {
    check(ds::quantize_fp8(x, codes, scales, numel, group_size, fp8_format, dtype, s), "quantize_fp8");
  });
  m.def("dequantize_fp8", [](Ptr codes, Ptr scales, Ptr y, int64_t numel, int group_size, int fp8_format, int dtype,
                             Stream s) {
    check(ds::dequantize_fp8(codes, scales, y, numel, group_size, fp8_format, dtype, s), "dequantize_fp8");
  });
}
