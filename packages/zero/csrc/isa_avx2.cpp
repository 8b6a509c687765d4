// The AVX2 path (8 floats per vector). CMake compiles this file alone with -mavx2 -mfma
// -mf16c; dispatch.cpp calls it only after CPUID reports all three.
#include <immintrin.h>

#include "element_loops.h"

namespace ds_zero {
namespace {

struct Avx2Ops {
  using V = __m256;
  static constexpr std::int64_t kWidth = 8;
  static V set1(float value) { return _mm256_set1_ps(value); }
  static V load(const float* src) { return _mm256_loadu_ps(src); }
  static V load(const BFloat16Bits* src) {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
  }
  static V load(const Float16Bits* src) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
  static void store(float* dst, V value) { _mm256_storeu_ps(dst, value); }
  static __m128i bfloat16_bits(V value) {
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    rounded = _mm256_srli_epi32(rounded, 16);
    const __m256 is_nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
    rounded = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), is_nan));
    // Every lane is <= 0xFFFF, so the saturating pack is exact.
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  }
  static __m128i float16_bits(V value) {
    return _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store(BFloat16Bits* dst, V value) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), bfloat16_bits(value));
  }
  static void store(Float16Bits* dst, V value) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), float16_bits(value));
  }
  static void stream(BFloat16Bits* dst, V value) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), bfloat16_bits(value));
  }
  static void stream(Float16Bits* dst, V value) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), float16_bits(value));
  }
  static void fence() { _mm_sfence(); }
  static V sqrt(V value) { return _mm256_sqrt_ps(value); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};

}  // namespace

void adam_avx2(const AdamStep& step) { run_step<AdamRange<Avx2Ops>>(step); }

void adagrad_avx2(const AdagradStep& step) { run_step<AdagradRange<Avx2Ops>>(step); }

}  // namespace ds_zero
