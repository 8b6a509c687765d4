// ds::woq_matmul for decoding: y[M, N] = x[M, K] @ W^T with M <= 4 and W an int4/int8
// block-quantized [N, K] weight (layout in kernels.h). At these M a matmul is one pass over the
// weight, so the kernels are built around reading the codes once, in 16-byte streaming loads
// (L1 bypassed, 256-byte L2 lines), with the integer codes turned into exact floats in
// registers and each group's scale applied to its partial sum in float32.
//
// Two designs, each the measured best of its range on an H100 (weights rotated through more
// than 4x the L2, back-to-back launches, against cuBLAS bf16 of the same shape; the M = 1
// figures are int4 symmetric at K x N = 4096 x 4096 / 4096 x 11008 / 11008 x 4096 / 8192 x
// 28672, from tools/bench/woq_lab.cu, which keeps the variants that lost and a read floor):
// * SIMT, for M = 1 where the tensor cores are not taken (int8 codes, groups under 128, fp32
//   x, HIP, GPUs before sm_80): two warps of a block share 2 rows and split K between them
//   (chunk c to warp c / 32 % 2), lanes stride K with 16-byte code loads (32 int4 / 16 int8
//   codes), fp32 FMAs, one warp-shuffle reduction and one exchange in shared memory; 4 warps a
//   block: int4 2.65x / 3.05x / 3.13x / 3.66x cuBLAS (int8: 2.04x / 1.88x
//   / 2.06x / 2.07x). The time left is instruction issue and latency, not bandwidth: the same
//   loads without the arithmetic run at 3.5-4.1x. Variants that lost: a warp owning its rows
//   over the whole K, 3 or 4 warps splitting K, 3 or 4 rows a warp, the next chunk prefetched,
//   more resident blocks, codes converted in the fp32 mantissa, and tiles streamed into shared
//   memory by the copy engine (cp.async.bulk: its read floor alone is 2.1-3.0x at 4096 x 4096).
// * Tensor cores (sm_80+, bf16/fp16 x) for 2 <= M <= 4, and for M = 1 with int4 codes:
//   mma.m16n8k16 with 16 weight rows as A and the x rows as B columns costs the same at M = 4
//   as at M = 1 (the SIMT design falls to 0.7-1.8x cuBLAS at M = 4: x is re-read per row and
//   FMAs grow with M). A block takes a 16-row tile and splits its k-blocks over its warps
//   (k-block kb -> warp kb % warps), which meet once in shared memory. At M = 2-4, 8 warps a
//   tile, each loading 4 k-blocks before any math, 2 blocks a multiprocessor: int4 symmetric at
//   M = 4 ran 3.04x / 2.36x / 2.49x / 2.19x, int8 1.91x / 1.68x / 1.62x / 1.50x, ahead of 4
//   warps (3.21x / 2.21x / 2.08x / 1.92x; int8 1.86x / 1.31x / 1.38x / 1.32x) everywhere but
//   int4 at the largest shape. At M = 1 a warp takes one k-block a step, 32 warps are resident
//   per multiprocessor (64 registers), and a tile gets 16, 8 or 4 warps: the most that keep the
//   grid to one wave. 16 warps a tile: 3.04x / 2.91x / 3.38x / 3.71x; 8: 2.71x / 2.95x / 2.89x /
//   3.67x; 4: 2.05x / 3.12x / 2.00x / 3.72x, so N = 4096 (256 tiles) takes 16 and N = 11008
//   (688) takes 4; the largest shape fits no single wave and takes 4. Feeding the codes as
//   136 + v and taking 136 sum(x) off after the mma (no paired FMA) measured the same.
// The tensor-core design needs a k-block (64 code bytes per row: 128 int4 / 64 int8 codes)
// inside one group, since one mma sums over the whole k-block before the scale is applied;
// smaller groups, float32 x, GPUs before sm_80 and HIP take the SIMT design (at M > 1 with 4
// rows per warp and K unsplit, the best SIMT variant at M = 4: int4 1.58-1.76x cuBLAS vs
// 1.26-1.29x for 2 rows).
#include <atomic>
#include <type_traits>

#include "dtypes.h"
#include "kernels.h"
#include "reduce.h"
#include "woq_codes.h"

#if defined(DS_KERNELS_HIP)
#define DS_WOQ_BOUNDS(threads) __launch_bounds__(threads)
#else
// At least 512 threads resident per multiprocessor: enough loads in flight to cover DRAM latency.
#define DS_WOQ_BOUNDS(threads) __launch_bounds__(threads, 512 / (threads))
#endif

