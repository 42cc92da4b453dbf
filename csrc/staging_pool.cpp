#include "staging_pool.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "host_store.h"

namespace fastvideo_offload {

at::Tensor StagingPool::take(int64_t nbytes) {
  std::vector<at::Tensor> too_small;  // freed outside the lock: cudaFreeHost synchronizes the device
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->numel() >= nbytes && (best == idle_.end() || it->numel() < best->numel())) {
        best = it;
      }
    }
    if (best != idle_.end()) {
      at::Tensor buffer = std::move(*best);
      idle_.erase(best);
      return buffer;
    }
    too_small = std::exchange(idle_, {});
  }
  too_small.clear();
  const bool pinned = device_.is_cuda();
  at::Tensor buffer = alloc_host(nbytes, pinned, pinned ? std::optional<c10::Device>(device_) : std::nullopt);
  std::lock_guard<std::mutex> lock(mutex_);
  ++allocations_;
  return buffer;
}

void StagingPool::give(at::Tensor buffer) {
  std::lock_guard<std::mutex> lock(mutex_);
  idle_.push_back(std::move(buffer));
}

void StagingPool::clear() {
  std::vector<at::Tensor> doomed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    doomed = std::exchange(idle_, {});
  }
}

int64_t StagingPool::idle_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t total = 0;
  for (const at::Tensor& b : idle_) {
    total += b.numel();
  }
  return total;
}

int64_t StagingPool::allocations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return allocations_;
}

}  // namespace fastvideo_offload
