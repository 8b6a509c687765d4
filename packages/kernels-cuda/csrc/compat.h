// One header that lets every kernel source compile for CUDA (nvcc) and for HIP (clang/hipcc).
//
// The kernels never name a vendor API directly: they use the DS_* names below. The ROCm
// package compiles the very same .cu files with the HIP language and DS_KERNELS_HIP defined,
// so there is one copy of each kernel. Half precision uses the vendors' __half; bfloat16 is
// handled as raw bits (see dtypes.h) because HIP releases disagree on the bfloat16 header.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(DS_KERNELS_HIP)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>

using ds_stream_t = hipStream_t;
using ds_error_t = hipError_t;
#define DS_SUCCESS hipSuccess
#define DS_GET_LAST_ERROR hipGetLastError
#define DS_ERROR_STRING hipGetErrorString
// CDNA GPUs (the ones ROCm training targets) run 64-lane wavefronts.
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define DS_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define DS_WARP_SIZE 64
#endif
#define DS_SHFL_XOR(value, mask, width) __shfl_xor((value), (mask), (width))
#define DS_FUNC_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  hipFuncSetAttribute(reinterpret_cast<const void*>(kernel), hipFuncAttributeMaxDynamicSharedMemorySize, (bytes))
#define DS_OCCUPANCY_BLOCKS_PER_SM hipOccupancyMaxActiveBlocksPerMultiprocessor
#define DS_GET_DEVICE hipGetDevice
#define DS_DEVICE_MULTIPROCESSORS(out, device) \
  hipDeviceGetAttribute((out), hipDeviceAttributeMultiprocessorCount, (device))

#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>

using ds_stream_t = cudaStream_t;
using ds_error_t = cudaError_t;
#define DS_SUCCESS cudaSuccess
#define DS_GET_LAST_ERROR cudaGetLastError
#define DS_ERROR_STRING cudaGetErrorString
#define DS_WARP_SIZE 32
#define DS_SHFL_XOR(value, mask, width) __shfl_xor_sync(0xffffffffu, (value), (mask), (width))
#define DS_FUNC_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (bytes))
#define DS_OCCUPANCY_BLOCKS_PER_SM cudaOccupancyMaxActiveBlocksPerMultiprocessor
#define DS_GET_DEVICE cudaGetDevice
#define DS_DEVICE_MULTIPROCESSORS(out, device) \
  cudaDeviceGetAttribute((out), cudaDevAttrMultiProcessorCount, (device))
#endif

// Launch results travel back to Python as a message (nullptr on success), so the bindings
// need no vendor header and one error path serves both platforms.
#define DS_RETURN_LAUNCH_STATUS()                                   \
  do {                                                              \
    ds_error_t ds_status_ = DS_GET_LAST_ERROR();                    \
    return ds_status_ == DS_SUCCESS ? nullptr : DS_ERROR_STRING(ds_status_); \
  } while (0)

namespace ds {

inline ds_stream_t as_stream(std::uintptr_t handle) {
  return reinterpret_cast<ds_stream_t>(handle);
}

// How many blocks of `kernel` the current GPU runs at once: the grid of a persistent kernel.
template <typename Kernel>
ds_error_t resident_blocks(Kernel kernel, int threads, std::size_t smem, int* blocks) {
  int device = 0, multiprocessors = 0, per_multiprocessor = 0;
  ds_error_t status = DS_GET_DEVICE(&device);
  if (status == DS_SUCCESS) status = DS_DEVICE_MULTIPROCESSORS(&multiprocessors, device);
  if (status == DS_SUCCESS) status = DS_OCCUPANCY_BLOCKS_PER_SM(&per_multiprocessor, kernel, threads, smem);
  *blocks = (per_multiprocessor > 0 ? per_multiprocessor : 1) * (multiprocessors > 0 ? multiprocessors : 1);
  return status;
}

}  // namespace ds
