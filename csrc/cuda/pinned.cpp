// Pinned host memory straight from the CUDA runtime: exact size, unlike torch's caching
// host allocator, which rounds every request up to a power of two.
#include "pinned.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace fastvideo_offload::cuda {
namespace {

// Pinning works in the current device's context and creates it if needed: without the guard,
// offloading to cuda:1 would create a context (hundreds of MiB) on cuda:0.
void enter_device(c10::cuda::OptionalCUDAGuard& guard, c10::DeviceIndex device) {
  const c10::DeviceIndex count = c10::cuda::device_count();
  TORCH_CHECK_VALUE(device >= -1 && device < count, "pinned host memory for CUDA device ", device, ": no such device (",
                    count, " CUDA device(s) visible)");
  if (device >= 0) {
    guard.set_index(device);
  }
}

}  // namespace

// The free and the unregistration are called from destructors and finalizers: they switch to the
// device the memory was pinned for (by hand, as a guard may throw) and only warn.
template <typename Fn>
void on_device_noexcept(c10::DeviceIndex device, Fn fn) noexcept {
  try {
    c10::cuda::CUDAGuard guard(device);
    fn();
  } catch (const std::exception& e) {
    TORCH_WARN("fastvideo_offload: releasing pinned host memory on device ", static_cast<int>(device),
               " failed: ", e.what());
  }
}

void* pinned_alloc(size_t nbytes, c10::DeviceIndex device, c10::DeviceIndex* used) {
  c10::cuda::OptionalCUDAGuard guard;
  enter_device(guard, device);
  C10_CUDA_CHECK(c10::cuda::GetDevice(used));
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&ptr, nbytes, cudaHostAllocDefault));
  return ptr;
}

void pinned_free(void* ptr, c10::DeviceIndex device) noexcept {
  on_device_noexcept(device, [&] { C10_CUDA_CHECK_WARN(cudaFreeHost(ptr)); });
}

void host_register(void* ptr, size_t nbytes, c10::DeviceIndex device, bool read_only) {
  c10::cuda::OptionalCUDAGuard guard;
  enter_device(guard, device);
  const cudaError_t err = cudaHostRegister(ptr, nbytes, read_only ? cudaHostRegisterReadOnly : cudaHostRegisterDefault);
  if (err != cudaSuccess) {
    // Not a sticky error, but left as the last error the next kernel launch check would report it.
    (void)cudaGetLastError();
    TORCH_CHECK_WITH(OutOfMemoryError, err != cudaErrorMemoryAllocation, "cudaHostRegister of ", nbytes,
                     " bytes: out of memory");
    TORCH_CHECK_NOT_IMPLEMENTED(false, "cudaHostRegister of ", nbytes, " bytes failed: ", cudaGetErrorString(err));
  }
}

void host_unregister(void* ptr, c10::DeviceIndex device) noexcept {
  on_device_noexcept(device, [&] { C10_CUDA_CHECK_WARN(cudaHostUnregister(ptr)); });
}

}  // namespace fastvideo_offload::cuda
