// The AVX-512 path (16 floats per vector). CMake compiles this file alone with
// -mavx512f -mfma -mf16c; dispatch.cpp calls it only after CPUID reports them with OS
// support for the 512-bit registers.
#include <immintrin.h>

#include "element_loops.h"

namespace ds_zero {
namespace {

struct Avx512Ops {
  using V = __m512;
  static constexpr std::int64_t kWidth = 16;
  static V set1(float value) { return _mm512_set1_ps(value); }
  static V load(const float* src) { return _mm512_loadu_ps(src); }
  static V load(const BFloat16Bits* src) {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
  }
  static V load(const Float16Bits* src) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }
  static void store(float* dst, V value) { _mm512_storeu_ps(dst, value); }
  static __m256i bfloat16_bits(V value) {
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    rounded = _mm512_srli_epi32(rounded, 16);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(is_nan, rounded, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
  }
  static __m256i float16_bits(V value) {
    return _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store(BFloat16Bits* dst, V value) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bfloat16_bits(value));
  }
  static void store(Float16Bits* dst, V value) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), float16_bits(value));
  }
  static void stream(BFloat16Bits* dst, V value) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), bfloat16_bits(value));
  }
  static void stream(Float16Bits* dst, V value) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), float16_bits(value));
  }
  static void fence() { _mm_sfence(); }
  static V sqrt(V value) { return _mm512_sqrt_ps(value); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};

}  // namespace

void adam_avx512(const AdamStep& step) { run_step<AdamRange<Avx512Ops>>(step); }

void adagrad_avx512(const AdagradStep& step) { run_step<AdagradRange<Avx512Ops>>(step); }

}  // namespace ds_zero
