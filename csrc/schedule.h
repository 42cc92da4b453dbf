// The execution order an engine learns from the blocks its forward enters, and what it plans by
// it: the prefetch window of each enter and the order in which staged blocks are staged, in a
// forward and, backwards through the same order, in a backward (training.py).
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastvideo_offload {

class Schedule {
 public:
  // Forward: the order blocks run in, the last block followed by the next forward's first;
  // ForwardToEnd: the same up to the last block (in training, a backward runs next); Backward: the
  // reverse, from the last block back to the forward's first (what runs next is the next forward).
  enum class Direction { Forward, ForwardToEnd, Backward };

  // `prefetch`: how many blocks after the running one a window holds.
  explicit Schedule(int64_t prefetch) : prefetch_(prefetch) {}

  // A block registered: until seen otherwise, it runs after the one registered before it, and
  // the first one after it.
  void add_block();
  // A forward starts: the next block entered is its first.
  void restart() { starting_ = true; }
  // `block` entered: it runs after the block entered before it.
  void entered(int64_t block);
  // Every block, in the execution order learned so far: from the first block entered in the last
  // forward, following what ran after what; blocks never reached that way follow in registration order.
  std::vector<int64_t> order() const;
  // The blocks enter(block) keeps on the device: `block`, then the next `prefetch` blocks in
  // `direction` that `skip` does not pass over (a resident block already on the device needs no copy).
  std::vector<int64_t> window(int64_t block, c10::function_ref<bool(int64_t)> skip,
                              Direction direction = Direction::Forward) const;
  // The first `most` blocks after `block` in `direction` that `wanted` picks, soonest first.
  std::vector<int64_t> upcoming(int64_t block, size_t most, c10::function_ref<bool(int64_t)> wanted,
                                Direction direction = Direction::Forward) const;

 private:
  const int64_t prefetch_;
  // The block after `block` in `direction`, or -1 where a backward ends.
  int64_t step(int64_t block, Direction direction) const;

  std::vector<int64_t> next_;  // per block: the block seen to run after it; starts as registration order
  std::vector<int64_t> prev_;  // per block: the block seen to run before it; starts as registration order
  int64_t last_entered_ = -1;
  int64_t first_entered_ = -1;  // the first block entered since the last restart (a forward's first)
  bool starting_ = true;        // no block entered since the last restart
};

}  // namespace fastvideo_offload
