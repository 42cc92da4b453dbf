// The ops' C++ entry points, one line each. Schemas live in bindings.cpp.
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <string>
#include <vector>

namespace fastvideo_offload {

// host_store.cpp
std::vector<int64_t> layout(at::TensorList tensors, int64_t alignment);
// `device`: the CUDA device a pinned buffer is for (None: the current one).
at::Tensor pack_cpu(at::TensorList tensors, at::IntArrayRef offsets, int64_t nbytes, bool pinned,
                    std::optional<c10::Device> device);
// An uninitialized buffer, page-aligned or pinned for CUDA `device` (declared in host_store.h too).
at::Tensor alloc_host(int64_t nbytes, bool pinned, std::optional<c10::Device> device);
void pin_host(const at::Tensor& memory, c10::Device device, bool read_only);
void unpin_host(const at::Tensor& memory, c10::Device device);
#ifdef FVO_WITH_CUDA
// cuda/pack.cpp
at::Tensor pack_cuda(at::TensorList tensors, at::IntArrayRef offsets, int64_t nbytes, bool pinned,
                     std::optional<c10::Device> device);
#endif

// registry.cpp
int64_t engine_create(c10::Device device, int64_t prefetch, int64_t staging_threads, int64_t share_staging_with);
int64_t engine_add_block(int64_t engine, const at::Tensor& host, at::TensorList params, at::IntArrayRef offsets,
                         bool staged);
int64_t engine_add_gathered_block(int64_t engine, at::TensorList sources, int64_t nbytes, at::TensorList params,
                                  at::IntArrayRef offsets);
void engine_enter(int64_t engine, int64_t block);
void engine_exit(int64_t engine, int64_t block);
bool engine_enter_grad(int64_t engine, int64_t block, bool in_backward);
int64_t engine_exit_grad(int64_t engine, int64_t block);
void engine_hold(int64_t engine, int64_t block, int64_t token);
void engine_unhold(int64_t engine, int64_t block);
int64_t engine_drop_holds(int64_t engine);
void engine_park(int64_t engine, int64_t block);
void engine_reset(int64_t engine);
void engine_set_slot_budget(int64_t engine, int64_t nbytes);
void engine_invalidate(int64_t engine);
void engine_trim(int64_t engine);
void engine_set_resident(int64_t engine, at::IntArrayRef blocks);
c10::Dict<std::string, int64_t> engine_stats(int64_t engine);
std::vector<int64_t> engine_order(int64_t engine);
void engine_trace_staging(int64_t engine, bool on);
void engine_watch_memory(int64_t engine, bool on);
at::Tensor engine_staging_trace(int64_t engine);
void engine_destroy(int64_t engine);

}  // namespace fastvideo_offload
