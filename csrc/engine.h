// One offloaded model: its blocks' host buffers, a small ring of device slots, and the
// schedule that decides which block is copied into which slot, and when.
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "faults.h"
#include "staging.h"
#include "staging_pool.h"
#include "swap.h"
#include "transfer.h"

namespace fastvideo_offload {

class Engine {
 public:
  // `staging_threads`: host threads that stage pageable blocks (add_block(..., staged=true)), into
  // buffers from `pool` (shared with the other engines of a group; none: a pool of its own).
  // A `prefetch` deeper than the blocks that can be in flight is cut to that.
  Engine(c10::Device device, int64_t prefetch, int64_t staging_threads = 1, std::shared_ptr<StagingPool> pool = nullptr);
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // `staged`: the buffer is pageable, and each upload reads it through a pinned staging buffer.
  int64_t add_block(const at::Tensor& host, at::TensorList params, at::IntArrayRef offsets, bool staged);
  // A block whose host bytes are not one buffer: `sources[i]` holds parameter i's bytes (pages
  // mapped from a checkpoint file). Always staged: the staging threads gather the sources into a
  // staging buffer laid out as `offsets` say, `nbytes` in all, and the upload copies that.
  int64_t add_gathered_block(at::TensorList sources, int64_t nbytes, at::TensorList params, at::IntArrayRef offsets);
  // Pre-hook: the block's bytes are on the device (prefetched, or copied now), the compute
  // stream waits for them, its parameters become views into its slot, and the next
  // `prefetch` blocks in execution order start copying.
  void enter(int64_t block);
  // Post-hook: the parameters become placeholders and the slot is released on the compute
  // stream. A block that is not entered is left alone (the pre-hook may have failed).
  void exit(int64_t block);
  // Gives a block that is not running its placeholders back (after its weights were changed).
  void park(int64_t block);
  // A forward of the whole model starts: a block still entered was left by an interrupted
  // forward (KeyboardInterrupt skips torch's always-called post-hooks), so release it.
  void reset();
  // Device bytes the slots may take together (-1: no limit); past it a prefetch is skipped
  // and a block that must run first frees the other slots.
  void set_slot_budget(int64_t nbytes);
  // The host store changed: forget every block cached in a slot.
  void invalidate();
  // Frees the device slots and the staging ring (an idle model, such as the other Wan2.2 expert);
  // the ring's buffers go back to the pool, which frees them unless another engine shares it.
  void trim();
  // These blocks stay on the device once copied (each in a slot of its own, never reused for
  // another block); the others stream through the ring. A block that stays resident keeps its
  // slot and bytes; only the slots whose block or size changed are freed.
  void set_resident(at::IntArrayRef blocks);
  // While on (CUDA), each block's exit samples the device memory allocated outside the slots, for
  // stats' forward_peak_bytes: what a device budget plans activations by.
  void watch_memory(bool on);
  const std::shared_ptr<StagingPool>& staging_pool() const { return pool_; }
  c10::Device device() const { return device_; }
  c10::Dict<std::string, int64_t> stats();
  // Every block, in the execution order learned so far: from the first block entered in the last
  // forward, following what ran after what; blocks never reached that way follow in registration order.
  std::vector<int64_t> order();
  bool busy();
  // Whether the staging threads record each piece they copy (see Staging::trace).
  void trace_staging(bool on);
  // The pieces recorded since the last call, int64 [n, 4]: block, staging thread, start and end
  // (steady_clock ns); clears them.
  at::Tensor staging_trace();

 private:
  struct Block {
    at::Tensor host;                        // exact-size host buffer, read by every upload (gathered: empty)
    std::vector<at::Tensor> sources;        // a gathered block's tensors, kept alive for its segments
    std::vector<Staging::Segment> segments;  // where a staged block's bytes are
    std::vector<at::Tensor> params;         // the Parameter objects themselves
    std::vector<TensorLayout> layouts;      // where each one sits in the buffer
    std::vector<at::Tensor> placeholders;   // what each one holds outside its forward
    std::vector<std::vector<at::Tensor>> views;  // per slot, built on first use
    int64_t nbytes = 0;
    int slot = -1;       // slot holding (or receiving) this block's bytes
    bool held = false;   // between enter and exit
    int64_t next = -1;   // block seen to run after this one; starts as registration order
    int home = -1;       // a resident block's own slot is slots_[ring_ + home]; -1 when it streams
    bool staged = false;  // pageable: its bytes come through staging_
  };
  struct Slot {
    at::Tensor buffer;   // undefined until first needed, and after trim
    int64_t block = -1;  // block whose bytes it holds
    uint64_t last_use = 0;
    int64_t bytes = 0;   // its size: the largest streamed block, or its resident block's size
  };

