// Block-wise int8/int4 quantisation and dequantisation (symmetric and asymmetric).
//
// Quantize: a chunk is 16 consecutive elements, so a group of G elements is G/16 neighbouring lanes
// of one warp and its absmax (or min and max) is a few shuffles; x is read once, codes and
// the per-group scale/offset written once. Each thread takes one step: kChunks chunks, 256
// chunks apart, all loads issued before any arithmetic, and the grid covers the tensor.
// Measured on an H100 (bf16, 2^27 elements, % of device-to-device copy bandwidth):
// quantize int8 with one chunk per thread 97-98% at group sizes 32-256 (two chunks 89%,
// a resident grid walking the tensor 79-82%); int4 with two chunks 81% (one 79.5%, a
// resident grid 67-76%). Bits are a template parameter, so the per-element code has no
// branch on them. (Those runs still checked bounds on every element; see quantize_chunk.)
// Dequantize: the 8-output pieces of dequantize_pieces.h (96-97% of copy).
//
// Scales and reciprocals are rounded divisions even under --use_fast_math, and codes come
// from one round-to-nearest-even conversion: the output matches the torch reference in
// opdefs.py bit for bit.
#include <type_traits>

#include "chunk_io.h"
#include "dequantize_pieces.h"
#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"
#include "woq_codes.h"

namespace ds {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // elements per chunk

// Chunks per thread per step of the quantizer: the measured optimum above.
template <int kBits>
constexpr int kQuantizeChunks = kBits == 8 ? 1 : 2;

// Largest code: 127 or 7 symmetric (codes in [-qmax, qmax]), 255 or 15 asymmetric.
template <int kBits, bool kSymmetric>
constexpr int kQmax = kSymmetric ? (1 << (kBits - 1)) - 1 : (1 << kBits) - 1;

// Quantises chunk `chunk` (values in v, zeros past numel) and stores its codes; the first
// lane of each group stores the group's scale (and offset). Every lane of the warp must call
// it: the group statistics are shuffles. Only a chunk at the tensor's end looks at which of
// its elements exist: bounds checks on every element (a 64-bit compare each, twice in the
// asymmetric kernel) were about a third of the instructions of a whole chunk.
template <int kBits, bool kSymmetric, int kLanes>
__device__ __forceinline__ void quantize_chunk(float (&v)[kPerThread], std::int64_t chunk, std::int64_t numel,
                                               bool vectorized, std::uint8_t* __restrict__ codes,
                                               float* __restrict__ scales, float* __restrict__ offsets) {
  const std::int64_t start = chunk * kPerThread;
  const int valid = numel - start >= kPerThread ? kPerThread : (numel > start ? static_cast<int>(numel - start) : 0);
  constexpr int qmax = kQmax<kBits, kSymmetric>;
  float scale, offset = 0.0f;
  if constexpr (kSymmetric) {
    float amax = 0.0f;  // the zeros past the end leave an absmax alone
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) amax = fmaxf(amax, fabsf(v[k]));
    scale = __fdiv_rn(warp_max<kLanes>(amax), static_cast<float>(qmax));
  } else {
    if (valid < kPerThread) {  // the first element stands in for the missing ones: no min or max moves
#pragma unroll
      for (int k = 1; k < kPerThread; ++k) v[k] = k < valid ? v[k] : v[0];
    }
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      lo = fminf(lo, v[k]);
      hi = fmaxf(hi, v[k]);
    }
    if (valid == 0) lo = INFINITY, hi = -INFINITY;
    lo = warp_min<kLanes>(lo);
    hi = warp_max<kLanes>(hi);
    scale = __fdiv_rn(hi - lo, static_cast<float>(qmax));
    offset = lo;
  }
  if (valid == 0) return;
  if (chunk % kLanes == 0) {
    scales[chunk / kLanes] = scale;
    if constexpr (!kSymmetric) offsets[chunk / kLanes] = offset;
  }
  const float inv = scale > 0.0f ? __frcp_rn(scale) : 0.0f;
  constexpr int qmin = kSymmetric ? -qmax : 0;
  int q[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) q[k] = max(qmin, min(qmax, __float2int_rn((v[k] - offset) * inv)));

  constexpr int kBytes = kPerThread * kBits / 8;
  Vec<std::uint8_t, kBytes> packed;
