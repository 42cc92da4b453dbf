// The CPU device: "uploads" are synchronous copies into CPU slots, so ordering is trivial.
// It runs the same engine as CUDA, which is what lets the whole schedule be tested without a GPU.
#include "../transfer.h"

#include "../host_store.h"

namespace fastvideo_offload {
namespace {

// Every copy has finished when upload() returns.
class DoneFence final : public Fence {
 public:
  void wait() override {}
};

class CpuTransfer final : public Transfer {
 public:
  void set_slot_count(int) override {}
  void upload(int, void* dst, const void* src, size_t nbytes) override {
    parallel_memcpy(dst, src, static_cast<int64_t>(nbytes));
  }
  std::unique_ptr<Fence> fence() override { return std::make_unique<DoneFence>(); }
  void wait_ready(int) override {}
  void release(int) override {}
  void synchronize() override {}
};

}  // namespace

std::unique_ptr<Transfer> make_cpu_transfer() { return std::make_unique<CpuTransfer>(); }

}  // namespace fastvideo_offload
