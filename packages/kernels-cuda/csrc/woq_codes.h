// Weight-code loads and exact integer-code conversions for the woq_matmul kernels.
//
// int4 codes become exact 16-bit floats two at a time: a code OR-ed into the mantissa of 2^7
// (bf16) or 2^10 (fp16), whose unit in the last place is 1, is 2^e + code exactly, and one
// paired FMA (x * 1 - bias) lands on the code; symmetric nibbles are XOR-ed with 8 first (two's
// complement v -> v + 8), which the bias takes back. int8 codes go to float32 the same way
// under the exponent of 2^23. HIP, which has neither the paired bf16 FMA nor the streaming
// load's cache hints, gets plain integer conversions and __ldg.
#pragma once

#include <type_traits>

#include "dtypes.h"

namespace ds {
namespace woq {

// Weight codes are read exactly once: no L1 allocation, 256-byte L2 lines.
__device__ __forceinline__ uint4 load_codes(const std::uint8_t* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
#else
  return __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

#if !defined(DS_KERNELS_HIP)
// The exact-code magic numbers of a 16-bit float type: 2^7 (bf16) or 2^10 (fp16) with the code
// in its mantissa, plus 8 for symmetric codes, and the bias that subtracts them again.
template <typename T>
struct Half16Codes;

template <>
struct Half16Codes<bf16> {
  static constexpr std::uint32_t kOne = 0x3F803F80u;
  static constexpr std::uint32_t kMagicAsym = 0x43004300u, kMagicSym = 0x43084308u;
  static constexpr std::uint32_t kBiasAsym = 0xC300C300u, kBiasSym = 0xC308C308u;  // -128, -136
};

template <>
struct Half16Codes<__half> {
  static constexpr std::uint32_t kOne = 0x3C003C00u;
  static constexpr std::uint32_t kMagicAsym = 0x64006400u, kMagicSym = 0x64086408u;
  static constexpr std::uint32_t kBiasAsym = 0xE400E400u, kBiasSym = 0xE408E408u;  // -1024, -1032
};

// The tensor-core path's arithmetic on a 16-bit float type T (bf16 or __half): paired FMA,
// mma.m16n8k16 with float32 accumulators, and pair packing. The two types differ only in the
// PTX type of each instruction.
template <typename T>
struct Half16 : Half16Codes<T> {
  static constexpr bool kBf16 = std::is_same<T, bf16>::value;

  __device__ __forceinline__ static std::uint32_t fma2(std::uint32_t a, std::uint32_t b, std::uint32_t c) {
    std::uint32_t d = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kBf16) {
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    } else {
      asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    }
#else
    __trap();
#endif
    return d;
  }

  __device__ __forceinline__ static void mma(float (&d)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                             std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kBf16) {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
#else
    __trap();
#endif
  }

  __device__ __forceinline__ static std::uint32_t pack2(float lo, float hi) {
    if constexpr (kBf16) {
      return pack_bf16x2(lo, hi);
    } else {
      __half2 h = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<std::uint32_t*>(&h);
    }
  }
};

// (a & b) ^ c as one LOP3. Written with two constants, ptxas emits two LOP3s (an instruction
// takes one immediate); as operands here they live in registers set once outside the loops.
// Measured on an H100 (tools/bench/woq_lab.cu, "lop3"): 7% fewer instructions in the M = 1
// kernel, 2-7% faster.
__device__ __forceinline__ std::uint32_t and_xor(std::uint32_t a, std::uint32_t b, std::uint32_t c) {
  std::uint32_t d = 0;
#if defined(__CUDA_ARCH__)
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#endif
  return d;
}

// Eight int4 codes of a word -> four exact pairs (code j, code j + 4), j = 0..3: pairing j
// with j + 4 makes each pair one shift and one LOP3 before the FMA.
template <typename H, bool SYM>
__device__ __forceinline__ void int4_pairs(std::uint32_t q, std::uint32_t (&p)[4]) {
  constexpr std::uint32_t kMagic = SYM ? H::kMagicSym : H::kMagicAsym;
  constexpr std::uint32_t kBias = SYM ? H::kBiasSym : H::kBiasAsym;
#pragma unroll
  for (int j = 0; j < 4; ++j) p[j] = H::fma2(and_xor(q >> (4 * j), 0x000F000Fu, kMagic), H::kOne, kBias);
}
#endif  // !DS_KERNELS_HIP

// Eight int4 codes of a word as floats, in element order.
template <bool SYM>
__device__ __forceinline__ void int4_floats(std::uint32_t q, float (&f)[8]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  std::uint32_t p[4];
  int4_pairs<Half16<bf16>, SYM>(q, p);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[j] = __uint_as_float(p[j] << 16);
    f[j + 4] = __uint_as_float(p[j] & 0xFFFF0000u);
  }
#else
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int v = static_cast<int>((q >> (4 * j)) & 0xFu);
    f[j] = static_cast<float>(SYM ? (v ^ 8) - 8 : v);
  }
#endif
}

// Four int8 codes of a word as floats: a byte placed under the exponent of 2^23 is 2^23 + code
// exactly (one PRMT and one FADD each).
template <bool SYM>
__device__ __forceinline__ void int8_floats(std::uint32_t q, float (&f)[4]) {
#if defined(DS_KERNELS_HIP)
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const std::uint32_t b = (q >> (8 * j)) & 0xFFu;
    f[j] = SYM ? static_cast<float>(static_cast<int>(b ^ 0x80u) - 128) : static_cast<float>(b);
  }
#else
  if (SYM) q ^= 0x80808080u;
  const float bias = SYM ? 8388736.f : 8388608.f;
  f[0] = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7540)) - bias;
  f[1] = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7541)) - bias;
  f[2] = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7542)) - bias;
  f[3] = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7543)) - bias;
#endif
}

}  // namespace woq
}  // namespace ds