#pragma unroll
  for (int b = 0; b < kBytes; ++b) {
    packed.v[b] = kBits == 8 ? static_cast<std::uint8_t>(q[b] & 0xff)
                             : static_cast<std::uint8_t>((q[2 * b] & 0xf) | ((q[2 * b + 1] & 0xf) << 4));
  }
  std::uint8_t* out = codes + start * kBits / 8;
  if (vectorized && valid == kPerThread) {
    store_vec(out, packed);
  } else {  // the chunk's own bytes; an odd int4 tail packs a zero high nibble, as the reference does
    const int bytes = (valid * kBits + 7) / 8;
#pragma unroll
    for (int b = 0; b < kBytes; ++b) {  // unrolled, so packed stays in registers
      if (b < bytes) out[b] = kBits == 4 && 2 * b + 1 == valid ? packed.v[b] & 0xf : packed.v[b];
    }
  }
}

// Block b owns chunks [b, b + 1) * kThreads * kChunks; thread t takes chunks t, t + 256, ...
// of them. The bound is rounded up to whole warps, so every lane of a warp runs (the
// shuffles need them all); lanes past the end load zeros and store nothing.
template <typename T, int kBits, bool kSymmetric, int kLanes>
__global__ void __launch_bounds__(kThreads)
quantize_kernel(const T* __restrict__ x, std::uint8_t* __restrict__ codes, float* __restrict__ scales,
                float* __restrict__ offsets, std::int64_t numel, bool vectorized) {
  constexpr int kChunks = kQuantizeChunks<kBits>;
  const std::int64_t chunks = (numel + kPerThread - 1) / kPerThread;
  const std::int64_t bound = (chunks + DS_WARP_SIZE - 1) / DS_WARP_SIZE * DS_WARP_SIZE;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * kThreads * kChunks;
  for (std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads * kChunks + threadIdx.x; first < bound;
       first += step) {
    float v[kChunks][kPerThread];
#pragma unroll
    for (int j = 0; j < kChunks; ++j) load_chunk(x, (first + j * kThreads) * kPerThread, numel, vectorized, v[j]);
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      if (first + j * kThreads < bound) {  // warp-uniform: bound and kThreads are whole warps
        quantize_chunk<kBits, kSymmetric, kLanes>(v[j], first + j * kThreads, numel, vectorized, codes, scales,
                                                  offsets);
      }
    }
  }
}

// int8 / int4 codes of a piece as exact floats (woq_codes.h: byte permutes under 2^23, nibbles
// through the paired bf16 FMA), unsigned when asymmetric, two's complement when symmetric.
template <int kBits, bool kSymmetric>
struct IntCodec {
  static constexpr int kWords = pieces::kOut * kBits / 32;
  static constexpr bool kOffsets = !kSymmetric;

  __device__ __forceinline__ static void decode(const std::uint32_t (&words)[kWords], float (&v)[pieces::kOut]) {
    if constexpr (kBits == 8) {
      float lo[4], hi[4];
      woq::int8_floats<kSymmetric>(words[0], lo);
      woq::int8_floats<kSymmetric>(words[1], hi);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = lo[k], v[k + 4] = hi[k];
    } else {
      woq::int4_floats<kSymmetric>(words[0], v);
    }
  }

  __device__ __forceinline__ static float code(const std::uint8_t* __restrict__ codes, std::int64_t e) {
    if constexpr (kBits == 8) {
      const int byte = codes[e];
      return static_cast<float>(kSymmetric ? static_cast<int>(static_cast<std::int8_t>(byte)) : byte);
    } else {
      const int nibble = (codes[e / 2] >> (4 * (e % 2))) & 0xf;
      return static_cast<float>(kSymmetric ? (nibble ^ 8) - 8 : nibble);  // 4-bit two's complement
    }
  }
};

const char* check_spec(int group_size, int bits) {
  if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256) {
    return "group_size must be 32, 64, 128 or 256";
  }
  if (bits != 8 && bits != 4) return "bits must be 8 or 4";
  return nullptr;
}

