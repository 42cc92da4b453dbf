// The CUDA device: one dedicated copy stream per engine and two events per slot.
//   copy stream:    wait(released[s]) -> one cudaMemcpyAsync -> record(ready[s])
//   compute stream: wait(ready[s]) before the block runs, record(released[s]) after it.
// Reuse of a slot is ordered by events on the device alone: no host synchronize, no
// whole-stream wait, no record_stream.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "../transfer.h"

namespace fastvideo_offload {
namespace {

// An event recorded on the copy stream; the host waits for it before a staging buffer is refilled.
class EventFence final : public Fence {
 public:
  EventFence(c10::DeviceIndex device, cudaStream_t stream) {
    c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  ~EventFence() override { C10_CUDA_CHECK_WARN(cudaEventDestroy(event_)); }
  void wait() override { C10_CUDA_CHECK(cudaEventSynchronize(event_)); }

 private:
  cudaEvent_t event_ = nullptr;
};

class CudaTransfer final : public Transfer {
 public:
  explicit CudaTransfer(c10::DeviceIndex device) : device_(device) {
    c10::cuda::CUDAGuard guard(device_);
    int least = 0;
    int greatest = 0;
    C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, greatest));
  }

  ~CudaTransfer() override {
    // CUDAGuard may throw, and a throwing destructor ends the process: switch by hand, warn only.
    int previous = -1;
    C10_CUDA_CHECK_WARN(cudaGetDevice(&previous));
    C10_CUDA_CHECK_WARN(cudaSetDevice(device_));
    C10_CUDA_CHECK_WARN(cudaStreamSynchronize(copy_stream_));
    for (size_t s = 0; s < ready_.size(); ++s) {
      C10_CUDA_CHECK_WARN(cudaEventSynchronize(released_[s]));
      C10_CUDA_CHECK_WARN(cudaEventDestroy(ready_[s]));
      C10_CUDA_CHECK_WARN(cudaEventDestroy(released_[s]));
    }
    C10_CUDA_CHECK_WARN(cudaStreamDestroy(copy_stream_));
    if (previous >= 0) {
      C10_CUDA_CHECK_WARN(cudaSetDevice(previous));
    }
  }

  void set_slot_count(int count) override {
    c10::cuda::CUDAGuard guard(device_);
    while (static_cast<int>(ready_.size()) < count) {
      cudaEvent_t ready = nullptr;
      cudaEvent_t released = nullptr;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&released, cudaEventDisableTiming));
      ready_.push_back(ready);
      released_.push_back(released);
    }
  }

  void upload(int slot, void* dst, const void* src, size_t nbytes) override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, released_.at(slot), 0));
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, copy_stream_));
    C10_CUDA_CHECK(cudaEventRecord(ready_.at(slot), copy_stream_));
  }

  std::unique_ptr<Fence> fence() override { return std::make_unique<EventFence>(device_, copy_stream_); }

  void wait_ready(int slot) override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamWaitEvent(compute_stream(), ready_.at(slot), 0));
  }

  void release(int slot) override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventRecord(released_.at(slot), compute_stream()));
  }

  void synchronize() override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
    for (cudaEvent_t released : released_) {
      C10_CUDA_CHECK(cudaEventSynchronize(released));  // returns at once for a slot never released
    }
  }

  int64_t free_bytes() override {
    c10::cuda::CUDAGuard guard(device_);
    size_t free = 0;
    size_t total = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    namespace alloc = c10::cuda::CUDACachingAllocator;
    try {
      const auto stats = alloc::getDeviceStats(device_);
      constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
      const int64_t reserved = stats.reserved_bytes[all].current;
      const int64_t cached = reserved - stats.allocated_bytes[all].current;
      // New memory must fit both the driver's free memory and the process's allowed fraction
      // (torch.cuda.set_per_process_memory_fraction); cached memory may also serve the slot.
      const auto allowed = static_cast<int64_t>(alloc::getMemoryFraction(device_) * static_cast<double>(total));
      return std::max<int64_t>(0, std::min(static_cast<int64_t>(free), allowed - reserved)) + cached;
    } catch (const c10::Error&) {
      // An allocator backend without these statistics: the driver's count is all there is.
      return static_cast<int64_t>(free);
    }
  }

 private:
  cudaStream_t compute_stream() const { return c10::cuda::getCurrentCUDAStream(device_).stream(); }

  c10::DeviceIndex device_;
  cudaStream_t copy_stream_ = nullptr;
  std::vector<cudaEvent_t> ready_;
  std::vector<cudaEvent_t> released_;
};

}  // namespace

std::unique_ptr<Transfer> make_cuda_transfer(c10::DeviceIndex device) {
  return std::make_unique<CudaTransfer>(device);
}

}  // namespace fastvideo_offload
