// Tensor-core variants of the int4 decode kernel for tools/bench/woq_lab.cu (included there, in
// its anonymous namespace, after Args, load_codes, and_xor, fma2_bf16 and to_bf16): the weight
// codes become exact bf16 pairs in registers and mma.m16n8k16 sums them against x with float32
// accumulators, fewer instructions a code than the SIMT kernels' one FFMA a code.
#pragma once

__device__ __forceinline__ void mma_bf16(float (&d)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Lane (g, t)'s rows of a 16-row tile, g and g + 8 (clamped: rows past N are computed, never
// stored), and where its 16 code bytes of each k-block start in them.
__device__ __forceinline__ void tile_rows(const Args& a, int n0, const std::uint8_t* (&wrow)[2], int (&rown)[2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const std::size_t row_bytes = static_cast<std::size_t>(a.k) / 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    rown[h] = min(n0 + 8 * h + g, a.n - 1);
    wrow[h] = a.codes + rown[h] * row_bytes + 16 * t;
  }
}

// The W warps of a 16-row tile meet in shared memory: lane l's accumulators 0 and 2 hold rows
// l / 4 and l / 4 + 8 (every lane of a quad the same), summed over the warps and stored.
template <int W>
__device__ __forceinline__ void store_tile(const Args& a, int n0, const float (&acc)[4]) {
  __shared__ float partial[W][2][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  partial[warp][0][lane] = acc[0];
  partial[warp][1][lane] = acc[2];
  __syncthreads();
  if (threadIdx.x < 64) {
    const int i = threadIdx.x >> 5, l = threadIdx.x & 31;
    const int row = n0 + (l >> 2) + 8 * i;
    if ((l & 3) == 0 && row < a.n) {
      float total = 0.f;
#pragma unroll
      for (int wi = 0; wi < W; ++wi) total += partial[wi][i][l];
      a.y[row] = to_bf16(total);
    }
  }
}

// Tensor-core M=1: a block owns 16 rows, W warps split its k-blocks (128 codes, 64 bytes a row).
// MAGIC: codes enter the mma as 136 + v (one LOP3 a pair), the 136 * sum(x) taken off per
// k-block with one more set of mmas (A = 1); otherwise one paired bf16 FMA a pair makes v exact.
template <int W, int U, bool MAGIC, int MINB>
__global__ void __launch_bounds__(W * 32, MINB) gemv_tc(Args a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int groups = a.k >> 7, kblocks = a.k >> 7;
  const std::uint8_t* wrow[2];
  int rown[2];
  tile_rows(a, n0, wrow, rown);
  const std::uint16_t* xrow = a.x + t * 32;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int kb0 = warp; kb0 < kblocks; kb0 += W * U) {
    uint4 w[U][2];
    float sc[U][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u * W;
      if (kb < kblocks) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          w[u][h] = load_codes(wrow[h] + static_cast<std::size_t>(kb) * 64);
          sc[u][h] = __ldg(a.scales + static_cast<std::size_t>(rown[h]) * groups + kb);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u * W;
      if (kb >= kblocks) continue;
      std::uint32_t X[16];
      const uint4* xp = reinterpret_cast<const uint4*>(xrow + static_cast<std::size_t>(kb) * 128);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint4 xv = g == 0 ? __ldg(xp + i) : make_uint4(0, 0, 0, 0);
        X[4 * i + 0] = __byte_perm(xv.x, xv.z, 0x5410);
        X[4 * i + 1] = __byte_perm(xv.x, xv.z, 0x7632);
        X[4 * i + 2] = __byte_perm(xv.y, xv.w, 0x5410);
        X[4 * i + 3] = __byte_perm(xv.y, xv.w, 0x7632);
      }
      std::uint32_t pg[16], ph[16];
      const std::uint32_t* wg = reinterpret_cast<const std::uint32_t*>(&w[u][0]);
      const std::uint32_t* wh = reinterpret_cast<const std::uint32_t*>(&w[u][1]);
#pragma unroll
      for (int word = 0; word < 4; ++word)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const std::uint32_t eg = and_xor(wg[word] >> (4 * j), 0x000F000Fu, 0x43084308u);
          const std::uint32_t eh = and_xor(wh[word] >> (4 * j), 0x000F000Fu, 0x43084308u);
          pg[4 * word + j] = MAGIC ? eg : fma2_bf16(eg, 0x3F803F80u, 0xC308C308u);
          ph[4 * word + j] = MAGIC ? eh : fma2_bf16(eh, 0x3F803F80u, 0xC308C308u);
        }
      float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        mma_bf16(c0, pg[2 * j], ph[2 * j], pg[2 * j + 1], ph[2 * j + 1], X[2 * j], X[2 * j + 1]);
        mma_bf16(c1, pg[2 * j + 2], ph[2 * j + 2], pg[2 * j + 3], ph[2 * j + 3], X[2 * j + 2], X[2 * j + 3]);
      }
      if constexpr (MAGIC) {
        float xs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 8; ++j) mma_bf16(xs, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, X[2 * j], X[2 * j + 1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = fmaf(sc[u][i >> 1], fmaf(-136.f, xs[i], c0[i] + c1[i]), acc[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = fmaf(sc[u][i >> 1], c0[i] + c1[i], acc[i]);
      }
    }
  }
  store_tile<W>(a, n0, acc);
}

template <int W, int U, bool MAGIC, int MINB>
void launch_tc(const Args& a, cudaStream_t s) {
  gemv_tc<W, U, MAGIC, MINB><<<(a.n + 15) / 16, W * 32, 0, s>>>(a);
}

// Tensor-core M=1, one k-block a step: the gemv_tc block (16 rows, W warps splitting the
// k-blocks) with x staged once per block in shared memory in the codes' pair order
// ((x_j, x_j+4) of each 8), so a step's registers hold only its codes and scales; PIPE loads
// the next step's codes before the math of this one. CHAINS: independent mma accumulators.
struct TcStage {
  uint4 w[2];
  float sc[2];
};

__device__ __forceinline__ void load_tc(TcStage& st, const Args& a, const std::uint8_t* const (&wrow)[2],
                                        const int (&rown)[2], int kb, int kblocks) {
  if (kb >= kblocks) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.w[h] = load_codes(wrow[h] + static_cast<std::size_t>(kb) * 64);
    st.sc[h] = __ldg(a.scales + static_cast<std::size_t>(rown[h]) * kblocks + kb);
  }
}

