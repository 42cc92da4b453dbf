// The device slots of one engine: a ring that streamed blocks take turns in, and a home slot for
// each resident block; their memory under a byte budget, the out-of-memory policy, freeing, and
// the Transfer that orders the copies into them. See [Note: block life cycle] in engine.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "faults.h"
#include "transfer.h"

namespace fastvideo_offload {

class SlotPool {
 public:
  // What the pool needs of the blocks its slots hold (the engine).
  class Owner {
   public:
    // Running (between enter and exit), or held for its backward: its slot is neither taken nor freed.
    virtual bool in_use(int64_t block) const = 0;
    // Its bytes left their slot (given to another block, freed, or forgotten).
    virtual void evicted(int64_t block) = 0;

   protected:
    ~Owner() = default;
  };

  // A ring of 1 + `prefetch` streaming slots at most (cut to the blocks there are, as they are added).
  SlotPool(c10::Device device, int64_t prefetch, const Faults& faults, std::unique_ptr<Transfer> transfer,
           Owner& owner);
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;

  // A block of `nbytes` registered, before the slots are made; it streams.
  void add_block(int64_t nbytes);
  // Whether the slots exist: from the first claim until free_all.
  bool made() const { return !slots_.empty(); }
  bool resident(int64_t block) const { return home_[block] >= 0; }
  bool any_resident() const;
  // `chosen[b]`: block b stays on the device in a home slot of its own; the others stream. Only
  // what changes is freed: the ring when its slots' size changes, and the homes of blocks that
  // stream from now on. Nothing may be running.
  void set_resident(const std::vector<bool>& chosen);

  // Device bytes the slots may take together (-1: no limit).
  void set_budget(int64_t nbytes) { budget_ = nbytes; }
  // A forward starts: a prefetch may ask the allocator again.
  void restart() { prefetch_blocked_ = false; }
  // A slot with memory for `block`: its home when it is resident; else the cheapest ring slot that
  // no running block holds and, unless `required`, none of `keep` (the blocks about to run) holds.
  // -1 when there is none, or (not `required`) no memory for it.
  int claim(int64_t block, const std::vector<int64_t>& keep, bool required);
  // Training: the one slot `block` runs from in grad mode, so that its backward finds its bytes at
  // the addresses its forward saved: its home when resident, else ring slot (its rank among the
  // streamed blocks) mod ring. With memory for it, unless no block in use holds it (-1), or (not
  // `required`) it has no memory and none can be had without freeing another slot (-1).
  int claim_fixed(int64_t block, bool required);
  int fixed_slot(int64_t block) const { return resident(block) ? home_slot(block) : fixed_[block]; }
  // The block whose bytes the slot holds (-1: none).
  int64_t holder(int slot) const { return slots_[slot].block; }
  // Bumped each time the slot's memory is allocated or freed: a backward whose forward ran in an
  // older generation of its slot finds other memory there.
  uint32_t generation(int slot) const { return slots_.empty() ? 0 : slots_[slot].generation; }
  int ring() const { return ring_; }

  // The block whose bytes the slot holds is evicted: the slot is about to be filled.
  void vacate(int slot);
  // `block`'s bytes were sent to the slot.
  void fill(int slot, int64_t block);
  // The compute stream is done with the slot (its block exits).
  void release(int slot);
  // The host store changed: no slot holds any block's bytes any more; the memory stays.
  void forget();
  // Every slot's memory goes back (nothing may be running), and the slots with it until the next claim.
  void free_all();

  at::Tensor& buffer(int slot) { return slots_[slot].buffer; }
  // `block`'s parameters as views into the slot, built by the caller on first use; dropped with the slot's memory.
  std::vector<at::Tensor>& views(int slot, int64_t block);
  Transfer& transfer() { return *transfer_; }

  // For stats.
  int64_t slot_bytes() const { return slot_bytes_; }
  int64_t allocated_slots() const;
  int64_t allocated_bytes() const;
  int64_t resident_blocks() const;
  int64_t resident_bytes() const;
  // Ring slots holding a block's bytes, and slots whose block is in use.
  int64_t streamed_held() const;
  int64_t in_use_held() const;
  int64_t prefetches_skipped() const { return prefetches_skipped_; }
  int64_t alloc_failures() const { return alloc_failures_; }

 private:
  struct Slot {
    at::Tensor buffer;   // undefined until first needed, and after it is freed
    int64_t block = -1;  // block whose bytes it holds
    uint64_t last_use = 0;
    uint32_t generation = 0;
    int64_t bytes = 0;                           // its size: the largest streamed block, or its resident block's size
    std::vector<std::vector<at::Tensor>> views;  // per block, into `buffer`
  };

  int home_slot(int64_t block) const { return ring_ + home_[block]; }
  void make();
  // Each streamed block's fixed ring slot (claim_fixed), for the blocks resident now.
  void assign_fixed();
  bool fits_budget(int index) const;
  // Whether the slot has memory now: the out-of-memory policy, all of it.
  bool allocate(int index, bool required);
  // One request to the allocator; a failure is counted, and its message kept in `failure`.
  bool try_allocate(int index, std::string* failure);
  // Gives the memory of these slots back (after waiting for the copies and compute using them).
  void free(const std::vector<int>& doomed);
  void free_except(int keep);

  const c10::Device device_;
  const int64_t prefetch_;
  const Faults faults_;
  Owner& owner_;
  std::vector<int64_t> nbytes_;  // per block
  std::vector<int> home_;        // per block: a resident block's slot is slots_[ring_ + home]; -1 when it streams
  std::vector<int> fixed_;       // per block: the ring slot it runs from in grad mode while it streams
  // slots_[0, ring_) stream blocks; each one after is a resident block's home, or unused where a
  // block stopped being resident.
  std::vector<Slot> slots_;
  int ring_ = 1;
  int64_t slot_bytes_ = 0;  // the largest streamed block
  int64_t budget_ = -1;
  // A prefetch slot could not be allocated: no more tries until the next forward or free_all, so
  // a full device does not send the allocator into its out-of-memory path for every block.
  bool prefetch_blocked_ = false;
  uint64_t tick_ = 0;
  int64_t prefetches_skipped_ = 0;
  int64_t alloc_failures_ = 0;
  // Declared after slots_, so destroyed before their memory: it waits for in-flight copies.
  std::unique_ptr<Transfer> transfer_;
};

}  // namespace fastvideo_offload
