// Runtime choice of the instruction-set path. The vector files are compiled with their
// own target flags and are only ever called after CPUID (with the OS's register-state
// check, which GCC's and Clang's __builtin_cpu_supports perform) says they can run.
#include <cstring>
#include <initializer_list>

#include "optimizer_step.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ds_zero {

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if DS_ZERO_X86_PATHS
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#endif
    default:
      return false;
  }
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

void run_adam(Isa isa, const AdamStep& step) {
  switch (isa) {
#if DS_ZERO_X86_PATHS
    case Isa::kAvx512:
      adam_avx512(step);
      return;
    case Isa::kAvx2:
      adam_avx2(step);
      return;
#endif
    default:
      adam_scalar(step);
  }
}

void run_adagrad(Isa isa, const AdagradStep& step) {
  switch (isa) {
#if DS_ZERO_X86_PATHS
    case Isa::kAvx512:
      adagrad_avx512(step);
      return;
    case Isa::kAvx2:
      adagrad_avx2(step);
      return;
#endif
    default:
      adagrad_scalar(step);
  }
}

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace ds_zero