// One step per thread: enough blocks of kThreads * chunks_per_thread chunks for the tensor.
unsigned grid_for(std::int64_t numel, int chunks_per_thread) {
  const std::int64_t per_block = static_cast<std::int64_t>(kThreads) * chunks_per_thread * kPerThread;
  const std::int64_t blocks = (numel + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks > 0x7fffffff ? 0x7fffffff : blocks);
}

// Calls fn(std::integral_constant<int, kBits>{}, std::integral_constant<int, kLanes>{}) for
// a valid bit width and group size.
template <typename Fn>
const char* with_bits_and_lanes(int bits, int group_size, Fn&& fn) {
  auto with_lanes = [&](auto bits_constant) -> const char* {
    switch (group_size / kPerThread) {
      case 2: return fn(bits_constant, std::integral_constant<int, 2>{});
      case 4: return fn(bits_constant, std::integral_constant<int, 4>{});
      case 8: return fn(bits_constant, std::integral_constant<int, 8>{});
      default: return fn(bits_constant, std::integral_constant<int, 16>{});
    }
  };
  return bits == 8 ? with_lanes(std::integral_constant<int, 8>{}) : with_lanes(std::integral_constant<int, 4>{});
}

}  // namespace

const char* quantize_blockwise(Ptr x, Ptr codes, Ptr scales, Ptr offsets, std::int64_t numel,
                               int group_size, int bits, bool symmetric, int dtype,
                               std::uintptr_t stream_handle) {
  if (const char* error = check_spec(group_size, bits)) return error;
  if (numel == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const bool vectorized = aligned16(x) && aligned16(codes);
  auto* cp = reinterpret_cast<std::uint8_t*>(codes);
  auto* sp = reinterpret_cast<float*>(scales);
  auto* op = reinterpret_cast<float*>(offsets);
  DS_DISPATCH_FLOAT(dtype, T,
    return with_bits_and_lanes(bits, group_size, [&](auto b, auto lanes) -> const char* {
      constexpr int B = decltype(b)::value;
      constexpr int L = decltype(lanes)::value;
      auto kernel = symmetric ? quantize_kernel<T, B, true, L> : quantize_kernel<T, B, false, L>;
      kernel<<<grid_for(numel, kQuantizeChunks<B>), kThreads, 0, stream>>>(reinterpret_cast<const T*>(x), cp, sp, op,
                                                                            numel, vectorized);
      DS_RETURN_LAUNCH_STATUS();
    }));
  return nullptr;
}

const char* dequantize_blockwise(Ptr codes, Ptr scales, Ptr offsets, Ptr y, std::int64_t numel,
                                 int group_size, int bits, bool symmetric, int dtype,
                                 std::uintptr_t stream_handle) {
  if (const char* error = check_spec(group_size, bits)) return error;
  if (numel == 0) return nullptr;
  if (const char* error = pieces::check_aligned(codes, y)) return error;
  const ds_stream_t stream = as_stream(stream_handle);
  auto* cp = reinterpret_cast<const std::uint8_t*>(codes);
  auto* sp = reinterpret_cast<const float*>(scales);
  auto* op = reinterpret_cast<const float*>(offsets);
  DS_DISPATCH_FLOAT(dtype, T,
    return pieces::with_group(group_size, [&](auto group) -> const char* {
      constexpr int G = decltype(group)::value;
      auto kernel = bits == 8 ? (symmetric ? pieces::dequantize_kernel<T, IntCodec<8, true>, G>
                                           : pieces::dequantize_kernel<T, IntCodec<8, false>, G>)
                              : (symmetric ? pieces::dequantize_kernel<T, IntCodec<4, true>, G>
                                           : pieces::dequantize_kernel<T, IntCodec<4, false>, G>);
      kernel<<<pieces::grid_for(numel), pieces::kThreads, 0, stream>>>(cp, sp, op, reinterpret_cast<T*>(y), numel);
      DS_RETURN_LAUNCH_STATUS();
    }));
  return nullptr;
}

}  // namespace ds