  Block& block_at(int64_t block, const char* op);
  int64_t add(Block blk, at::TensorList params, at::IntArrayRef offsets);
  Staging::Request staging_request(int64_t block) const;
  // Counted by every staging ring so far, the freed ones included.
  Staging::Counts staging_counts() const;
  std::vector<int64_t> window(int64_t block) const;
  int claim_slot(const std::vector<int64_t>& keep, bool required);
  bool allocate(int index, bool required);
  bool fits_budget(int index) const;
  int64_t allocated_bytes() const;
  void make_slots();
  void free_all_slots();
  int home_slot(const Block& blk) const { return ring_ + blk.home; }
  int claim_home(const Block& blk, bool required);
  void allocate_slot(int index);
  // Gives the memory of these slots back (after waiting for the copies and compute using them).
  void free_slots(const std::vector<int>& doomed);
  void free_slots_except(int keep);
  void upload(int64_t block, int slot);
  bool bytes_ready(const Block& blk, int64_t block);
  void plan_staging(int64_t block);
  void prefetch_after(const std::vector<int64_t>& keep);
  void release(Block& blk);
  void check_idle(const char* op) const;
  void free_staging();

  const c10::Device device_;
  const int64_t prefetch_;
  const int64_t staging_threads_;
  const Faults faults_;
  std::mutex mutex_;
  std::vector<Block> blocks_;
  std::vector<Slot> slots_;
  int64_t slot_bytes_ = 0;  // the largest streamed block
  int64_t staged_block_bytes_ = 0;  // the largest staged block: the size of a staging buffer
  // slots_[0, ring_) stream blocks (1 + the prefetch depth, cut to the blocks there are); each one
  // after is a resident block's home, or unused where a block stopped being resident.
  int ring_ = 1;
  int64_t slot_budget_ = -1;
  int64_t last_entered_ = -1;
  int64_t first_entered_ = -1;  // the first block entered since the last reset (a forward's first)
  bool starting_ = true;         // no block entered since the last reset
  // A prefetch slot could not be allocated: no more tries until the next forward or trim, so a
  // full device does not send the allocator into its out-of-memory path for every block.
  bool prefetch_alloc_blocked_ = false;
  uint64_t tick_ = 0;
  // counters reported by stats()
  int64_t host_bytes_ = 0;
  int64_t enters_ = 0;
  int64_t uploads_ = 0;
  int64_t prefetches_ = 0;
  int64_t sync_loads_ = 0;
  int64_t h2d_bytes_ = 0;
  int64_t h2d_at_forward_ = 0;  // h2d_bytes_ when the current (or last) forward started
  int64_t prefetch_skipped_oom_ = 0;
  int64_t slot_alloc_failures_ = 0;
  int64_t max_resident_ = 0;
  int64_t max_materialized_ = 0;
  bool watch_memory_ = false;
  int64_t forward_peak_ = 0;  // device bytes allocated outside the slots, the most seen this forward
  // What the staging rings freed by trim counted and traced: stats and the trace go on across trims.
  Staging::Counts staged_before_{0, 0, 0};
  std::vector<Staging::Piece> trace_before_;
  bool trace_staging_ = false;  // as trace_staging() left it: a ring made later starts so
  std::shared_ptr<StagingPool> pool_;
  // Destroyed before the host buffers: it waits for in-flight copies before they go.
  std::unique_ptr<Transfer> transfer_;
  // Created by the first staged upload, and again by the first after a trim. Declared last, so
  // destroyed first: it waits for the uploads reading its buffers, through fences of transfer_,
  // which is still alive then.
  std::unique_ptr<Staging> staging_;
};

}  // namespace fastvideo_offload
