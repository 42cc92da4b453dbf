#include "slot_pool.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <utility>

namespace fastvideo_offload {

SlotPool::SlotPool(c10::Device device, int64_t prefetch, const Faults& faults, std::unique_ptr<Transfer> transfer,
                   Owner& owner)
    : device_(device), prefetch_(prefetch), faults_(faults), owner_(owner), transfer_(std::move(transfer)) {}

void SlotPool::add_block(int64_t nbytes) {
  const auto index = static_cast<int64_t>(nbytes_.size());
  // No more blocks can be in flight than there are besides the running one.
  ring_ = static_cast<int>(std::min<int64_t>(prefetch_, index)) + 1;
  slot_bytes_ = std::max(slot_bytes_, nbytes);
  nbytes_.push_back(nbytes);
  home_.push_back(-1);
  fixed_.push_back(0);
  assign_fixed();
}

void SlotPool::assign_fixed() {
  int rank = 0;
  for (size_t b = 0; b < home_.size(); ++b) {
    fixed_[b] = home_[b] >= 0 ? -1 : rank++ % ring_;
  }
}

bool SlotPool::any_resident() const {
  return std::any_of(home_.begin(), home_.end(), [](int home) { return home >= 0; });
}

void SlotPool::make() {
  if (!slots_.empty()) {
    return;
  }
  slots_.resize(static_cast<size_t>(ring_));
  for (Slot& slot : slots_) {
    slot.bytes = slot_bytes_;
  }
  for (size_t b = 0; b < home_.size(); ++b) {
    if (home_[b] >= 0) {
      slots_.resize(std::max<size_t>(slots_.size(), static_cast<size_t>(home_slot(b)) + 1));
      slots_[home_slot(b)].bytes = nbytes_[b];
    }
  }
  transfer_->set_slot_count(static_cast<int>(slots_.size()));
}

bool SlotPool::fits_budget(int index) const {
  return budget_ < 0 || allocated_bytes() + slots_[index].bytes <= budget_;
}

bool SlotPool::try_allocate(int index, std::string* failure) {
  try {
    slots_[index].buffer = at::empty({slots_[index].bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
    ++slots_[index].generation;
    // The allocator may hand back memory that kernels queued on the compute stream still use:
    // the first copy into it waits until the compute stream has passed this point.
    transfer_->release(index);
    return true;
  } catch (const c10::OutOfMemoryError& e) {
    ++alloc_failures_;
    if (failure != nullptr) {
      *failure = e.what_without_backtrace();
    }
    return false;
  }
}

bool SlotPool::allocate(int index, bool required) {
  if (slots_[index].buffer.defined()) {
    return true;
  }
  if (!required) {
    // A prefetch only takes memory that is there: asking the allocator for more than the device
    // has makes it free its whole cache and synchronize the device before it throws.
    // Short-circuit: once blocked, no prefetch of this forward asks the driver again (hot path).
    const auto no_room = [&] {
      const int64_t free = transfer_->free_bytes();
      return free >= 0 && free < slots_[index].bytes;
    };
    if (prefetch_blocked_ || !fits_budget(index) || no_room() || !try_allocate(index, nullptr)) {
      prefetch_blocked_ = true;
      ++prefetches_skipped_;
      return false;
    }
    return true;
  }
  std::string failure;
  if (fits_budget(index) && try_allocate(index, &failure)) {
    return true;
  }
  // The block must run: give back every slot that no running block needs, then try once more.
  free_except(index);
  TORCH_CHECK_WITH(OutOfMemoryError, fits_budget(index), "fastvideo_offload: no device memory for one block (",
                   slots_[index].bytes, " bytes): the slot budget is ", budget_, " bytes");
  if (!try_allocate(index, &failure)) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, "fastvideo_offload: no device memory for one block (",
                     slots_[index].bytes, " bytes on ", device_,
                     ") even after freeing every prefetched block: ", failure);
  }
  return true;
}

int SlotPool::claim(int64_t block, const std::vector<int64_t>& keep, bool required) {
  make();
  if (resident(block)) {
    return allocate(home_slot(block), required) ? home_slot(block) : -1;
  }
  // Cheapest first: an allocated empty slot, then the least recently used allocated slot whose
  // block is neither running nor about to run, then memory not allocated yet. A block that must
  // run takes, last, the slot of one only about to run (copied again when it runs): with a block
  // run inside another's forward, those may hold every slot that no running block holds.
  int best = -1;
  auto rank = [&](int s) {
    const Slot& slot = slots_[s];
    if (!slot.buffer.defined()) {
      return 2;
    }
    if (slot.block < 0) {
      return 0;
    }
    return std::find(keep.begin(), keep.end(), slot.block) != keep.end() ? 3 : 1;
  };
  for (int s = 0; s < ring_; ++s) {
    const Slot& slot = slots_[s];
    if ((slot.block >= 0 && owner_.in_use(slot.block)) || (!required && rank(s) == 3)) {
      continue;
    }
    if (best < 0 || rank(s) < rank(best) || (rank(s) == rank(best) && slot.last_use < slots_[best].last_use)) {
      best = s;
    }
  }
  if (best >= 0 && !allocate(best, required)) {
    return -1;
  }
  return best;
}

int SlotPool::claim_fixed(int64_t block, bool required) {
  make();
  const int s = fixed_slot(block);
  const int64_t occupant = slots_[s].block;
  if (occupant >= 0 && occupant != block && owner_.in_use(occupant)) {
    return -1;
  }
  return allocate(s, required) ? s : -1;
}

void SlotPool::vacate(int slot) {
  Slot& s = slots_[slot];
  if (s.block >= 0) {
    owner_.evicted(s.block);
    s.block = -1;
  }
}

void SlotPool::fill(int slot, int64_t block) {
  slots_[slot].block = block;
  slots_[slot].last_use = ++tick_;
}

void SlotPool::release(int slot) {
  transfer_->release(slot);
  slots_[slot].last_use = ++tick_;
}

void SlotPool::forget() {
  for (int s = 0; s < static_cast<int>(slots_.size()); ++s) {
    vacate(s);
  }
}

std::vector<at::Tensor>& SlotPool::views(int slot, int64_t block) {
  auto& views = slots_[slot].views;
  if (views.size() <= static_cast<size_t>(block)) {
    views.resize(static_cast<size_t>(block) + 1);
  }
  return views[block];
}

void SlotPool::free(const std::vector<int>& doomed) {
  if (doomed.empty()) {
    return;
  }
  // Slot memory may go back to the allocator only once no copy into it and no kernel reading
  // it is in flight.
  if (!faults_.free_unsynchronized) {
    transfer_->synchronize();
  }
  for (const int s : doomed) {
    Slot& slot = slots_[s];
    transfer_->retire(s);
    vacate(s);
    slot.buffer = at::Tensor();
    ++slot.generation;
    slot.last_use = 0;
    slot.views.clear();
  }
}

void SlotPool::free_except(int keep) {
  std::vector<int> doomed;
  for (size_t s = 0; s < slots_.size(); ++s) {
    const Slot& slot = slots_[s];
    if (static_cast<int>(s) != keep && slot.buffer.defined() && (slot.block < 0 || !owner_.in_use(slot.block))) {
      doomed.push_back(static_cast<int>(s));
    }
  }
  free(doomed);
}

void SlotPool::free_all() {
  prefetch_blocked_ = false;
  if (slots_.empty()) {
    return;
  }
  free_except(-1);
  slots_.clear();
}

void SlotPool::set_resident(const std::vector<bool>& chosen) {
  int64_t ring_bytes = 0;
  for (size_t b = 0; b < nbytes_.size(); ++b) {
    if (!chosen[b]) {
      ring_bytes = std::max(ring_bytes, nbytes_[b]);
    }
  }
  std::vector<int> doomed;
  std::vector<bool> taken;  // home indices kept by blocks that stay resident
  for (size_t b = 0; b < home_.size(); ++b) {
    if (home_[b] >= 0 && chosen[b]) {
      taken.resize(std::max<size_t>(taken.size(), static_cast<size_t>(home_[b]) + 1), false);
      taken[home_[b]] = true;
    } else if (home_[b] >= 0) {
      if (!slots_.empty() && slots_[home_slot(b)].buffer.defined()) {
        doomed.push_back(home_slot(b));
      }
      home_[b] = -1;
    }
  }
  if (ring_bytes != slot_bytes_ && !slots_.empty()) {
    for (int s = 0; s < ring_; ++s) {
      if (slots_[s].buffer.defined()) {
        doomed.push_back(s);
      }
    }
  }
  free(doomed);
  slot_bytes_ = ring_bytes;
  for (size_t b = 0; b < home_.size(); ++b) {
    if (!chosen[b] || home_[b] >= 0) {
      continue;
    }
    // A block that becomes resident may be cached in a ring slot: it is copied into its own once.
    for (int s = 0; s < ring_ && s < static_cast<int>(slots_.size()); ++s) {
      if (slots_[s].block == static_cast<int64_t>(b)) {
        vacate(s);
      }
    }
    const auto free_home = std::find(taken.begin(), taken.end(), false);
    home_[b] = static_cast<int>(free_home - taken.begin());
    if (free_home == taken.end()) {
      taken.push_back(true);
    } else {
      *free_home = true;
    }
  }
  assign_fixed();
  if (slots_.empty()) {
    return;  // make() sizes them at the first claim
  }
  for (int s = 0; s < ring_; ++s) {
    slots_[s].bytes = slot_bytes_;
  }
  slots_.resize(static_cast<size_t>(ring_) + taken.size());
  for (size_t k = static_cast<size_t>(ring_); k < slots_.size(); ++k) {
    slots_[k].bytes = 0;  // unused until a block makes it its home
  }
  for (size_t b = 0; b < home_.size(); ++b) {
    if (home_[b] >= 0) {
      slots_[home_slot(b)].bytes = nbytes_[b];
    }
  }
  transfer_->set_slot_count(static_cast<int>(slots_.size()));
}

int64_t SlotPool::allocated_slots() const {
  return std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.buffer.defined(); });
}

int64_t SlotPool::allocated_bytes() const {
  int64_t total = 0;
  for (const Slot& slot : slots_) {
    total += slot.buffer.defined() ? slot.bytes : 0;
  }
  return total;
}

int64_t SlotPool::resident_blocks() const {
  return std::count_if(home_.begin(), home_.end(), [](int home) { return home >= 0; });
}

int64_t SlotPool::resident_bytes() const {
  int64_t total = 0;
  for (size_t b = 0; b < home_.size(); ++b) {
    total += home_[b] >= 0 ? nbytes_[b] : 0;
  }
  return total;
}

int64_t SlotPool::streamed_held() const {
  return std::count_if(slots_.begin(), slots_.begin() + ring_, [](const Slot& s) { return s.block >= 0; });
}

int64_t SlotPool::in_use_held() const {
  return std::count_if(slots_.begin(), slots_.end(),
                       [&](const Slot& s) { return s.block >= 0 && owner_.in_use(s.block); });
}

}  // namespace fastvideo_offload
