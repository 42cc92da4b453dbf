// One offloaded model: its blocks' host buffers and parameters, each block's state, and the
// enter / exit that swap a block's parameters onto the device around its forward. The slots are
// SlotPool's (slot_pool.h), the learned order Schedule's (schedule.h).
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "faults.h"
#include "schedule.h"
#include "slot_pool.h"
#include "staging.h"
#include "staging_pool.h"
#include "swap.h"
#include "transfer.h"

namespace fastvideo_offload {

// [Note: block life cycle]
// After PyTorch FSDP2's TrainingState and ShardedState (torch/distributed/fsdp/_fully_shard/
// _fsdp_common.py, _fsdp_param.py): a block is in one explicit Block::State, and each place that
// moves it cites this note.
//
//   OnHost    its bytes are only in the host store; its parameters hold placeholders.
//   OnDevice  its bytes are in a device slot, or on their way there (the slot's Transfer orders
//             the copy before any use); its parameters hold placeholders.
//   Running   between enter and exit: its parameters are views into its slot (a block without
//             bytes has no slot, and views of nothing on the device).
//
//   OnHost   -> OnDevice  upload: a prefetch by the enter of a block before it, or its own enter.
//   OnHost   -> Running   enter, uploading it first (a block without bytes: no upload).
//   OnDevice -> Running   enter.
//   Running  -> OnDevice  exit; reset, or enter of the same block again, release a block an
//                         interrupted forward left running (a block without bytes: -> OnHost).
//   OnDevice -> OnHost    SlotPool evicts it: its slot is given to another block's upload, freed
//                         (a required allocation out of memory, trim, set_resident), or forgotten
//                         (invalidate).
//   park keeps the state (never Running) and gives the parameters their placeholders again.
//
// Training (training.py) adds a hold, not a state: from the moment its backward needs a block
// (hold) until its backward is done (the last unhold), an OnDevice block's slot is neither taken
// nor freed, as a Running block's is, and its parameters are views into it, as a Running block's
// are (a backward reads the weights autograd saved: views made in the forward, and parameters
// themselves). In grad mode a block always runs from one slot (SlotPool::claim_fixed): exit_grad
// returns a token naming that slot's memory, and hold fills that same slot again.
//   OnHost   -> OnDevice  hold, when its slot was given to another block since its forward.
//   Running  -> OnDevice  exit (or reset) of a held block (a checkpoint's recompute): it keeps its views.
//   the last unhold, or drop_holds: the parameters get their placeholders again.
//
// Residency is not a state but a setting (SlotPool::resident): set_resident, while nothing runs,
// gives each resident block a home slot that only its bytes fill; the others take turns in the
// ring of streaming slots. A slot has no memory until first claimed, then holds no block's bytes
// or one block's; its memory is freed (and its block evicted) only while that block is not Running.
class Engine final : private SlotPool::Owner {
 public:
  // `staging_threads`: host threads that stage pageable blocks (add_block(..., staged=true)), into
  // buffers from `pool` (shared with the other engines of a group; none: a pool of its own).
  // A `prefetch` deeper than the blocks that can be in flight is cut to that.
  Engine(c10::Device device, int64_t prefetch, int64_t staging_threads = 1,
         std::shared_ptr<StagingPool> pool = nullptr);
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

  // Training: the grad-mode forms of enter and exit, and the holds of a backward (training.py).
  // Tokens are >= 0; exit_grad returns kNoSlot for a block without bytes (or not entered) and
  // kHeld for a held block's recompute.
  static constexpr int64_t kNoSlot = -1;
  static constexpr int64_t kHeld = -2;
  // enter in grad mode: the block runs from its fixed slot, and so do the blocks prefetched for it.
  // `in_backward`: a checkpoint's recompute, which learns no order and prefetches backwards; a
  // block held already only gets its views (returns true).
  bool enter_grad(int64_t block, bool in_backward);
  // exit, and the token of the slot memory the forward ran in, for its backward's hold.
  int64_t exit_grad(int64_t block);
  // Backward needs the block: its bytes are in the slot `token` names again (copied now when
  // another block took it), the compute stream waits for them, and the blocks before it in
  // execution order start copying. Counted: a block is held until as many unholds.
  void hold(int64_t block, int64_t token);
  void unhold(int64_t block);
  // Every hold released (a backward that raised cannot release its own); returns how many were held.
  int64_t drop_holds();
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
    // See [Note: block life cycle].
    enum class State { OnHost, OnDevice, Running };
    at::Tensor host;                         // exact-size host buffer, read by every upload (gathered: empty)
    std::vector<at::Tensor> sources;         // a gathered block's tensors, kept alive for its segments
    std::vector<Staging::Segment> segments;  // where a staged block's bytes are
    std::vector<at::Tensor> params;          // the Parameter objects themselves
    std::vector<TensorLayout> layouts;       // where each one sits in the buffer
    std::vector<at::Tensor> placeholders;    // what each one holds outside its forward
    std::vector<at::Tensor> empty_views;     // a block without bytes: what each one holds in its forward
    int64_t nbytes = 0;
    State state = State::OnHost;
    int slot = -1;        // the slot holding (or receiving) its bytes: OnDevice, and Running with bytes
    int holds = 0;        // backwards that need its bytes in its slot (training)
    bool staged = false;  // pageable: its bytes come through staging_
  };

