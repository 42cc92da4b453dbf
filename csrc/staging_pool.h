// Staging buffers that outlive one staging ring. A ring is made by an engine's first staged upload
// and goes with trim(); the engines of one group (Wan2.2's two experts, which take turns on the
// device) share one pool, so that at each switch the ring of the expert that starts takes the
// buffers the idle one gave back, instead of pinning them anew (seconds of page locking for a
// 14B model's blocks, and a device synchronize per cudaFreeHost).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <mutex>
#include <vector>

namespace fastvideo_offload {

class StagingPool {
 public:
  // Buffers pinned for `device` when it is CUDA; pageable on the CPU devices, as slots are.
  explicit StagingPool(c10::Device device) : device_(device) {}
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // The smallest idle buffer of at least `nbytes`, else a new one. Idle buffers too small for it
  // are freed first: the rings of one group stage blocks of one size, so they would stay idle.
  at::Tensor take(int64_t nbytes);
  // A buffer no upload reads any more goes back, for the next ring.
  void give(at::Tensor buffer);
  // Frees the idle buffers (the last engine using the pool was trimmed).
  void clear();

  c10::Device device() const { return device_; }
  int64_t idle_bytes() const;
  // Buffers allocated so far: a group's switches that reuse them do not raise it.
  int64_t allocations() const;

 private:
  const c10::Device device_;
  mutable std::mutex mutex_;
  std::vector<at::Tensor> idle_;
  int64_t allocations_ = 0;
};

}  // namespace fastvideo_offload