namespace ds {
namespace {

using woq::int4_floats;
using woq::int8_floats;
using woq::load_codes;
#if !defined(DS_KERNELS_HIP)
using woq::Half16;
using woq::int4_pairs;
#endif

constexpr int kSimtWarps = 4;
constexpr int kKBlockBytes = 64;  // code bytes of one row in one mma k-block (16 per lane of a quad)
#if !defined(DS_KERNELS_HIP)
#endif

template <typename T>
struct WoqArgs {
  const T* x;                  // [M, K]
  const std::uint8_t* codes;   // [N, K * bits / 8]
  const float* scales;         // [N, K / group]
  const float* offsets;        // [N, K / group], asymmetric only
  T* y;                        // [M, N]
  int n, k, group_shift;       // group = 1 << group_shift
};

// SIMT design: a block is kSimtWarps warps; KS consecutive warps share R rows and split K.
// Lane l of warp part p takes 16-byte chunks 32 p + l, 32 (KS + p) + l, ... of each row (a
// chunk lies in one group: groups are >= 32 codes); the x word of a chunk is converted once and
// used for all R rows.
template <typename T, int BITS, bool SYM, int M, int R, int KS>
__global__ void DS_WOQ_BOUNDS(kSimtWarps * 32) woq_gemv_simt(WoqArgs<T> a) {
  static_assert(kSimtWarps % KS == 0, "the K split must divide the block's warps");
  constexpr int kCodesPerLane = BITS == 4 ? 32 : 16;
  constexpr int kStride = 32 * KS;  // chunks between a lane's consecutive chunks
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = warp % KS;
  const int row0 = (blockIdx.x * (kSimtWarps / KS) + warp / KS) * R;
  const std::size_t row_bytes = static_cast<std::size_t>(a.k) * BITS / 8;
  const int groups = a.k >> a.group_shift, chunks = a.k / kCodesPerLane;

  const std::uint8_t* wrow[R];
  int rown[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rown[r] = min(row0 + r, a.n - 1);  // rows past N are computed, never stored
    wrow[r] = a.codes + rown[r] * row_bytes;
  }
  float acc[R][M] = {};

  for (int c = 32 * part + lane; c < chunks; c += kStride) {
    uint4 w[R];
    float sc[R], of[R];
    const int grp = (c * kCodesPerLane) >> a.group_shift;
#pragma unroll
    for (int r = 0; r < R; ++r) {  // every load of the chunk before any math
      w[r] = load_codes(wrow[r] + static_cast<std::size_t>(c) * 16);
      sc[r] = __ldg(a.scales + static_cast<std::size_t>(rown[r]) * groups + grp);
      if (!SYM) of[r] = __ldg(a.offsets + static_cast<std::size_t>(rown[r]) * groups + grp);
    }
    float dot[R][M] = {};
    float xs[M] = {};
    const T* xc = a.x + static_cast<std::size_t>(c) * kCodesPerLane;
#pragma unroll
    for (int step = 0; step < kCodesPerLane / 8; ++step) {  // 8 codes (one x vector) a step
      float wf[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const std::uint32_t* words = reinterpret_cast<const std::uint32_t*>(&w[r]);
        if constexpr (BITS == 4) {
          int4_floats<SYM>(words[step], wf[r]);
        } else {
          float lo[4], hi[4];
          int8_floats<SYM>(words[2 * step], lo);
          int8_floats<SYM>(words[2 * step + 1], hi);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            wf[r][j] = lo[j];
            wf[r][4 + j] = hi[j];
          }
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const Vec<T, 8> xv = load_vec_nc<8>(xc + static_cast<std::size_t>(m) * a.k + 8 * step);
        float xf[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) xf[j] = to_float(xv.v[j]);
        if (!SYM) {
#pragma unroll
          for (int j = 0; j < 8; ++j) xs[m] += xf[j];
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < 8; ++j) dot[r][m] = fmaf(wf[r][j], xf[j], dot[r][m]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        acc[r][m] = fmaf(sc[r], dot[r][m], acc[r][m]);
        if (!SYM) acc[r][m] = fmaf(of[r], xs[m], acc[r][m]);
      }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = warp_sum<32>(acc[r][m]);
  if constexpr (KS > 1) {  // the parts of a row group meet in shared memory
    __shared__ float partial[kSimtWarps][R * M];
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) partial[warp][r * M + m] = acc[r][m];
    }
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int p = 1; p < KS; ++p) acc[r][m] += partial[warp + p][r * M + m];
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (lane == r * M + m && row0 + r < a.n) {
        a.y[static_cast<std::size_t>(m) * a.n + row0 + r] = from_float<T>(acc[r][m]);
      }
    }
}

#if !defined(DS_KERNELS_HIP)
// Tensor-core design: a block owns 16 rows. Lane (g, t) = (lane / 4, lane % 4) of a quad loads
// bytes 16t..16t+15 of each k-block of rows g and g + 8 (the mma's A rows); its B fragment is
// x row g at the same k's (the k order inside an mma is free as long as A and B agree), zero
// for g >= M. The scale multiplies each k-block's mma sums; asymmetric offsets add
// offset * sum(x over the k-block), the sum taken by one more mma with A = 1.
// WARPS: warps splitting a tile's k-blocks; UNROLL: k-blocks a warp loads before any math;
// BLOCKS: resident blocks asked for per multiprocessor (a register cap of 64K / (32 WARPS
// BLOCKS) a thread).
template <typename T, int BITS, bool SYM, int M, int WARPS, int UNROLL, int BLOCKS>
__global__ void __launch_bounds__(WARPS * 32, BLOCKS) woq_gemv_mma(WoqArgs<T> a) {
  static_assert(M >= 1 && M <= 8, "the mma's 8 columns hold at most 8 rows of x");
  using H = Half16<T>;
  constexpr int kCodesPerLane = BITS == 4 ? 32 : 16;
  constexpr int kBlockCodes = 4 * kCodesPerLane;
  constexpr int kPairs = kCodesPerLane / 2;
  constexpr int kMmas = kCodesPerLane / 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const std::size_t row_bytes = static_cast<std::size_t>(a.k) * BITS / 8;
  const int groups = a.k >> a.group_shift, kblocks = a.k / kBlockCodes;

  const std::uint8_t* wrow[2];
  int rown[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    rown[h] = min(n0 + 8 * h + g, a.n - 1);  // rows past N are computed, never stored
    wrow[h] = a.codes + rown[h] * row_bytes + 16 * t;
  }
  const T* xrow = a.x + static_cast<std::size_t>(g < M ? g : 0) * a.k + t * kCodesPerLane;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};