template <bool MAGIC, int CHAINS>
__device__ __forceinline__ void compute_tc(const TcStage& st, const uint4* xpairs, float (&acc)[4]) {
  // mma j takes code word j / 2 of both rows, nibble pairs 2 (j % 2) and 2 (j % 2) + 1, and the
  // matching two x pair words: converted just before their mma to keep few registers live.
  const uint2* xw = reinterpret_cast<const uint2*>(xpairs);
  float c[CHAINS][4] = {};
  float xs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    std::uint32_t p[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::uint32_t word = reinterpret_cast<const std::uint32_t*>(&st.w[h])[j / 2];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const std::uint32_t e = and_xor(word >> (4 * (2 * (j % 2) + q)), 0x000F000Fu, 0x43084308u);
        p[h][q] = MAGIC ? e : fma2_bf16(e, 0x3F803F80u, 0xC308C308u);
      }
    }
    const uint2 X = xw[j];
    mma_bf16(c[j % CHAINS], p[0][0], p[1][0], p[0][1], p[1][1], X.x, X.y);
    if constexpr (MAGIC) mma_bf16(xs, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, X.x, X.y);
  }
#pragma unroll
  for (int i = 0; i < 4; i += 2) {
    float d = MAGIC ? -136.f * xs[i] : 0.f;
#pragma unroll
    for (int ch = 0; ch < CHAINS; ++ch) d += c[ch][i];
    acc[i] = fmaf(st.sc[i >> 1], d, acc[i]);
  }
}

template <int W, bool PIPE, int CHAINS, int MINB>
__global__ void __launch_bounds__(W * 32, MINB) gemv_tc1(Args a) {
  extern __shared__ uint4 xsmem[];  // x in pair order, K / 8 vectors
  const int warp = threadIdx.x >> 5, t = threadIdx.x & 3;
  const int n0 = blockIdx.x * 16;
  const int kblocks = a.k >> 7;
  const std::uint8_t* wrow[2];
  int rown[2];
  tile_rows(a, n0, wrow, rown);
  TcStage cur;
  load_tc(cur, a, wrow, rown, warp, kblocks);  // the first codes fly while x is staged
  for (int i = threadIdx.x; i < a.k / 8; i += W * 32) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(a.x) + i);
    xsmem[i] = make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                          __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
  }
  __syncthreads();
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int kb = warp; kb < kblocks; kb += W) {
    const uint4* xp = xsmem + kb * 16 + 4 * t;  // this lane's 32 x's of the k-block
    if constexpr (PIPE) {
      TcStage next;
      load_tc(next, a, wrow, rown, kb + W, kblocks);
      compute_tc<false, CHAINS>(cur, xp, acc);
      cur = next;
    } else {
      if (kb != warp) load_tc(cur, a, wrow, rown, kb, kblocks);
      compute_tc<false, CHAINS>(cur, xp, acc);
    }
  }
  store_tile<W>(a, n0, acc);
}

