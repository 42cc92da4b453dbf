// pack for tensors that live on a CUDA device (FastVideo builds its DiT on the GPU first):
// one device-to-host copy per tensor straight into the block's host buffer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "../host_store.h"
#include "../ops.h"

namespace fastvideo_offload {

at::Tensor pack_cuda(at::TensorList tensors, at::IntArrayRef offsets, int64_t nbytes, bool pinned,
                     std::optional<c10::Device> target) {
  check_layout(tensors, offsets, nbytes, "pack");
  TORCH_CHECK_VALUE(!tensors.empty(), "pack: no tensors");
  const c10::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].device() == device, "pack: tensor ", i, " is on ", tensors[i].device(),
                      " but tensor 0 is on ", device, "; all tensors of one block must be on the same device");
  }
  // Pinned for the target device, or else for the device the tensors are on.
  at::Tensor buffer = alloc_host(nbytes, pinned, target.has_value() ? target : device);
  zero_padding(buffer, tensors, offsets);
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  auto* base = static_cast<char*>(buffer.data_ptr());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t span = span_bytes(tensors[i]);
    if (span > 0) {
      C10_CUDA_CHECK(cudaMemcpyAsync(base + offsets[i], tensors[i].const_data_ptr(), static_cast<size_t>(span),
                                     cudaMemcpyDeviceToHost, stream));
    }
  }
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return buffer;
}

}  // namespace fastvideo_offload
