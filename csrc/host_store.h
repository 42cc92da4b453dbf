// Exact-size host buffers and the byte layout of a block inside one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <optional>

namespace fastvideo_offload {

// Offsets inside a block buffer are multiples of this (CUDA's own allocation granularity).
constexpr int64_t kMinAlignment = 256;

// Bytes from a tensor's first element to the end of its last one: strides are kept, so
// a non-contiguous tensor is stored with its gaps and comes back with the same strides.
int64_t span_bytes(const at::Tensor& t);

// A uint8 CPU tensor of exactly `nbytes`: pinned (cudaHostAlloc) or page-aligned pageable.
// `device` is the CUDA device a pinned buffer is for (none: the current one); unused when pageable.
at::Tensor alloc_host(int64_t nbytes, bool pinned, std::optional<c10::Device> device = std::nullopt);

// memcpy spread over ATen's intra-op threads in large pieces; small copies run inline.
void parallel_memcpy(void* dst, const void* src, int64_t nbytes);

// Zeroes the bytes of a block buffer that no tensor covers, so a buffer's contents depend on
// its tensors alone.
void zero_padding(const at::Tensor& buffer, at::TensorList tensors, at::IntArrayRef offsets);

// Checks that each tensor's span fits at its offset inside `nbytes`, aligned, without overlap.
void check_layout(at::TensorList tensors, at::IntArrayRef offsets, int64_t nbytes, const char* op);

}  // namespace fastvideo_offload