  for (int kb0 = warp; kb0 < kblocks; kb0 += WARPS * UNROLL) {
    uint4 w[UNROLL][2];
    float sc[UNROLL][2], of[UNROLL][2];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // every weight load of the step before any math
      const int kb = kb0 + u * WARPS;
      if (kb < kblocks) {
        const int grp = (kb * kBlockCodes) >> a.group_shift;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          w[u][h] = load_codes(wrow[h] + static_cast<std::size_t>(kb) * kKBlockBytes);
          sc[u][h] = __ldg(a.scales + static_cast<std::size_t>(rown[h]) * groups + grp);
          if (!SYM) of[u][h] = __ldg(a.offsets + static_cast<std::size_t>(rown[h]) * groups + grp);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int kb = kb0 + u * WARPS;
      if (kb >= kblocks) continue;
      std::uint32_t X[kPairs];  // B fragments, in the pair order of the codes
      const uint4* xp = reinterpret_cast<const uint4*>(xrow + static_cast<std::size_t>(kb) * kBlockCodes);
#pragma unroll
      for (int i = 0; i < kCodesPerLane / 8; ++i) {
        const uint4 xv = g < M ? __ldg(xp + i) : make_uint4(0, 0, 0, 0);
        if constexpr (BITS == 4) {  // pairs (x_j, x_j+4) of the 8 x's, as int4_pairs pairs codes
          X[4 * i + 0] = __byte_perm(xv.x, xv.z, 0x5410);
          X[4 * i + 1] = __byte_perm(xv.x, xv.z, 0x7632);
          X[4 * i + 2] = __byte_perm(xv.y, xv.w, 0x5410);
          X[4 * i + 3] = __byte_perm(xv.y, xv.w, 0x7632);
        } else {
          X[4 * i + 0] = xv.x;
          X[4 * i + 1] = xv.y;
          X[4 * i + 2] = xv.z;
          X[4 * i + 3] = xv.w;
        }
      }
      float xsum[4] = {0.f, 0.f, 0.f, 0.f};  // sum of x over the k-block, columns 2t and 2t + 1
      if (!SYM) {
#pragma unroll
        for (int j = 0; j < kMmas; ++j) H::mma(xsum, H::kOne, H::kOne, H::kOne, H::kOne, X[2 * j], X[2 * j + 1]);
      }
      std::uint32_t pg[kPairs], ph[kPairs];  // rows g and g + 8
      const std::uint32_t* wg = reinterpret_cast<const std::uint32_t*>(&w[u][0]);
      const std::uint32_t* wh = reinterpret_cast<const std::uint32_t*>(&w[u][1]);
#pragma unroll
      for (int word = 0; word < 4; ++word) {
        if constexpr (BITS == 4) {
          std::uint32_t p[4];
          int4_pairs<H, SYM>(wg[word], p);
#pragma unroll
          for (int j = 0; j < 4; ++j) pg[4 * word + j] = p[j];
          int4_pairs<H, SYM>(wh[word], p);
#pragma unroll
          for (int j = 0; j < 4; ++j) ph[4 * word + j] = p[j];
        } else {
          float f[4];
          int8_floats<SYM>(wg[word], f);
          pg[2 * word] = H::pack2(f[0], f[1]);
          pg[2 * word + 1] = H::pack2(f[2], f[3]);
          int8_floats<SYM>(wh[word], f);
          ph[2 * word] = H::pack2(f[0], f[1]);
          ph[2 * word + 1] = H::pack2(f[2], f[3]);
        }
      }
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kMmas; ++j) H::mma(c, pg[2 * j], ph[2 * j], pg[2 * j + 1], ph[2 * j + 1], X[2 * j], X[2 * j + 1]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[i] = fmaf(sc[u][i >> 1], c[i], acc[i]);
        if (!SYM) acc[i] = fmaf(of[u][i >> 1], xsum[i], acc[i]);
      }
    }
  }

