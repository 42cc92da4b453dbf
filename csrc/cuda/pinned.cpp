// Pinned host memory straight from the CUDA runtime: exact size, unlike torch's caching
// host allocator, which rounds every request up to a power of two.
#include "pinned.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

namespace fastvideo_offload::cuda {

void* pinned_alloc(size_t nbytes) {
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&ptr, nbytes, cudaHostAllocDefault));
  return ptr;
}

void pinned_free(void* ptr) { C10_CUDA_CHECK_WARN(cudaFreeHost(ptr)); }

}  // namespace fastvideo_offload::cuda
