// The Adam and Adagrad element loops, written once over a vector "Ops" type and compiled
// by each instruction-set file with its own target flags.
//
// Why everything lives in an anonymous namespace: the same template instantiated in the
// scalar file and in the AVX-512 file would otherwise be one weak symbol, and the linker
// could hand the AVX-512 copy to the scalar path, which then crashes on older CPUs.
// Internal linkage gives every file its own copy. For the same reason these loops use
// no standard-library templates, only compiler builtins and intrinsics.
//
// The files are compiled with -ffp-contract=off and the math uses only correctly rounded
// IEEE operations (add, mul, div, sqrt, and fused multiply-add where written), so every
// path produces bit-identical results. The operation order follows torch's CPU kernels
// (fma in add-with-alpha, lerp and addcmul; addcdiv as self + (value * t1) / t2), so
// results equal torch.optim's except where torch's vectorised sqrt (not correctly
// rounded) differs by an ulp.
//
// An Ops type provides: V (a float vector, or float), kWidth, set1(float), load() from
// float / BFloat16Bits / Float16Bits pointers, store() to the same, stream() (a
// non-temporal store to BFloat16Bits / Float16Bits at a vector-aligned address) and
// fence(), sqrt(V) and fma(a, b, c) = a * b + c rounded once. V must support + - * / (GCC and Clang vector
// extensions do for __m256 and __m512).
#pragma once

#include <cstdint>

#include "optimizer_step.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ds_zero {
namespace {

struct NoCopy {};

// fp32 -> bf16 with round-to-nearest-even and a canonical NaN, as torch rounds.
inline std::uint16_t bfloat16_bits_from_float(float value) {
  std::uint32_t bits;
  __builtin_memcpy(&bits, &value, sizeof(bits));
  if (value != value) return 0x7FC0;
  const std::uint32_t rounding_bias = 0x7FFF + ((bits >> 16) & 1);
  return static_cast<std::uint16_t>((bits + rounding_bias) >> 16);
}

struct ScalarOps {
  using V = float;
  static constexpr std::int64_t kWidth = 1;
  static V set1(float value) { return value; }
  static V load(const float* src) { return *src; }
  static V load(const BFloat16Bits* src) {
    const std::uint32_t bits = static_cast<std::uint32_t>(src->bits) << 16;
    float value;
    __builtin_memcpy(&value, &bits, sizeof(value));
    return value;
  }
  static V load(const Float16Bits* src) {
    _Float16 half;
    __builtin_memcpy(&half, src, sizeof(half));
    return static_cast<float>(half);
  }
  static void store(float* dst, V value) { *dst = value; }
  static void store(BFloat16Bits* dst, V value) { dst->bits = bfloat16_bits_from_float(value); }
  static void store(Float16Bits* dst, V value) {
    const _Float16 half = static_cast<_Float16>(value);
    __builtin_memcpy(dst, &half, sizeof(half));
  }
  template <class H>
  static void stream(H* dst, V value) {
    store(dst, value);
  }
  static void fence() {}
  static V sqrt(V value) { return __builtin_sqrtf(value); }
  static V fma(V a, V b, V c) { return __builtin_fmaf(a, b, c); }
};

// Writes the low-precision copy. Nothing reads the copy during the step (it goes to the
// accelerator afterwards), so when the buffer is aligned for it the vector paths use
// non-temporal stores: they skip reading each destination line into cache first, which
// saves 2 of the 32 bytes an update with a copy would otherwise move per parameter.
template <class Ops, class C>
class CopyWriter {
 public:
  CopyWriter(C* copy, std::int64_t begin)
      : copy_(copy),
        stream_(reinterpret_cast<std::uintptr_t>(copy + begin) % (Ops::kWidth * sizeof(C)) == 0) {}
  CopyWriter(const CopyWriter&) = delete;
  CopyWriter& operator=(const CopyWriter&) = delete;
  // Non-temporal stores are weakly ordered: fence them before the step returns and
  // anyone (another thread, a DMA engine) reads the copy.
  ~CopyWriter() {
    if (stream_) Ops::fence();
  }
  void write(std::int64_t i, typename Ops::V value) const {
    if (stream_) {
      Ops::stream(copy_ + i, value);
    } else {
      Ops::store(copy_ + i, value);
    }
  }

 private:
  C* copy_;
  bool stream_;
};

template <class Ops>
class CopyWriter<Ops, NoCopy> {
 public:
  CopyWriter(NoCopy*, std::int64_t) {}
  void write(std::int64_t, typename Ops::V) const {}
};

// Work is handed to the OpenMP threads in chunks of this many elements (128 KB of each
// fp32 stream): small enough that a thread delayed by another process (a data loader,
// the copy engine's driver thread) leaves its share to the others instead of stalling the
// step, large enough that the hardware prefetchers stay trained within a chunk. Chunks
// start on multiples of 64 elements, so no cache line is shared between threads.
constexpr std::int64_t kChunkElements = 1 << 15;

// Runs body(begin, end) over [0, n), chunk by chunk on the OpenMP threads.
template <class Body>
void for_each_chunk(std::int64_t n, const Body& body) {
#if defined(_OPENMP)
  if (n > kChunkElements) {
    const std::int64_t chunks = (n + kChunkElements - 1) / kChunkElements;
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
      const std::int64_t begin = chunk * kChunkElements;
      body(begin, begin + kChunkElements < n ? begin + kChunkElements : n);
    }
    return;
  }
#endif
  body(0, n);
}

