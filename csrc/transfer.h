// How bytes reach a device slot and how the compute side is ordered after them.
// One implementation per device: cpu/transfer.cpp (synchronous), cpu/async_transfer.cpp (a CPU
// copy engine on a thread, for tests), cuda/transfer.cu.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "faults.h"

namespace fastvideo_offload {

// A point in the copy stream the host can wait for: every upload issued before it has finished
// reading its source (so a staging buffer it read may be refilled).
class Fence {
 public:
  virtual ~Fence() = default;
  virtual void wait() = 0;
};

class Transfer {
 public:
  virtual ~Transfer() = default;
  // Gives every slot its own ordering state; called before slots are used.
  virtual void set_slot_count(int count) = 0;
  // Copies `nbytes` host -> slot once the compute side has released the slot.
  virtual void upload(int slot, void* dst, const void* src, size_t nbytes) = 0;
  // A fence after every upload issued so far.
  virtual std::unique_ptr<Fence> fence() = 0;
  // Makes the caller's compute stream wait for the last upload into `slot`.
  virtual void wait_ready(int slot) = 0;
  // Marks, on the caller's compute stream, that the slot may be overwritten after this point.
  virtual void release(int slot) = 0;
  // Blocks the host until every copy issued so far has finished and the compute side is done
  // with every released slot: only then may slot memory go back to the allocator, which could
  // hand it to a copy that waits on another slot's events.
  virtual void synchronize() = 0;
  // The slot's memory goes back to the allocator now (after synchronize()).
  virtual void retire(int /*slot*/) {}
  // Bytes a new slot may take without sending the device allocator into its out-of-memory
  // path (which frees its whole cache and synchronizes the device); -1 when there is no limit.
  virtual int64_t free_bytes() { return -1; }
  // Bytes the device allocator has handed out in all (slots, weights, activations); -1 where unknown.
  virtual int64_t allocated_bytes() { return -1; }
};

std::unique_ptr<Transfer> make_cpu_transfer();
// FASTVIDEO_OFFLOAD_ASYNC_DELAY_US, _CHUNK_BYTES and _SEED tune it (cpu/async_transfer.cpp).
std::unique_ptr<Transfer> make_async_cpu_transfer(const Faults& faults);
#ifdef FVO_WITH_CUDA
std::unique_ptr<Transfer> make_cuda_transfer(c10::DeviceIndex device);
#endif

}  // namespace fastvideo_offload
