// Design variants of the int4 decode kernel (woq_matmul at M = 1: symmetric codes, groups of
// 128, bf16 x), for timing only: tools/bench/woq_lab.py builds this file with nvcc, times every
// variant against cuBLAS bf16 and checks each against float64. It is how the shipping design
// in packages/kernels-cuda/csrc/woq_matmul.cu was chosen, and it keeps the evidence: a read
// floor (the same loads, no arithmetic) and the variants that lost. Tensor-core variants live
// in woq_lab_tc.cuh, copy-engine (cp.async.bulk) variants in woq_lab_bulk.cuh.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

__device__ __forceinline__ uint4 load_codes(const std::uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ std::uint32_t fma2_bf16(std::uint32_t a, std::uint32_t b, std::uint32_t c) {
  std::uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}


// (a & b) ^ c in one LOP3 with every operand a register: given two immediates, ptxas splits
// it into two LOP3s (an instruction takes one immediate).
__device__ __forceinline__ std::uint32_t and_xor(std::uint32_t a, std::uint32_t b, std::uint32_t c) {
  std::uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// CONV 0 and 3: below. CONV 1: fp32 mantissa magic (code in the mantissa of 1.0 at two positions, two accumulators).
// CONV 2: no math (XOR of the words): the read floor of the same access pattern.
template <int CONV>
struct Conv;

// CONV 0 and 3: bf16 magic pairs made exact by a paired FMA, unpacked to fp32, one FFMA a
// code; the pair's mask and magic take two LOP3s (two immediates, CONV 0, as ptxas emits the
// plain expression) or one (register operands, CONV 3).
template <bool kOneLop3>
struct Bf16Pairs {
  struct Acc {
    float d = 0.f;
  };
  __device__ __forceinline__ static void word(std::uint32_t q, const float (&x)[8], Acc& a) {
    float f[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::uint32_t e = kOneLop3 ? and_xor(q >> (4 * j), 0x000F000Fu, 0x43084308u)
                                       : ((q >> (4 * j)) & 0x000F000Fu) ^ 0x43084308u;
      const std::uint32_t p = fma2_bf16(e, 0x3F803F80u, 0xC308C308u);
      f[j] = __uint_as_float(p << 16);
      f[j + 4] = __uint_as_float(p & 0xFFFF0000u);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) a.d = fmaf(f[j], x[j], a.d);
  }
  __device__ __forceinline__ static float finish(const Acc& a, float) { return a.d; }
  static constexpr bool kNeedsCorr = false;
};

template <>
struct Conv<0> : Bf16Pairs<false> {};

template <>
struct Conv<3> : Bf16Pairs<true> {};

template <>
struct Conv<1> {
  struct Acc {
    float lo = 0.f, hi = 0.f;  // codes at mantissa bits 15-18 (x 2^-8) and 19-22 (x 2^-4)
  };
  __device__ __forceinline__ static void word(std::uint32_t q, const float (&x)[8], Acc& a) {
    q ^= 0x88888888u;  // two's complement nibble v -> v + 8 in [0, 15]
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // codes 2j (-> bits 15..18) and 2j + 1 (-> bits 19..22)
      const std::uint32_t t = __funnelshift_l(q, q, (15 - 8 * j) & 31);
      a.lo = fmaf(__uint_as_float((t & 0x00078000u) | 0x3F800000u), x[2 * j], a.lo);
      a.hi = fmaf(__uint_as_float((t & 0x00780000u) | 0x3F800000u), x[2 * j + 1], a.hi);
    }
  }
  // sum x v = 256 (lo - Se) + 16 (hi - So) - 8 (Se + So); corr = 264 Se + 24 So.
  __device__ __forceinline__ static float finish(const Acc& a, float corr) {
    return fmaf(256.f, a.lo, fmaf(16.f, a.hi, -corr));
  }
  static constexpr bool kNeedsCorr = true;
};

template <>
struct Conv<2> {
  struct Acc {
    std::uint32_t v = 0;
  };
  __device__ __forceinline__ static void word(std::uint32_t q, const float (&)[8], Acc& a) { a.v ^= q; }
  __device__ __forceinline__ static float finish(const Acc& a, float) { return __uint_as_float(a.v & 0x3FFFFFFFu); }
  static constexpr bool kNeedsCorr = false;
};


struct Args {
  const std::uint16_t* x;
  const std::uint8_t* codes;
  const float* scales;
  std::uint16_t* y;
  int n, k;
};

template <int R, int U>
struct Stage {
  uint4 w[U][R];
  float s[U][R];
};

template <int R, int U>
__device__ __forceinline__ void load_stage(Stage<R, U>& st, const Args& a, const std::uint8_t* const (&wrow)[R],
                                           const int (&rown)[R], int c0, int chunks, int groups, int stride = 32) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + stride * u;
    if (c < chunks) {
      const int grp = c >> 2;  // 32 codes a chunk, 128 a group
#pragma unroll
      for (int r = 0; r < R; ++r) {
        st.w[u][r] = load_codes(wrow[r] + static_cast<std::size_t>(c) * 16);
        st.s[u][r] = __ldg(a.scales + static_cast<std::size_t>(rown[r]) * groups + grp);
      }
    }
  }
}