template <class Ops, class G, class C>
void adam_range(const AdamStep& s, const G* grad, C* copy, std::int64_t begin, std::int64_t end) {
  using V = typename Ops::V;
  const V one_minus_beta1 = Ops::set1(s.one_minus_beta1);
  const V beta2 = Ops::set1(s.beta2), one_minus_beta2 = Ops::set1(s.one_minus_beta2);
  const V eps = Ops::set1(s.eps), step_size = Ops::set1(s.step_size);
  const V bias_correction2_sqrt = Ops::set1(s.bias_correction2_sqrt);
  const V l2 = Ops::set1(s.l2_weight_decay), decay = Ops::set1(s.param_decay);
  const V multiplier = Ops::set1(s.grad_multiplier);
  // Like torch, skip the L2 term when it is zero: 0 * inf would turn an inf param to NaN.
  const bool has_l2 = s.l2_weight_decay != 0.0f;
  const CopyWriter<Ops, C> copy_writer(copy, begin);
  std::int64_t i = begin;
  for (; i + Ops::kWidth <= end; i += Ops::kWidth) {
    V p = Ops::load(s.param + i);
    V g = Ops::load(grad + i) * multiplier;
    if (has_l2) g = Ops::fma(l2, p, g);
    p = p * decay;
    V m = Ops::load(s.exp_avg + i);
    m = Ops::fma(one_minus_beta1, g - m, m);
    V v = Ops::load(s.exp_avg_sq + i);
    v = Ops::fma(one_minus_beta2 * g, g, v * beta2);
    const V denom = Ops::sqrt(v) / bias_correction2_sqrt + eps;
    p = p - step_size * m / denom;
    Ops::store(s.exp_avg + i, m);
    Ops::store(s.exp_avg_sq + i, v);
    Ops::store(s.param + i, p);
    copy_writer.write(i, p);
  }
  if constexpr (Ops::kWidth > 1) {
    if (i < end) adam_range<ScalarOps, G, C>(s, grad, copy, i, end);
  }
}

template <class Ops, class G, class C>
void adagrad_range(const AdagradStep& s, const G* grad, C* copy, std::int64_t begin,
                   std::int64_t end) {
  using V = typename Ops::V;
  const V clr = Ops::set1(s.clr), eps = Ops::set1(s.eps);
  const V weight_decay = Ops::set1(s.weight_decay), multiplier = Ops::set1(s.grad_multiplier);
  const bool has_weight_decay = s.weight_decay != 0.0f;
  const CopyWriter<Ops, C> copy_writer(copy, begin);
  std::int64_t i = begin;
  for (; i + Ops::kWidth <= end; i += Ops::kWidth) {
    V p = Ops::load(s.param + i);
    V g = Ops::load(grad + i) * multiplier;
    if (has_weight_decay) g = Ops::fma(weight_decay, p, g);
    V sum = Ops::load(s.sum + i);
    sum = Ops::fma(g, g, sum);
    const V std_dev = Ops::sqrt(sum) + eps;
    p = p - clr * g / std_dev;
    Ops::store(s.sum + i, sum);
    Ops::store(s.param + i, p);
    copy_writer.write(i, p);
  }
  if constexpr (Ops::kWidth > 1) {
    if (i < end) adagrad_range<ScalarOps, G, C>(s, grad, copy, i, end);
  }
}

template <class Ops>
struct AdamRange {
  template <class G, class C>
  static void run(const AdamStep& s, const G* grad, C* copy, std::int64_t b, std::int64_t e) {
    adam_range<Ops, G, C>(s, grad, copy, b, e);
  }
};

template <class Ops>
struct AdagradRange {
  template <class G, class C>
  static void run(const AdagradStep& s, const G* grad, C* copy, std::int64_t b, std::int64_t e) {
    adagrad_range<Ops, G, C>(s, grad, copy, b, e);
  }
};

// Picks the template instance for the step's gradient and copy formats, then threads it.
template <class Range, class Step, class G>
void run_with_grad(const Step& s, const G* grad) {
  const auto threaded = [&](auto* copy) {
    for_each_chunk(s.numel, [&](std::int64_t b, std::int64_t e) {
      Range::run(s, grad, copy, b, e);
    });
  };
  switch (s.copy_format) {
    case Format::kBFloat16:
      threaded(static_cast<BFloat16Bits*>(s.copy));
      break;
    case Format::kFloat16:
      threaded(static_cast<Float16Bits*>(s.copy));
      break;
    default:
      threaded(static_cast<NoCopy*>(nullptr));
      break;
  }
}

template <class Range, class Step>
void run_step(const Step& s) {
  switch (s.grad_format) {
    case Format::kBFloat16:
      run_with_grad<Range>(s, static_cast<const BFloat16Bits*>(s.grad));
      break;
    case Format::kFloat16:
      run_with_grad<Range>(s, static_cast<const Float16Bits*>(s.grad));
      break;
    default:
      run_with_grad<Range>(s, static_cast<const float*>(s.grad));
      break;
  }
}

}  // namespace
}  // namespace ds_zero