  // SlotPool::Owner
  bool in_use(int64_t block) const override {
    return blocks_[block].state == Block::State::Running || blocks_[block].holds > 0;
  }
  void evicted(int64_t block) override;

  std::unique_ptr<Transfer> checked_transfer() const;
  Block& block_at(int64_t block, const char* op);
  int64_t add(Block blk, at::TensorList params, at::IntArrayRef offsets);
  Staging::Request staging_request(int64_t block) const;
  // Counted by every staging ring so far, the freed ones included.
  Staging::Counts staging_counts() const;
  void upload(int64_t block, int slot);
  bool bytes_ready(const Block& blk, int64_t block);
  void plan_staging(int64_t block, Schedule::Direction direction);
  void prefetch_after(const std::vector<int64_t>& keep);
  // Grad mode: the blocks of `keep` after the first, each into its fixed slot.
  void prefetch_fixed(const std::vector<int64_t>& keep);
  // Grad mode: `block`'s bytes in its fixed slot (moved there when they are in another).
  void fill_fixed(int64_t block, const char* op);
  // The views, the state, and the prefetch and staging that every enter ends with.
  // Its parameters' views into its slot (into nothing, without bytes), made on first use.
  const std::vector<at::Tensor>& views_of(Block& blk, int64_t block);
  void start_running(int64_t block, const std::vector<int64_t>& keep, bool fixed, Schedule::Direction direction);
  // exit's work, shared with exit_grad.
  void finish(Block& blk, int64_t block);
  int64_t token(int slot) const;
  void release(Block& blk);
  void check_idle(const char* op) const;
  void free_staging();

  const c10::Device device_;
  const int64_t prefetch_;
  const int64_t staging_threads_;
  const Faults faults_;
  std::shared_ptr<StagingPool> pool_;
  std::mutex mutex_;
  std::vector<Block> blocks_;
  Schedule schedule_;
  int64_t staged_block_bytes_ = 0;  // the largest staged block: the size of a staging buffer
  // counters reported by stats()
  int64_t host_bytes_ = 0;
  int64_t enters_ = 0;
  int64_t uploads_ = 0;
  int64_t prefetches_ = 0;
  int64_t sync_loads_ = 0;
  int64_t h2d_bytes_ = 0;
  int64_t h2d_at_forward_ = 0;  // h2d_bytes_ when the current (or last) forward started
  int64_t max_filled_ring_slots_ = 0;
  int64_t max_materialized_ = 0;
  int64_t backward_uploads_ = 0;
  // Bumped by invalidate: a token from before a weight change names other weights.
  int64_t weights_epoch_ = 0;
  bool watch_memory_ = false;
  int64_t forward_peak_ = 0;  // device bytes allocated outside the slots, the most seen this forward
  // What the staging rings freed by trim counted and traced: stats and the trace go on across trims.
  Staging::Counts staged_before_{0, 0, 0};
  std::vector<Staging::Piece> trace_before_;
  bool trace_staging_ = false;  // as trace_staging() left it: a ring made later starts so
  // Destroyed after staging_ and before the host buffers: its Transfer waits for in-flight copies
  // before they and the slots' memory go.
  SlotPool slots_;
  // Created by the first staged upload, and again by the first after a trim. Declared last, so
  // destroyed first: it waits for the uploads reading its buffers, through fences of the slots'
  // Transfer, which is still alive then.
  std::unique_ptr<Staging> staging_;
};

}  // namespace fastvideo_offload