template <int R, int U, int CONV>
__device__ __forceinline__ void compute_stage(const Stage<R, U>& st, const Args& a, int c0, int chunks,
                                              float (&acc)[R], int stride = 32) {
  using C = Conv<CONV>;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + stride * u;
    if (c >= chunks) continue;
    typename C::Acc part[R];
    float even = 0.f, odd = 0.f;
    const uint4* xp = reinterpret_cast<const uint4*>(a.x + static_cast<std::size_t>(c) * 32);
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const uint4 xv = __ldg(xp + step);
      const std::uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
      float xf[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        xf[2 * j] = __uint_as_float(xw[j] << 16);
        xf[2 * j + 1] = __uint_as_float(xw[j] & 0xFFFF0000u);
      }
      if constexpr (C::kNeedsCorr) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          even += xf[2 * j];
          odd += xf[2 * j + 1];
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const std::uint32_t* words = reinterpret_cast<const std::uint32_t*>(&st.w[u][r]);
        C::word(words[step], xf, part[r]);
      }
    }
    const float corr = C::kNeedsCorr ? fmaf(264.f, even, 24.f * odd) : 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = fmaf(st.s[u][r], C::finish(part[r], corr), acc[r]);
  }
}

__device__ __forceinline__ std::uint16_t to_bf16(float v) {
  std::uint32_t u = __float_as_uint(v);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

// SIMT M=1: R rows a warp, K split over KS warps of a block (interleaved chunks; KS = 1: a warp
// owns its rows), partial sums met in shared memory; U chunks a row in flight, PIPE loads the
// next ones before the math of these.
template <int R, int U, int WARPS, int KS, int MINB, bool PIPE, int CONV>
__global__ void __launch_bounds__(WARPS * 32, MINB) gemv_ks(Args a) {
  constexpr int kGroups = WARPS / KS;
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5, rg = wib / KS, ks = wib % KS;
  const int row0 = (blockIdx.x * kGroups + rg) * R;
  const std::size_t row_bytes = static_cast<std::size_t>(a.k) / 2;
  const int groups = a.k >> 7, chunks = a.k >> 5;
  const std::uint8_t* wrow[R];
  int rown[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rown[r] = min(row0 + r, a.n - 1);
    wrow[r] = a.codes + rown[r] * row_bytes;
  }
  float acc[R] = {};
  Stage<R, U> cur;
  constexpr int kStride = 32 * KS;
  if constexpr (PIPE) load_stage(cur, a, wrow, rown, ks * 32 + lane, chunks, groups, kStride);
  for (int c0 = ks * 32 + lane; c0 < chunks; c0 += kStride * U) {
    if constexpr (PIPE) {
      Stage<R, U> next;
      load_stage(next, a, wrow, rown, c0 + kStride * U, chunks, groups, kStride);
      compute_stage<R, U, CONV>(cur, a, c0, chunks, acc, kStride);
      cur = next;
    } else {
      load_stage(cur, a, wrow, rown, c0, chunks, groups, kStride);
      compute_stage<R, U, CONV>(cur, a, c0, chunks, acc, kStride);
    }
  }
  __shared__ float partial[WARPS][R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    if (lane == 0) partial[wib][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < kGroups * R) {
    const int g = threadIdx.x / R, r = threadIdx.x % R, row = (blockIdx.x * kGroups + g) * R + r;
    float total = 0.f;
#pragma unroll
    for (int s = 0; s < KS; ++s) total += partial[g * KS + s][r];
    if (row < a.n) a.y[row] = to_bf16(total);
  }
}

template <int R, int U, int WARPS, int KS, int MINB, bool PIPE = false, int CONV = 0>
void launch_ks(const Args& a, cudaStream_t s) {
  const int rows = WARPS / KS * R;
  gemv_ks<R, U, WARPS, KS, MINB, PIPE, CONV><<<(a.n + rows - 1) / rows, WARPS * 32, 0, s>>>(a);
}

#include "woq_lab_tc.cuh"
#include "woq_lab_bulk.cuh"

__global__ void empty_kernel(Args) {}

using Launch = void (*)(const Args&, cudaStream_t);

void launch_empty(const Args& a, cudaStream_t s) { empty_kernel<<<(a.n + 7) / 8, 128, 0, s>>>(a); }

struct Variant {
  const char* name;
  Launch fn;
};

// Names: R rows a warp, U chunks a row in flight, "pipe" loads the next chunks before the math
// of these, ksN splits K over N warps of a block (wW warps a block, bB resident blocks asked
// for), "f32" turns codes into floats in the fp32 mantissa, "tc" runs mma.m16n8k16 (W warps
// a block splitting K; "magic" feeds the codes as 136 + v with one LOP3 a pair; "tc1" stages x
// in shared memory and takes one k-block a step with cN accumulator chains; "tcb" puts 8 weight
// rows in the mma's B), "lop3" makes each code pair's mask-and-magic one LOP3 with register
// operands (ptxas splits two immediates), "bulk" streams 16-row tiles into shared memory with
// the copy engine (sN: N k-blocks a row a copy; "floor" only waits for the data). Shipped:
// "tc W16 / W8 / W4 U1 lop3" (the most warps a tile that keep the grid to one wave), and
// "ks2 R2 U1 lop3" where tensor cores are not taken (int8, small groups, fp32 x, HIP).
const Variant kVariants[] = {
    {"empty kernel", launch_empty},
    {"read floor R2 U2", launch_ks<2, 2, 4, 1, 4, false, 2>},
    {"R2 U2 (shipped to 2026-11-26)", launch_ks<2, 2, 4, 1, 4, false, 0>},
    {"ks2 R2 U1", launch_ks<2, 1, 4, 2, 7>},
    {"ks2 R2 U1 lop3 (SIMT shipped)", launch_ks<2, 1, 4, 2, 7, false, 3>},
    {"R2 U2 pipe", launch_ks<2, 2, 4, 1, 4, true, 0>},
    {"R2 U4", launch_ks<2, 4, 4, 1, 4, false, 0>},
    {"R4 U2 pipe", launch_ks<4, 2, 4, 1, 4, true, 0>},
    {"R2 U2 pipe, 8 blocks", launch_ks<2, 2, 4, 1, 8, true, 0>},
    {"f32 R2 U2", launch_ks<2, 2, 4, 1, 4, false, 1>},
    {"f32 R4 U2 pipe", launch_ks<4, 2, 4, 1, 4, true, 1>},
    {"ks2 R2 U1 pipe lop3", launch_ks<2, 1, 4, 2, 7, true, 3>},
    {"ks2 R3 U1 pipe lop3", launch_ks<3, 1, 4, 2, 5, true, 3>},
    {"ks2 R4 U1 pipe lop3", launch_ks<4, 1, 4, 2, 4, true, 3>},
    {"ks3 R2 U1 w6", launch_ks<2, 1, 6, 3, 4>},
    {"ks4 R2 U1 w8", launch_ks<2, 1, 8, 4, 3>},
    {"tc W8 U4 lop3", launch_tc<8, 4, false, 2>},
    {"tc magic W8 U2 lop3", launch_tc<8, 2, true, 2>},
    {"tc magic W4 U4 lop3, 4 blocks", launch_tc<4, 4, true, 4>},
    {"tc magic W8 U1 lop3, 4 blocks", launch_tc<8, 1, true, 4>},
    {"tc W8 U1 lop3, 4 blocks", launch_tc<8, 1, false, 4>},
    {"tc W16 U1 lop3, 2 blocks", launch_tc<16, 1, false, 2>},
    {"tc W16 U2 lop3, 2 blocks", launch_tc<16, 2, false, 2>},
    {"tc W4 U1 lop3, 8 blocks", launch_tc<4, 1, false, 8>},
    {"tc W4 U2 lop3, 8 blocks", launch_tc<4, 2, false, 8>},
    {"tcb W8 U2, 4 blocks", launch_tcb<8, 2, 4>},
    {"tc1 W8 c2, 4 blocks", launch_tc1<8, false, 2, 4>},
    {"tc1 W8 c4 pipe, 4 blocks", launch_tc1<8, true, 4, 4>},
    {"tc1 W8 c2 pipe, 3 blocks", launch_tc1<8, true, 2, 3>},
    {"bulk floor W8 s8", launch_bulk<8, 8, true, 1>},
    {"bulk floor W8 s32, 2 blocks", launch_bulk<8, 32, true, 2>},
    {"bulk tc magic W16 s32", launch_bulk<16, 32, false, 1>},
    {"bulk tc magic W8 s32, 2 blocks", launch_bulk<8, 32, false, 2>},
};

}  // namespace

extern "C" int woq_lab_count() { return sizeof(kVariants) / sizeof(kVariants[0]); }
extern "C" const char* woq_lab_name(int i) { return kVariants[i].name; }
extern "C" int woq_lab_run(int i, std::uintptr_t x, std::uintptr_t codes, std::uintptr_t scales, std::uintptr_t y,
                           int n, int k, std::uintptr_t stream) {
  const Args a{reinterpret_cast<const std::uint16_t*>(x), reinterpret_cast<const std::uint8_t*>(codes),
               reinterpret_cast<const float*>(scales), reinterpret_cast<std::uint16_t*>(y), n, k};
  kVariants[i].fn(a, reinterpret_cast<cudaStream_t>(stream));
  return static_cast<int>(cudaGetLastError());
}
