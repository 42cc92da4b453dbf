// Swapping a parameter's data between a view into device memory and a shared placeholder.
// Only `.data` changes: the Parameter object, its name, requires_grad and identity stay.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fastvideo_offload {

// Where a tensor sits inside a block buffer and what it looks like.
struct TensorLayout {
  int64_t offset;  // bytes from the start of the buffer
  int64_t span;    // bytes it covers (strides kept)
  c10::ScalarType dtype;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
};

TensorLayout describe(const at::Tensor& t, int64_t offset);

// A tensor of `layout`'s dtype, sizes and strides over `buffer`'s bytes.
at::Tensor view_into(const at::Tensor& buffer, const TensorLayout& layout);

// One empty tensor per (dtype, device), shared by every offloaded parameter outside its forward.
at::Tensor placeholder(c10::ScalarType dtype, c10::Device device);

// Whether `param`'s data is still `view` (its storage, offset, sizes and strides): a pointer compare.
bool holds(const at::Tensor& param, const at::Tensor& view);

void set_all(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& data);

}  // namespace fastvideo_offload
