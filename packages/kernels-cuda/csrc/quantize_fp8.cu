// Block-wise fp8 (e4m3 / e5m2) quantisation and dequantisation with one float32 scale per group.
//
// Quantize follows quantize.cu: every thread owns 16 consecutive elements, a group of G
// elements is G/16 neighbouring lanes whose amax is a few shuffles, x is read once and the
// codes (16 bytes per thread) and scale written once. Conversions use the hardware's
// saturating round-to-nearest-even fp8 conversion (sm_89 and newer; cuda_fp8.h emulates it
// on older targets, which the Python side does not offer). The scale and its reciprocal are
// correctly rounded (the build uses --use_fast_math), so codes equal torch's own conversion.
// Dequantize is the 8-output-piece kernel of dequantize_pieces.h, shared with int8/int4.
//
// HIP: ROCm's fp8 headers differ between releases and between the OCP and "fnuz" formats of
// MI300, so the HIP build leaves these kernels out and fp8_compiled() says so.
#include "chunk_io.h"
#include "dequantize_pieces.h"
#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"

#if !defined(DS_KERNELS_HIP)
#include <cuda_fp8.h>
#endif

namespace ds {

#if defined(DS_KERNELS_HIP)

bool fp8_compiled() { return false; }

const char* quantize_fp8(Ptr, Ptr, Ptr, std::int64_t, int, int, int, std::uintptr_t) {
  return "the HIP build of ds kernels has no fp8 kernels";
}

const char* dequantize_fp8(Ptr, Ptr, Ptr, std::int64_t, int, int, int, std::uintptr_t) {
  return "the HIP build of ds kernels has no fp8 kernels";
}

#else

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;

template <int kFormat>
struct Fp8;
template <>
struct Fp8<0> {
  static constexpr __nv_fp8_interpretation_t kind = __NV_E4M3;
  static constexpr float max = 448.0f;
};
template <>
struct Fp8<1> {
  static constexpr __nv_fp8_interpretation_t kind = __NV_E5M2;
  static constexpr float max = 57344.0f;
};

using Codes = Vec<std::uint8_t, kPerThread>;

// kLanes = group_size / kPerThread threads cooperate on one group.
template <typename T, int kFormat, int kLanes>
__global__ void __launch_bounds__(kThreads)
quantize_fp8_kernel(const T* __restrict__ x, std::uint8_t* __restrict__ codes, float* __restrict__ scales,
                    std::int64_t numel, bool vectorized) {
  const std::int64_t thread = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const std::int64_t start = thread * kPerThread;
  float v[kPerThread];
  load_chunk(x, start, numel, vectorized, v);  // zeros past the end: they leave amax alone
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) amax = fmaxf(amax, fabsf(v[k]));
  amax = warp_max<kLanes>(amax);  // every lane takes part, also those past the end
  if (start >= numel) return;

  const float scale = __fdiv_rn(amax, Fp8<kFormat>::max);
  const float inv = scale > 0.0f ? __frcp_rn(scale) : 0.0f;
  if (thread % kLanes == 0) scales[thread / kLanes] = scale;
  Codes packed;
#pragma unroll
  for (int k = 0; k < kPerThread; k += 2) {
    const __nv_fp8x2_storage_t pair =
        __nv_cvt_float2_to_fp8x2(make_float2(v[k] * inv, v[k + 1] * inv), __NV_SATFINITE, Fp8<kFormat>::kind);
    packed.v[k] = static_cast<std::uint8_t>(pair & 0xff);
    packed.v[k + 1] = static_cast<std::uint8_t>(pair >> 8);
  }
  if (vectorized && start + kPerThread <= numel) {
    *reinterpret_cast<Codes*>(codes + start) = packed;
  } else {
    for (int k = 0; k < kPerThread && start + k < numel; ++k) codes[start + k] = packed.v[k];
  }
}

// fp8 codes of a piece as exact floats: pairs through the hardware fp8x2 -> half2 conversion.
template <int kFormat>
struct Fp8Codec {
  static constexpr int kWords = 2;
  static constexpr bool kOffsets = false;

