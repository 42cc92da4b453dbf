// The source of bytes for blocks kept in pageable host memory (outside the pinned budget): host
// threads copy each one, ahead of its upload, into a small ring of pinned staging buffers; its
// upload then reads the staging buffer. A buffer is refilled only after the upload that read it
// has finished (its Fence), never before.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "faults.h"
#include "staging_pool.h"
#include "transfer.h"

namespace fastvideo_offload {

class Staging {
 public:
  // Where some of a block's bytes are in host memory, and where they go in the staging buffer.
  struct Segment {
    const void* src;
    int64_t offset;
    int64_t nbytes;
  };
  struct Request {
    int64_t block;
    // The block's bytes: its pageable buffer as one segment, or one per tensor where they lie
    // elsewhere (pages mapped from a checkpoint). The engine owns them while the block exists.
    const Segment* segments;
    int64_t count;
    int64_t nbytes;  // of the staging buffer it fills; bytes between segments are left as they are
  };

  // `buffers` staging buffers of at least `buffer_bytes` each, taken from `pool` (and given back to it).
  Staging(int buffers, int threads, int64_t buffer_bytes, std::shared_ptr<StagingPool> pool, const Faults& faults);
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  // Stops the threads, waits for every upload that reads a staging buffer, and gives the buffers
  // back to the pool.
  ~Staging();

  // The blocks to stage next, soonest first (the lookahead); buffers hold at most that many.
  void plan(const std::vector<Request>& order);
  // Whether `block`'s bytes are in a staging buffer now (a prefetch does not wait for them).
  bool ready(int64_t block);
  // The staging buffer with `request`'s bytes, staged now if it was not planned; the host waits
  // (counted) while it is filled. The buffer is the caller's until `uploaded`.
  const void* take(const Request& request, int* buffer);
  // The upload from `buffer` was issued: the buffer is refilled once `done` has passed.
  void uploaded(int buffer, std::unique_ptr<Fence> done);
  // The host store changed: forget every staged block.
  void forget();

  // One piece of a fill, as a staging thread copied it: timestamps from std::chrono::steady_clock
  // (CLOCK_MONOTONIC on Linux, Python's time.monotonic_ns()), so callers can put them beside their own.
  struct Piece {
    int64_t block;
    int64_t thread;
    int64_t start_ns;
    int64_t end_ns;
  };
  // Bounds the trace of a caller that never reads it: later pieces are dropped.
  static constexpr size_t kTracePieces = size_t{1} << 18;
  // Whether the threads record each piece they copy (off: one branch per piece, no clock read).
  void trace(bool on);
  // The pieces recorded since the last call, in the order they finished; clears them.
  std::vector<Piece> take_trace();

  struct Counts {
    int64_t waits;  // takes that found their block not yet staged
    int64_t bytes;  // bytes uploaded from staging buffers
    int64_t fills;  // blocks uploaded from staging buffers
  };
  Counts counts() const;
  int64_t buffer_bytes() const { return buffer_bytes_; }
  int buffers() const { return static_cast<int>(buffers_.size()); }

 private:
  enum class State { Free, Filling, Filled, Taken };
  struct Buffer {
    at::Tensor memory;
    State state = State::Free;
    Request request{-1, nullptr, 0, 0};
    std::unique_ptr<Fence> reading;  // the last upload from it, waited before it is refilled
    bool fencing = false;            // a thread waits for `reading`
    int64_t next_chunk = 0;          // the next piece a thread copies
    int64_t chunks_left = 0;         // pieces not copied yet
  };

  int find(int64_t block) const;
  void give_back();
  int assign(const Request& request, const std::vector<int64_t>& keep);
  void work(int thread);

  const Faults faults_;
  const int64_t buffer_bytes_;
  const std::shared_ptr<StagingPool> pool_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<Buffer> buffers_;
  std::vector<int> order_;  // buffers being filled, soonest first
  bool stopping_ = false;
  int64_t waits_ = 0;
  int64_t staged_bytes_ = 0;
  int64_t staged_blocks_ = 0;
  bool tracing_ = false;
  std::vector<Piece> trace_;
  std::vector<std::thread> threads_;  // last: they use every member above
};

}  // namespace fastvideo_offload