  // Accumulator i of lane l: weight row (l / 4) + 8 (i / 2) of the block, x row 2 (l % 4) + i % 2.
  __shared__ float partial[WARPS][4][32];
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][i][lane] = acc[i];
  __syncthreads();
  for (int e = threadIdx.x; e < 4 * 32; e += WARPS * 32) {
    const int i = e >> 5, l = e & 31;
    const int m = 2 * (l & 3) + (i & 1), row = n0 + (l >> 2) + 8 * (i >> 1);
    if (m >= M || row >= a.n) continue;
    float total = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) total += partial[wi][i][l];
    a.y[static_cast<std::size_t>(m) * a.n + row] = from_float<T>(total);
  }
}
#endif  // !DS_KERNELS_HIP

// What a call may use of the running GPU: the tensor-core design (mma.sync with bf16/fp16
// operands, sm_80+) and the multiprocessor count that sizes the one-row tiles.
struct GpuFacts {
  bool tensor_cores = false;
  int multiprocessors = 1;
};

// Read from the runtime once per device: a decode step calls woq_matmul for every projection of
// every layer, and these never change.
GpuFacts gpu_facts() {
  GpuFacts facts;
#if !defined(DS_KERNELS_HIP)
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices];  // multiprocessors * 2 + tensor cores; 0 until read
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return facts;
  int packed = device < kDevices ? known[device].load(std::memory_order_relaxed) : 0;
  if (packed == 0) {
    int major = 0, count = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return facts;
    }
    packed = count * 2 + (major >= 8 ? 1 : 0);
    if (device < kDevices) known[device].store(packed, std::memory_order_relaxed);
  }
  facts.tensor_cores = (packed & 1) != 0;
  facts.multiprocessors = packed >> 1;
#endif
  return facts;
}

