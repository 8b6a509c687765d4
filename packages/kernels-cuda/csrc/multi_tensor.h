// The device side of the multi-tensor optimizer table (kernels.h): which tensor a block's
// chunk belongs to and that tensor's row. Adam and LAMB read the same table, so one table
// built by the Python launcher serves both.
#pragma once

#include "compat.h"
#include "kernels.h"

namespace ds {

// Last row whose first_chunk <= chunk: a binary search over the table's first_chunk column.
__device__ __forceinline__ std::int64_t find_tensor(const std::int64_t* table,
                                                    std::int64_t num_tensors,
                                                    std::int64_t chunk) {
  std::int64_t lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * kAdamTableColumns + 6] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace ds
