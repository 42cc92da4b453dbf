#include "swap.h"

#include <ATen/ATen.h>

#include <map>
#include <mutex>
#include <utility>

#include "host_store.h"

namespace fastvideo_offload {

TensorLayout describe(const at::Tensor& t, int64_t offset) {
  return {offset, span_bytes(t), t.scalar_type(), t.sizes().vec(), t.strides().vec()};
}

at::Tensor view_into(const at::Tensor& buffer, const TensorLayout& layout) {
  const int64_t item = static_cast<int64_t>(c10::elementSize(layout.dtype));
  // The offset is 256-aligned, so it is a whole number of elements of any dtype.
  return buffer.narrow(0, layout.offset, layout.span)
      .view(layout.dtype)
      .as_strided(layout.sizes, layout.strides, layout.offset / item);
}

at::Tensor placeholder(c10::ScalarType dtype, c10::Device device) {
  static std::mutex mutex;
  // Never destroyed: CUDA tensors must not be freed after the CUDA runtime has shut down at exit.
  static auto* cache = new std::map<std::pair<c10::ScalarType, std::string>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = (*cache)[{dtype, device.str()}];
  if (!slot.defined()) {
    slot = at::empty({0}, at::TensorOptions().dtype(dtype).device(device));
  }
  return slot;
}

bool holds(const at::Tensor& param, const at::Tensor& view) {
  return param.is_alias_of(view) && param.storage_offset() == view.storage_offset() && param.sizes() == view.sizes() &&
         param.strides() == view.strides();
}

void set_all(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& data) {
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].set_data(data[i]);
  }
}

}  // namespace fastvideo_offload