template <typename T, int BITS, bool SYM, int M>
const char* launch_rows(const WoqArgs<T>& args, bool tensor_cores, int multiprocessors, ds_stream_t stream) {
#if !defined(DS_KERNELS_HIP)
  if constexpr (!std::is_same_v<T, float>) {
    const unsigned tiles = (args.n + 15) / 16;
    if constexpr (M > 1) {
      if (tensor_cores) {
        woq_gemv_mma<T, BITS, SYM, M, 8, 4, 2><<<tiles, 8 * 32, 0, stream>>>(args);
        DS_RETURN_LAUNCH_STATUS();
      }
    } else if constexpr (BITS == 4) {
      // One row: one k-block a warp a step, 32 warps a multiprocessor, and as many warps a tile
      // as keep the grid to one wave (see the top of the file).
      if (tensor_cores) {
        const long long warp_slots = 32LL * multiprocessors;
        if (16LL * tiles <= warp_slots) {
          woq_gemv_mma<T, BITS, SYM, 1, 16, 1, 2><<<tiles, 16 * 32, 0, stream>>>(args);
        } else if (8LL * tiles <= warp_slots) {
          woq_gemv_mma<T, BITS, SYM, 1, 8, 1, 4><<<tiles, 8 * 32, 0, stream>>>(args);
        } else {
          woq_gemv_mma<T, BITS, SYM, 1, 4, 1, 8><<<tiles, 4 * 32, 0, stream>>>(args);
        }
        DS_RETURN_LAUNCH_STATUS();
      }
    }
  }
#endif
  (void)tensor_cores, (void)multiprocessors;
  constexpr int kRows = M == 1 ? 2 : 4;   // rows per warp
  constexpr int kSplit = M == 1 ? 2 : 1;  // warps splitting a row's K
  constexpr int kBlockRows = kRows * kSimtWarps / kSplit;
  woq_gemv_simt<T, BITS, SYM, M, kRows, kSplit>
      <<<(args.n + kBlockRows - 1) / kBlockRows, kSimtWarps * 32, 0, stream>>>(args);
  DS_RETURN_LAUNCH_STATUS();
}

template <typename T, int BITS, bool SYM>
const char* launch(const WoqArgs<T>& args, std::int64_t m, bool tensor_cores, int multiprocessors,
                   ds_stream_t stream) {
  switch (m) {
    case 1: return launch_rows<T, BITS, SYM, 1>(args, tensor_cores, multiprocessors, stream);
    case 2: return launch_rows<T, BITS, SYM, 2>(args, tensor_cores, multiprocessors, stream);
    case 3: return launch_rows<T, BITS, SYM, 3>(args, tensor_cores, multiprocessors, stream);
    default: return launch_rows<T, BITS, SYM, 4>(args, tensor_cores, multiprocessors, stream);
  }
}

// log2 of a group size of 32, 64, 128 or 256; -1 for any other.
int group_shift_of(int group_size) {
  for (int shift = 5; shift <= 8; ++shift) {
    if (group_size == 1 << shift) return shift;
  }
  return -1;
}

}  // namespace

const char* woq_matmul(Ptr x, Ptr codes, Ptr scales, Ptr offsets, Ptr y, std::int64_t m, std::int64_t n,
                       std::int64_t k, int group_size, int bits, bool symmetric, int dtype,
                       std::uintptr_t stream_handle) {
  const int group_shift = group_shift_of(group_size);
  if (group_shift < 0) return "woq_matmul: group_size must be 32, 64, 128 or 256";
  if (bits != 4 && bits != 8) return "woq_matmul: bits must be 4 or 8";
  if (m < 1 || m > kWoqMaxRows) return "woq_matmul: the kernels take 1 to 4 rows of x";
  if (n < 1 || k < 1 || n > INT32_MAX || k > INT32_MAX || k % group_size != 0) {
    return "woq_matmul: N and K must be positive, below 2^31, with K a multiple of group_size";
  }
  if (!symmetric && offsets == 0) return "woq_matmul: asymmetric codes need offsets";
  const ds_stream_t stream = as_stream(stream_handle);
  // One mma sums a whole k-block, so its group must not be smaller: 128 int4 or 64 int8 codes.
  const GpuFacts gpu = gpu_facts();
  const bool tensor_cores = group_size >= kKBlockBytes * 8 / bits && gpu.tensor_cores;
  DS_DISPATCH_FLOAT(dtype, T, {
    const WoqArgs<T> args{reinterpret_cast<const T*>(x), reinterpret_cast<const std::uint8_t*>(codes),
                          reinterpret_cast<const float*>(scales), reinterpret_cast<const float*>(offsets),
                          reinterpret_cast<T*>(y), static_cast<int>(n), static_cast<int>(k), group_shift};
    if (bits == 4) {
      return symmetric ? launch<T, 4, true>(args, m, tensor_cores, gpu.multiprocessors, stream)
                       : launch<T, 4, false>(args, m, tensor_cores, gpu.multiprocessors, stream);
    }
    return symmetric ? launch<T, 8, true>(args, m, tensor_cores, gpu.multiprocessors, stream)
                     : launch<T, 8, false>(args, m, tensor_cores, gpu.multiprocessors, stream);
  });
  return nullptr;
}

}  // namespace ds
