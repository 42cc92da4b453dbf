// Page-locked host memory from the CUDA runtime, at exactly the size asked for.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>

namespace fastvideo_offload::cuda {

// Pinned in the context of CUDA device `device` (the one its copies go to); -1: the current one,
// which `*used` is set to, for the free.
void* pinned_alloc(size_t nbytes, c10::DeviceIndex device, c10::DeviceIndex* used);
// In `device`'s context, from any thread (a tensor's deleter may run on a garbage collector's); never throws.
void pinned_free(void* ptr, c10::DeviceIndex device) noexcept;
// Page-locks memory someone else allocated (a shared mapping), in place, for `device`'s copies.
// Out of memory raises torch.OutOfMemoryError, any other failure (registration not supported by
// the driver or sandbox) NotImplementedError; the runtime's error is cleared either way.
// `read_only`: the pages are mapped without write access, which cudaHostRegister refuses unless told.
void host_register(void* ptr, size_t nbytes, c10::DeviceIndex device, bool read_only);
void host_unregister(void* ptr, c10::DeviceIndex device) noexcept;

}  // namespace fastvideo_offload::cuda
