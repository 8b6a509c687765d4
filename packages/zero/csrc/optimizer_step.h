// The arguments of one optimizer update over a contiguous fp32 parameter buffer, and the
// entry points of each instruction-set path.
//
// Everything here is plain data and raw pointers: the extension never links libtorch, so
// one build serves every torch version. Python computes the step-dependent scalars (bias
// corrections, learning-rate schedule) exactly as torch.optim does and passes them in;
// the element loops only stream memory.
#pragma once

#include <cstdint>

namespace ds_zero {

// Storage format of a gradient or low-precision copy buffer. The values are exported to
// Python (DTYPE_* attributes of the module) so the two sides cannot drift apart.
enum class Format : int { kNone = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Instruction-set paths, in increasing order of preference.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Distinct types for 16-bit storage so the kernels can overload on them.
struct BFloat16Bits {
  std::uint16_t bits;
};
struct Float16Bits {
  std::uint16_t bits;
};

// One Adam or AdamW update, mirroring torch.optim.Adam's single-tensor formula:
//   g  = grad * grad_multiplier + l2_weight_decay * param
//   p  = param * param_decay
//   m  = lerp(m, g, one_minus_beta1);  v = v * beta2 + one_minus_beta2 * g * g
//   p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
// Adam (L2) sets l2_weight_decay = wd and param_decay = 1; AdamW (decoupled) sets
// l2_weight_decay = 0 and param_decay = 1 - lr * wd.
struct AdamStep {
  float* param;
  const void* grad;
  Format grad_format;
  float* exp_avg;
  float* exp_avg_sq;
  void* copy;  // low-precision copy of the updated parameters, or nullptr
  Format copy_format;
  std::int64_t numel;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float step_size;
  float bias_correction2_sqrt;
  float l2_weight_decay;
  float param_decay;
  float grad_multiplier;
};

// One Adagrad update, mirroring torch.optim.Adagrad:
//   g = grad * grad_multiplier + weight_decay * param;  sum += g * g
//   p -= clr * g / (sqrt(sum) + eps)
struct AdagradStep {
  float* param;
  const void* grad;
  Format grad_format;
  float* sum;
  void* copy;
  Format copy_format;
  std::int64_t numel;
  float clr;
  float eps;
  float weight_decay;
  float grad_multiplier;
};

void adam_scalar(const AdamStep& step);
void adagrad_scalar(const AdagradStep& step);
#if DS_ZERO_X86_PATHS
void adam_avx2(const AdamStep& step);
void adagrad_avx2(const AdagradStep& step);
void adam_avx512(const AdamStep& step);
void adagrad_avx512(const AdagradStep& step);
#endif

// Runtime selection (dispatch.cpp).
bool isa_supported(Isa isa);
Isa best_isa();
const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* out);
void run_adam(Isa isa, const AdamStep& step);
void run_adagrad(Isa isa, const AdagradStep& step);
int max_threads();

}  // namespace ds_zero
