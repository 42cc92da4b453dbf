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
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "../transfer.h"

namespace fastvideo_offload {
namespace {

// Runs `fn` with `device` current and puts the previous one back, never throwing: for destructors
// and for threads that are not the caller's (a staging thread, a garbage collector's), where a
// call without the device would make a context on GPU 0 (hundreds of MiB) for cuda:N.
template <typename Fn>
void on_device_noexcept(c10::DeviceIndex device, Fn fn) noexcept {
  try {
    c10::cuda::CUDAGuard guard(device);
    fn();
  } catch (const std::exception& e) {
    TORCH_WARN("fastvideo_offload: CUDA cleanup on device ", static_cast<int>(device), " failed: ", e.what());
  }
}

// Events the host may wait for without spinning a core (a staging thread waits for one per buffer
// it refills): created once and handed out again, not created and destroyed per staged upload.
class EventPool {
 public:
  explicit EventPool(c10::DeviceIndex device) : device_(device) {}
  ~EventPool() {
    on_device_noexcept(device_, [&] {
      for (cudaEvent_t event : idle_) {
        C10_CUDA_CHECK_WARN(cudaEventDestroy(event));
      }
    });
  }
  cudaEvent_t take() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!idle_.empty()) {
        cudaEvent_t event = idle_.back();
        idle_.pop_back();
        return event;
      }
    }
    return create(device_);
  }
  void give(cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(event);
  }
  // Blocking sync: cudaEventSynchronize yields the thread instead of spinning on it.
  static cudaEvent_t create(c10::DeviceIndex device) {
    c10::cuda::CUDAGuard guard(device);
    cudaEvent_t event = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventBlockingSync));
    return event;
  }
  c10::DeviceIndex device() const { return device_; }

 private:
  const c10::DeviceIndex device_;
  std::mutex mutex_;
  std::vector<cudaEvent_t> idle_;
};

// An event recorded on the copy stream; the host waits for it before a staging buffer is refilled.
class EventFence final : public Fence {
 public:
  EventFence(std::shared_ptr<EventPool> pool, cudaStream_t stream) : pool_(std::move(pool)), event_(pool_->take()) {
    c10::cuda::CUDAGuard guard(pool_->device());
    const cudaError_t err = cudaEventRecord(event_, stream);
    if (err != cudaSuccess) {
      pool_->give(event_);
      C10_CUDA_CHECK(err);
    }
  }
  ~EventFence() override { pool_->give(event_); }
  void wait() override {
    c10::cuda::CUDAGuard guard(pool_->device());
    C10_CUDA_CHECK(cudaEventSynchronize(event_));
  }

 private:
  std::shared_ptr<EventPool> pool_;
  cudaEvent_t event_ = nullptr;
};

class CudaTransfer final : public Transfer {
 public:
  explicit CudaTransfer(c10::DeviceIndex device) : device_(device), fences_(std::make_shared<EventPool>(device)) {
    c10::cuda::CUDAGuard guard(device_);
    int least = 0;
    int greatest = 0;
    C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, greatest));
  }

  ~CudaTransfer() override {
    on_device_noexcept(device_, [&] {
      C10_CUDA_CHECK_WARN(cudaStreamSynchronize(copy_stream_));
      for (size_t s = 0; s < ready_.size(); ++s) {
        C10_CUDA_CHECK_WARN(cudaEventSynchronize(released_[s]));
        C10_CUDA_CHECK_WARN(cudaEventDestroy(ready_[s]));
        C10_CUDA_CHECK_WARN(cudaEventDestroy(released_[s]));
      }
      C10_CUDA_CHECK_WARN(cudaStreamDestroy(copy_stream_));
    });
  }

  void set_slot_count(int count) override {
    c10::cuda::CUDAGuard guard(device_);
    while (static_cast<int>(ready_.size()) < count) {
      ready_.push_back(EventPool::create(device_));
      released_.push_back(EventPool::create(device_));
    }
  }

  void upload(int slot, void* dst, const void* src, size_t nbytes) override {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, released_.at(slot), 0));
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, copy_stream_));
    C10_CUDA_CHECK(cudaEventRecord(ready_.at(slot), copy_stream_));
  }

  std::unique_ptr<Fence> fence() override { return std::make_unique<EventFence>(fences_, copy_stream_); }

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

  int64_t allocated_bytes() override {
    try {
      constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
      return c10::cuda::CUDACachingAllocator::getDeviceStats(device_).allocated_bytes[all].current;
    } catch (const c10::Error&) {
      return -1;  // an allocator backend without statistics
    }
  }

 private:
  cudaStream_t compute_stream() const { return c10::cuda::getCurrentCUDAStream(device_).stream(); }

  c10::DeviceIndex device_;
  std::shared_ptr<EventPool> fences_;
  cudaStream_t copy_stream_ = nullptr;
  std::vector<cudaEvent_t> ready_;
  std::vector<cudaEvent_t> released_;
};

}  // namespace

std::unique_ptr<Transfer> make_cuda_transfer(c10::DeviceIndex device) { return std::make_unique<CudaTransfer>(device); }

}  // namespace fastvideo_offload