  __device__ __forceinline__ static void decode(const std::uint32_t (&words)[kWords], float (&v)[pieces::kOut]) {
#pragma unroll
    for (int k = 0; k < pieces::kOut; k += 2) {
      const auto pair = static_cast<__nv_fp8x2_storage_t>(words[k / 4] >> (8 * (k % 4)));
      const __half2 halves(__nv_cvt_fp8x2_to_halfraw2(pair, Fp8<kFormat>::kind));  // exact
      v[k] = __low2float(halves);
      v[k + 1] = __high2float(halves);
    }
  }

  __device__ __forceinline__ static float code(const std::uint8_t* __restrict__ codes, std::int64_t e) {
    const __half half(__nv_cvt_fp8_to_halfraw(codes[e], Fp8<kFormat>::kind));
    return __half2float(half);
  }
};

unsigned blocks_for(std::int64_t numel) {
  const std::int64_t threads = (numel + kPerThread - 1) / kPerThread;
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

const char* check_fp8_spec(int group_size, int fp8_format) {
  if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256) {
    return "group_size must be 32, 64, 128 or 256";
  }
  if (fp8_format != 0 && fp8_format != 1) return "fp8_format must be 0 (e4m3) or 1 (e5m2)";
  return nullptr;
}

template <typename T, int kFormat>
void launch_quantize(const T* x, std::uint8_t* codes, float* scales, std::int64_t numel, int group_size,
                     bool vectorized, ds_stream_t stream) {
  const unsigned blocks = blocks_for(numel);
  switch (group_size / kPerThread) {
    case 2: quantize_fp8_kernel<T, kFormat, 2><<<blocks, kThreads, 0, stream>>>(x, codes, scales, numel, vectorized); break;
    case 4: quantize_fp8_kernel<T, kFormat, 4><<<blocks, kThreads, 0, stream>>>(x, codes, scales, numel, vectorized); break;
    case 8: quantize_fp8_kernel<T, kFormat, 8><<<blocks, kThreads, 0, stream>>>(x, codes, scales, numel, vectorized); break;
    default: quantize_fp8_kernel<T, kFormat, 16><<<blocks, kThreads, 0, stream>>>(x, codes, scales, numel, vectorized); break;
  }
}

}  // namespace

bool fp8_compiled() { return true; }

const char* quantize_fp8(Ptr x, Ptr codes, Ptr scales, std::int64_t numel, int group_size, int fp8_format,
                         int dtype, std::uintptr_t stream_handle) {
  if (const char* error = check_fp8_spec(group_size, fp8_format)) return error;
  if (numel == 0) return nullptr;
  const ds_stream_t stream = as_stream(stream_handle);
  const bool vectorized = aligned16(x) && aligned16(codes);
  auto* cp = reinterpret_cast<std::uint8_t*>(codes);
  auto* sp = reinterpret_cast<float*>(scales);
  DS_DISPATCH_FLOAT(dtype, T,
    const auto* xp = reinterpret_cast<const T*>(x);
    if (fp8_format == 0) {
      launch_quantize<T, 0>(xp, cp, sp, numel, group_size, vectorized, stream);
    } else {
      launch_quantize<T, 1>(xp, cp, sp, numel, group_size, vectorized, stream);
    });
  DS_RETURN_LAUNCH_STATUS();
}

const char* dequantize_fp8(Ptr codes, Ptr scales, Ptr y, std::int64_t numel, int group_size, int fp8_format,
                           int dtype, std::uintptr_t stream_handle) {
  if (const char* error = check_fp8_spec(group_size, fp8_format)) return error;
  if (numel == 0) return nullptr;
  if (const char* error = pieces::check_aligned(codes, y)) return error;
  const ds_stream_t stream = as_stream(stream_handle);
  const auto* cp = reinterpret_cast<const std::uint8_t*>(codes);
  const auto* sp = reinterpret_cast<const float*>(scales);
  DS_DISPATCH_FLOAT(dtype, T,
    return pieces::with_group(group_size, [&](auto group) -> const char* {
      constexpr int G = decltype(group)::value;
      auto kernel = fp8_format == 0 ? pieces::dequantize_kernel<T, Fp8Codec<0>, G>
                                    : pieces::dequantize_kernel<T, Fp8Codec<1>, G>;
      kernel<<<pieces::grid_for(numel), pieces::kThreads, 0, stream>>>(cp, sp, nullptr, reinterpret_cast<T*>(y),
                                                                       numel);
      DS_RETURN_LAUNCH_STATUS();
    }));
  return nullptr;
}

#endif  // DS_KERNELS_HIP

}  // namespace ds
