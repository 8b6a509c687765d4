// The grid size both MoE sources (moe.cu: gating, moe_rows.cu: row movement) launch their
// grid-stride kernels with.
#pragma once

#include <cstdint>

namespace ds {
namespace moe {

constexpr std::int64_t kMaxGrid = 1 << 20;

// Blocks of `per_block` work items covering `work`, at least one and at most kMaxGrid (the
// kernels stride over the rest).
inline int grid_for(std::int64_t work, int per_block) {
  const std::int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

}  // namespace moe
}  // namespace ds
