// Bulk-copy variants of the int4 decode kernel for tools/bench/woq_lab.cu (included there, in
// its anonymous namespace, after woq_lab_tc.cuh, whose compute_tc does the math).
//
// A persistent grid: each block owns a run of 16-row tiles, one producer warp streams each
// tile's rows in slices (64 code bytes a row per consumer warp) into a ring of shared-memory
// stages with the copy engine (cp.async.bulk completing on an mbarrier), and CW consumer warps
// each take one 64-byte k-block of every slice into mma.m16n8k16 (16 weight rows as A, x as
// every B column). Registers hold no loads in flight, so the whole of a block's share can be
// on its way from the first cycle; the SIMT designs cap it at what registers hold.
#pragma once

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(std::uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, std::uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, std::uint32_t bytes, std::uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

__device__ __forceinline__ void consumers_sync(int threads) {
  asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}

template <int CW, int SKB>
struct BulkLayout {
  static constexpr int kSliceBytes = 64 * SKB;     // SKB 64-byte k-blocks of each row a stage
  static constexpr int kPitch = kSliceBytes + 64;  // rows g and g + 1 of a tile on other banks
  static constexpr int kStageBytes = 16 * kPitch;
  static constexpr int kMaxSlots = 32;
  static constexpr int kHeadBytes = 2 * kMaxSlots * 8 + 2 * CW * 16 * 4;  // barriers, tile partials
  // x in pair order (K / 8 vectors) follows the head; the ring follows x.
  __host__ __device__ static int ring_offset(int k) { return (kHeadBytes + 2 * k + 127) / 128 * 128; }
};

// FLOOR: the consumers only wait and release (the copy engine's read floor); otherwise codes go
// into the mma as 136 + v, as in gemv_tc's MAGIC. A stage is SKB k-blocks of 16 rows, warp w
// taking k-blocks w, w + CW, ... of it.
template <int CW, int SKB, bool FLOOR>
__global__ void __launch_bounds__((CW + 1) * 32, 1) gemv_bulk(Args a, int slots) {
  using L = BulkLayout<CW, SKB>;
  extern __shared__ __align__(128) std::uint8_t smem[];
  auto* full = reinterpret_cast<std::uint64_t*>(smem);
  auto* empty = full + L::kMaxSlots;
  auto* partial = reinterpret_cast<float(*)[CW][16]>(smem + 2 * L::kMaxSlots * 8);
  auto* xpairs = reinterpret_cast<uint4*>(smem + L::kHeadBytes);
  std::uint8_t* ring = smem + L::ring_offset(a.k);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_bytes = a.k / 2, kblocks = a.k >> 7, slices = (kblocks + SKB - 1) / SKB;
  const int tiles = (a.n + 15) / 16;
  const int tile0 = static_cast<int>(static_cast<long long>(tiles) * blockIdx.x / gridDim.x);
  const int tile1 = static_cast<int>(static_cast<long long>(tiles) * (blockIdx.x + 1) / gridDim.x);
  const int stages = (tile1 - tile0) * slices;

  if (threadIdx.x == 0) {
    for (int i = 0; i < slots; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], CW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == CW) {  // producer: lane r copies row r of the tile's slice
    for (int s = 0; s < stages; ++s) {
      const int slot = s % slots;
      if (s >= slots) mbar_wait(&empty[slot], ((s / slots) - 1) & 1);
      const int tile = tile0 + s / slices, slice = s % slices;
      const int bytes = min(L::kSliceBytes, row_bytes - slice * L::kSliceBytes);
      if (lane == 0) mbar_expect_tx(&full[slot], 16 * bytes);
      __syncwarp();
      if (lane < 16) {
        const int row = min(tile * 16 + lane, a.n - 1);  // rows past N are computed, never stored
        bulk_copy(ring + slot * L::kStageBytes + lane * L::kPitch,
                  a.codes + static_cast<std::size_t>(row) * row_bytes + slice * L::kSliceBytes, bytes, &full[slot]);
      }
    }
    return;
  }

  for (int i = threadIdx.x; i < a.k / 8; i += CW * 32) {  // x in the pair order of the codes
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(a.x) + i);
    xpairs[i] = make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                           __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
  }
  consumers_sync(CW * 32);

  const int g = lane >> 2, t = lane & 3;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // [0]: row g of the tile, [2]: row g + 8
  int parity = 0;
  for (int s = 0; s < stages; ++s) {
    const int slot = s % slots, tile = tile0 + s / slices, slice = s % slices;
    const int in_slice = min(SKB, kblocks - slice * SKB);
    const float* sc_g_row = a.scales + static_cast<std::size_t>(min(tile * 16 + g, a.n - 1)) * kblocks + slice * SKB;
    const float* sc_h_row = a.scales + static_cast<std::size_t>(min(tile * 16 + g + 8, a.n - 1)) * kblocks + slice * SKB;
    TcStage st;
    if (!FLOOR && warp < in_slice) {
      st.sc[0] = __ldg(sc_g_row + warp);
      st.sc[1] = __ldg(sc_h_row + warp);
    }
    mbar_wait(&full[slot], (s / slots) & 1);
    if (!FLOOR) {
      for (int kl = warp; kl < in_slice; kl += CW) {  // the next k-block's scales load under this one
        float next_g = 0.f, next_h = 0.f;
        if (kl + CW < in_slice) {
          next_g = __ldg(sc_g_row + kl + CW);
          next_h = __ldg(sc_h_row + kl + CW);
        }
        const std::uint8_t* stage = ring + slot * L::kStageBytes + kl * 64 + 16 * t;
        st.w[0] = *reinterpret_cast<const uint4*>(stage + g * L::kPitch);
        st.w[1] = *reinterpret_cast<const uint4*>(stage + (g + 8) * L::kPitch);
        compute_tc<true, 2>(st, xpairs + (slice * SKB + kl) * 16 + 4 * t, acc);
        st.sc[0] = next_g;
        st.sc[1] = next_h;
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[slot]);
    if (slice == slices - 1) {  // the tile's partial sums meet in shared memory
      if (t == 0) {
        partial[parity][warp][g] = acc[0];
        partial[parity][warp][g + 8] = acc[2];
      }
      consumers_sync(CW * 32);
      const int row = tile * 16 + lane;
      if (warp == 0 && lane < 16 && row < a.n) {
        float total = 0.f;
#pragma unroll
        for (int wi = 0; wi < CW; ++wi) total += partial[parity][wi][lane];
        a.y[row] = to_bf16(total);
      }
      acc[0] = acc[2] = 0.f;
      parity ^= 1;
    }
  }
}

// BLOCKS: resident blocks asked for per multiprocessor; the ring takes the shared memory left.
template <int CW, int SKB, bool FLOOR, int BLOCKS>
void launch_bulk(const Args& a, cudaStream_t s) {
  using L = BulkLayout<CW, SKB>;
  static int sms = 0, smem_limit = 0;
  if (sms == 0) {
    int device = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaFuncSetAttribute(gemv_bulk<CW, SKB, FLOOR>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit);
  }
  const int budget = smem_limit / BLOCKS - 2048;
  const int slots = min(L::kMaxSlots, (budget - L::ring_offset(a.k)) / L::kStageBytes);
  const int bytes = L::ring_offset(a.k) + slots * L::kStageBytes;
  gemv_bulk<CW, SKB, FLOOR><<<sms * BLOCKS, (CW + 1) * 32, bytes, s>>>(a, slots);
}
