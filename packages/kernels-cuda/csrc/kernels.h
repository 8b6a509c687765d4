// Host entry points of every kernel. They take raw device addresses, sizes, dtype codes
// (dtypes.h) and a stream handle, never a framework tensor, so the extension links no
// libtorch and one build serves every torch version. Each returns nullptr on success or a
// message naming what went wrong; the bindings raise it as a Python exception.
//
// Callers (the Python wrappers) guarantee: tensors are contiguous, on the current device,
// of the stated dtypes and sizes; workspaces are float32 of the stated shapes.
#pragma once

#include <cstdint>

namespace ds {

using Ptr = std::uintptr_t;

// ---- optimizers -------------------------------------------------------------------------
// `tensor_table` is a device int64 array of `num_tensors` rows:
//   [param, grad, exp_avg, exp_avg_sq, param_copy (0 = none), numel, first_chunk]
// where first_chunk is the prefix sum of ceil(numel / kAdamChunk) over earlier rows.
constexpr std::int64_t kAdamChunk = 16384;
constexpr int kAdamTableColumns = 7;

// beta and 1 - beta both arrive rounded from double: 1 - float(0.999) would be off by 1e-5.
struct AdamHyper {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  float bias_correction1, bias_correction2;  // 1 - beta^step, computed by the caller
  float grad_scale;                           // multiplies every gradient (loss-scale undo)
  bool decoupled;                             // AdamW (true) or L2-regularised Adam
};

const char* adam_step(Ptr tensor_table, std::int64_t num_tensors, std::int64_t total_chunks,
                      int param_dtype, int grad_dtype, int copy_dtype, bool vectorized,
                      const AdamHyper& hyper, std::uintptr_t stream);

// LAMB (DeepSpeed FusedLamb's meaning) over the same table as Adam. `workspace` is a float32
// device array of lamb_workspace_floats(num_tensors, total_chunks) elements, zero before the
// first call; the kernels leave it ready for the next call. Two launches: moments and
// per-tensor norms (the last block of each tensor turns them into its trust ratio), then
// the update scaled by step_size * trust ratio. No host synchronisation.
struct LambHyper {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  float step_size;             // lr * sqrt(1 - beta2^step) / (1 - beta1^step), or lr
  float max_coeff, min_coeff;  // the trust ratio is clamped to max_coeff, then to >= min_coeff
  bool eps_inside_sqrt;        // sqrt(v + eps) instead of sqrt(v) + eps
};

constexpr std::int64_t lamb_workspace_floats(std::int64_t num_tensors, std::int64_t total_chunks) {
  return 2 * total_chunks + 2 * num_tensors;  // per-chunk sums, trust ratios, arrival counters
}

const char* lamb_step(Ptr tensor_table, Ptr workspace, std::int64_t num_tensors,
                      std::int64_t total_chunks, int param_dtype, int grad_dtype, int copy_dtype,
                      bool vectorized, const LambHyper& hyper, std::uintptr_t stream);

// ---- normalisation ----------------------------------------------------------------------
// y = norm(x) * weight (+ bias) over the last dimension; LayerNorm when `rms` is false.
// mean/rstd (float32, one per row) are written when non-zero. weight and bias share w_dtype,
// which is x_dtype or float32.
const char* norm_forward(Ptr x, Ptr weight, Ptr bias, Ptr y, Ptr mean, Ptr rstd,
                         std::int64_t rows, std::int64_t hidden, float eps, bool rms,
                         int x_dtype, int w_dtype, std::uintptr_t stream);

// Writes dx and per-block partial sums of dweight (and dbias unless zero) into float32
// workspaces of shape [num_partials, hidden]; reduce them with column_sum.
const char* norm_backward(Ptr dy, Ptr x, Ptr weight, Ptr dx, Ptr dweight_partial,
                          Ptr dbias_partial, std::int64_t rows, std::int64_t hidden, float eps,
                          bool rms, int num_partials, int x_dtype, int w_dtype,
                          std::uintptr_t stream);

// out[c] = sum over r < rows of partial[r, c], converted to out_dtype.
const char* column_sum(Ptr partial, Ptr out, std::int64_t rows, std::int64_t columns,
                       int out_dtype, std::uintptr_t stream);

// column_sum of two partials (LayerNorm's dweight and dbias), in one launch when the two
// outputs share a dtype.
const char* column_sum2(Ptr partial0, Ptr out0, int out0_dtype, Ptr partial1, Ptr out1, int out1_dtype,
                        std::int64_t rows, std::int64_t columns, std::uintptr_t stream);

// Largest hidden size the register-resident norm kernels accept; `vectorized` when hidden
// is a multiple of 16 bytes' worth of elements and every row start is 16-byte aligned.
std::int64_t norm_max_hidden(bool vectorized);

// How many partial rows norm_backward should use: as many blocks as fit on the GPU at once
// (at most `rows`). Shared-memory accumulators make this depend on hidden and the dtypes.
const char* norm_backward_partials(std::int64_t rows, std::int64_t hidden, bool rms, int x_dtype,
                                   int w_dtype, int* partials);

// ---- activations ------------------------------------------------------------------------
// SwiGLU over x = [gate | up] (last dim 2*hidden): y = silu(gate) * up.
const char* swiglu_forward(Ptr x, Ptr y, std::int64_t rows, std::int64_t hidden, int dtype,
                           std::uintptr_t stream);
const char* swiglu_backward(Ptr dy, Ptr x, Ptr dx, std::int64_t rows, std::int64_t hidden,
                            int dtype, std::uintptr_t stream);

// y = gelu(x + bias); tanh approximation when `tanh_approx`, exact erf otherwise.
const char* bias_gelu_forward(Ptr x, Ptr bias, Ptr y, std::int64_t rows, std::int64_t hidden,
                              bool tanh_approx, int dtype, std::uintptr_t stream);
// dx, and per-block partial sums of dbias ([num_partials, hidden] float32) for column_sum;
// bias_gelu_backward_partials gives the num_partials that fills the device in one wave.
const char* bias_gelu_backward_partials(std::int64_t rows, std::int64_t hidden, bool tanh_approx, int dtype,
                                        int* partials);
const char* bias_gelu_backward(Ptr dy, Ptr x, Ptr bias, Ptr dx, Ptr dbias_partial,
                               std::int64_t rows, std::int64_t hidden, int num_partials,
                               bool tanh_approx, int dtype, std::uintptr_t stream);

// ---- mixture of experts (moe.cu: gating, moe_rows.cu: rows) -----------------------------
// Index tensors are int32 [tokens, k] (k choices per token); a choice is kept when its expert
// is in [0, experts) and its position in [0, capacity); buffer row = expert * capacity + position.
constexpr int kMoeMaxExperts = 256;
constexpr int kMoeMaxK = 8;
constexpr int kMoeGatingTokensPerBlock = 128;

// Softmax over `experts` logits per token and its top k (ties to the lower expert index),
// with positions counted choice-major then token-major; -1 at or beyond capacity. Outputs:
// expert_index, position (int32 [tokens, k]), gate_weight (float32 [tokens, k], renormalised
// over the k when `normalize`), expert_counts (int32 [experts], before dropping), mean_prob
// (float32 [experts]). Workspaces: block_counts int32 [blocks, k, experts] and prob_partial
// float32 [blocks, experts], blocks = ceil(tokens / kMoeGatingTokensPerBlock).
const char* moe_topk_gating(Ptr logits, std::int64_t tokens, int experts, int k, int capacity,
                            bool normalize, int dtype, Ptr expert_index, Ptr gate_weight, Ptr position,
                            Ptr expert_counts, Ptr mean_prob, Ptr block_counts, Ptr prob_partial,
                            std::uintptr_t stream);
// sources[row] = token * k + j for the choice that takes each buffer row; the caller fills
// sources (int32 [experts * capacity]) with -1 first.
const char* moe_slot_sources(Ptr expert_index, Ptr position, std::int64_t assignments, int experts,
                             int capacity, Ptr sources, std::uintptr_t stream);
// out[row] = scale[source] * rows[source / k] (a bit-exact copy when scale is 0), zero where
// sources[row] < 0; rows, out [*, hidden] of one dtype, scale float32 [tokens * k].
const char* moe_gather_rows(Ptr rows, Ptr sources, Ptr scale, int k, std::int64_t slots,
                            std::int64_t hidden, Ptr out, int dtype, std::uintptr_t stream);
// out[t] = sum over kept j of weight[t, j] * buffer[row(t, j)] in float32 (weight 0: all ones).
const char* moe_combine_rows(Ptr buffer, Ptr expert_index, Ptr position, Ptr weight, std::int64_t tokens,
                             int k, int experts, int capacity, std::int64_t hidden, Ptr out, int dtype,
                             std::uintptr_t stream);
// grad_gate[t, j] = <grad_out[t], buffer[row(t, j)]> (float32), zero for a dropped choice.
const char* moe_gate_grad(Ptr grad_out, Ptr buffer, Ptr expert_index, Ptr position, std::int64_t tokens,
                          int k, int experts, int capacity, std::int64_t hidden, Ptr grad_gate, int dtype,
                          std::uintptr_t stream);

// ---- block-wise quantisation ------------------------------------------------------------
// Groups of `group_size` consecutive elements (32, 64, 128 or 256; the last group may be
// short) share one float32 scale (and, when asymmetric, one float32 offset = group min).
// Symmetric: q = clamp(rint(x / scale), -qmax, qmax), scale = absmax / qmax,
//   qmax = 127 (int8) or 7 (int4); int8 codes are stored as int8.
// Asymmetric: q = clamp(rint((x - min) / scale), 0, qmax), scale = (max - min) / qmax,
//   qmax = 255 or 15; stored as uint8.
// int4 codes are packed two per byte, element 2i in the low nibble, as 4-bit two's
// complement when symmetric. A zero scale quantises the group to zeros.
const char* quantize_blockwise(Ptr x, Ptr codes, Ptr scales, Ptr offsets, std::int64_t numel,
                               int group_size, int bits, bool symmetric, int dtype,
                               std::uintptr_t stream);
const char* dequantize_blockwise(Ptr codes, Ptr scales, Ptr offsets, Ptr y, std::int64_t numel,
                                 int group_size, int bits, bool symmetric, int dtype,
                                 std::uintptr_t stream);

// ---- losses -----------------------------------------------------------------------------
// Cross-entropy of each row of `logits` ([rows, vocab], row r at logits + r * row_stride
// elements, unit column stride) against int64 `target`, with s = label_smoothing:
//   loss[r] = lse[r] - (1 - s) x[r, t] - s / vocab * sum_j x[r, j]   (float32, as is lse)
// and the row overwritten in place with grad_scale * (softmax(x) - (1 - s) onehot(t) - s / vocab).
// A row whose target is ignore_index gets loss 0 and zeros; a target outside [0, vocab)
// gets a NaN loss and a NaN row. lse is written for every row.
const char* cross_entropy_fwd_bwd(Ptr logits, std::int64_t row_stride, Ptr target, Ptr loss, Ptr lse,
                                  std::int64_t rows, std::int64_t vocab, std::int64_t ignore_index,
                                  float label_smoothing, float grad_scale, int dtype, std::uintptr_t stream);

// ---- fp8 block quantisation ------------------------------------------------------------
// Groups of `group_size` consecutive elements (32, 64, 128 or 256; the last may be short)
// share one float32 scale = amax / fp8_max (448 for e4m3, 57344 for e5m2); codes are
// x * (1 / scale) rounded to nearest even with saturation to +-fp8_max; a zero scale gives
// zero codes. fp8_format: 0 = e4m3 (OCP "fn", no infinities), 1 = e5m2. Compiled for CUDA
// only; under HIP both return an error (fp8_compiled() says which).
bool fp8_compiled();
const char* quantize_fp8(Ptr x, Ptr codes, Ptr scales, std::int64_t numel, int group_size,
                         int fp8_format, int dtype, std::uintptr_t stream);
const char* dequantize_fp8(Ptr codes, Ptr scales, Ptr y, std::int64_t numel, int group_size,
                           int fp8_format, int dtype, std::uintptr_t stream);

// ---- losses -----------------------------------------------------------------------------
// Cross-entropy of each row of `logits` ([rows, vocab], row r at logits + r * row_stride
// elements, unit column stride) against int64 `target`, with s = label_smoothing:
//   loss[r] = lse[r] - (1 - s) x[r, t] - s / vocab * sum_j x[r, j]   (float32, as is lse)
// and the row overwritten in place with grad_scale * (softmax(x) - (1 - s) onehot(t) - s / vocab).
// A row whose target is ignore_index gets loss 0 and zeros; a target outside [0, vocab)
// gets a NaN loss and a NaN row. lse is written for every row.
const char* cross_entropy_fwd_bwd(Ptr logits, std::int64_t row_stride, Ptr target, Ptr loss, Ptr lse,
                                  std::int64_t rows, std::int64_t vocab, std::int64_t ignore_index,
                                  float label_smoothing, float grad_scale, int dtype, std::uintptr_t stream);

// ---- weight-only quantized matmul (woq_matmul.cu) ------------------------------------------
// y[m, n] = sum_k x[m, k] * w[n, k] for decoding (1 <= m <= kWoqMaxRows), accumulated in float32;
// x [m, k] and y [m, n] of `dtype`, 16-byte aligned. w is block-quantized along k as
// quantize_blockwise stores it, one row after another (k a multiple of group_size):
// codes [n, k * bits / 8] bytes, scales and (asymmetric only) offsets float32 [n, k / group_size];
// w = code * scale (+ offset).
constexpr int kWoqMaxRows = 4;
const char* woq_matmul(Ptr x, Ptr codes, Ptr scales, Ptr offsets, Ptr y, std::int64_t m, std::int64_t n,
                       std::int64_t k, int group_size, int bits, bool symmetric, int dtype, std::uintptr_t stream);

}  // namespace ds