template <int W, bool PIPE, int CHAINS, int MINB>
void launch_tc1(const Args& a, cudaStream_t s) {
  gemv_tc1<W, PIPE, CHAINS, MINB><<<(a.n + 15) / 16, W * 32, a.k * 2, s>>>(a);
}

// Tensor-core M=1 with the weights as the mma's B (8 rows a tile, row g in lanes 4g..4g+3) and
// x as A (every A row is x; only D row 0 is kept), so a tile is half gemv_tc1's and twice as
// many blocks fill the card; U k-blocks a step, W warps splitting the k-blocks, x staged once
// per block in shared memory in pair order. Lane (0, t) ends with rows 2t and 2t + 1.
template <int W, int U, int MINB>
__global__ void __launch_bounds__(W * 32, MINB) gemv_tcb(Args a) {
  extern __shared__ uint4 xsmem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 8;
  const std::size_t row_bytes = static_cast<std::size_t>(a.k) / 2;
  const int kblocks = a.k >> 7;
  const std::uint8_t* wrow = a.codes + min(n0 + g, a.n - 1) * row_bytes + 16 * t;
  const float* srow0 = a.scales + static_cast<std::size_t>(min(n0 + 2 * t, a.n - 1)) * kblocks;
  const float* srow1 = a.scales + static_cast<std::size_t>(min(n0 + 2 * t + 1, a.n - 1)) * kblocks;
  uint4 w[U];
  float s0[U], s1[U];
  auto load = [&](int kb0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u * W;
      if (kb < kblocks) {
        w[u] = load_codes(wrow + static_cast<std::size_t>(kb) * 64);
        s0[u] = __ldg(srow0 + kb);
        s1[u] = __ldg(srow1 + kb);
      }
    }
  };
  load(warp);
  for (int i = threadIdx.x; i < a.k / 8; i += W * 32) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(a.x) + i);
    xsmem[i] = make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                          __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
  }
  __syncthreads();
  float acc0 = 0.f, acc1 = 0.f;
  for (int kb0 = warp; kb0 < kblocks; kb0 += W * U) {
    if (kb0 != warp) load(kb0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u * W;
      if (kb >= kblocks) continue;
      const uint2* xw = reinterpret_cast<const uint2*>(xsmem + kb * 16 + 4 * t);
      const std::uint32_t* words = reinterpret_cast<const std::uint32_t*>(&w[u]);
      float c[2][4] = {};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const std::uint32_t word = words[j / 2];
        std::uint32_t b[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          b[q] = fma2_bf16(and_xor(word >> (4 * (2 * (j % 2) + q)), 0x000F000Fu, 0x43084308u), 0x3F803F80u,
                           0xC308C308u);
        }
        const uint2 X = xw[j];
        mma_bf16(c[j % 2], X.x, X.x, X.y, X.y, b[0], b[1]);
      }
      acc0 = fmaf(s0[u], c[0][0] + c[1][0], acc0);
      acc1 = fmaf(s1[u], c[0][1] + c[1][1], acc1);
    }
  }
  __shared__ float partial[W][8];
  if (g == 0) {
    partial[warp][2 * t] = acc0;
    partial[warp][2 * t + 1] = acc1;
  }
  __syncthreads();
  if (threadIdx.x < 8 && n0 + static_cast<int>(threadIdx.x) < a.n) {
    float total = 0.f;
#pragma unroll
    for (int wi = 0; wi < W; ++wi) total += partial[wi][threadIdx.x];
    a.y[n0 + threadIdx.x] = to_bf16(total);
  }
}

template <int W, int U, int MINB>
void launch_tcb(const Args& a, cudaStream_t s) {
  gemv_tcb<W, U, MINB><<<(a.n + 7) / 8, W * 32, a.k * 2, s>>>(a);
}
