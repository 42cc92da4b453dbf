// Staging: pageable block -> (host threads, memcpy) -> pinned staging buffer -> (the upload) -> slot.
//   plan():     the engine names the next blocks in execution order; free buffers take them.
//   threads:    wait for the buffer's last upload (its Fence), then copy it in pieces, soonest
//               buffer first, so several threads finish the block needed next before the others.
//   take():     the engine's upload reads the filled buffer (waiting, counted, if it is not yet);
//   uploaded(): the buffer is free again, to be refilled once that upload has passed its Fence.
//   trace():    while on, each piece a thread copies is recorded with its block, thread and times.
#include "staging.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

namespace fastvideo_offload {
namespace {

// Large enough that a piece costs far more than taking the lock, small enough to spread a block
// over several threads.
constexpr int64_t kPieceBytes = int64_t{4} << 20;

int64_t pieces(int64_t nbytes) { return std::max<int64_t>(1, (nbytes + kPieceBytes - 1) / kPieceBytes); }

// Bytes [begin, end) of the request's staging buffer `base`, from the segments that overlap them.
void gather(const Staging::Request& request, char* base, int64_t begin, int64_t end) {
  for (int64_t k = 0; k < request.count; ++k) {
    const Staging::Segment& s = request.segments[k];
    const int64_t lo = std::max(begin, s.offset);
    const int64_t hi = std::min(end, s.offset + s.nbytes);
    if (lo < hi) {
      std::memcpy(base + lo, static_cast<const char*>(s.src) + (lo - s.offset), static_cast<size_t>(hi - lo));
    }
  }
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Staging::Staging(int buffers, int threads, int64_t buffer_bytes, std::shared_ptr<StagingPool> pool,
                 const Faults& faults)
    : faults_(faults), buffer_bytes_(buffer_bytes), pool_(std::move(pool)) {
  TORCH_CHECK_VALUE(buffers >= 1 && threads >= 1 && buffer_bytes > 0,
                    "staging needs a buffer, a thread and bytes, got ", buffers, " buffer(s), ", threads,
                    " thread(s), ", buffer_bytes, " bytes");
  buffers_.resize(static_cast<size_t>(buffers));
  try {
    for (Buffer& b : buffers_) {
      b.memory = pool_->take(buffer_bytes);
    }
  } catch (...) {
    give_back();
    throw;
  }
  for (int t = 0; t < threads; ++t) {
    threads_.emplace_back([this, t] { work(t); });
  }
}

Staging::~Staging() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (std::thread& t : threads_) {
    t.join();
  }
  // An upload may still read a buffer: it is handed on only after that upload has finished.
  for (Buffer& b : buffers_) {
    if (b.reading) {
      b.reading->wait();
      b.reading.reset();
    }
  }
  give_back();
}

void Staging::give_back() {
  for (Buffer& b : buffers_) {
    if (b.memory.defined()) {
      pool_->give(std::move(b.memory));
      b.memory = at::Tensor();
    }
  }
}

Staging::Counts Staging::counts() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {waits_, staged_bytes_, staged_blocks_};
}

int Staging::find(int64_t block) const {
  for (size_t i = 0; i < buffers_.size(); ++i) {
    const Buffer& b = buffers_[i];
    if ((b.state == State::Filling || b.state == State::Filled) && b.request.block == block) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

int Staging::assign(const Request& request, const std::vector<int64_t>& keep) {
  TORCH_CHECK(request.nbytes > 0 && request.nbytes <= buffer_bytes(), "staging: block ", request.block, " has ",
              request.nbytes, " bytes, the staging buffers ", buffer_bytes());
  // A free buffer first; else one filled with a block that is no longer wanted soon.
  int chosen = -1;
  for (size_t i = 0; i < buffers_.size() && chosen < 0; ++i) {
    chosen = buffers_[i].state == State::Free ? static_cast<int>(i) : -1;
  }
  for (size_t i = 0; i < buffers_.size() && chosen < 0; ++i) {
    const Buffer& b = buffers_[i];
    if (b.state == State::Filled && std::find(keep.begin(), keep.end(), b.request.block) == keep.end()) {
      chosen = static_cast<int>(i);
    }
  }
  if (chosen >= 0) {
    Buffer& b = buffers_[chosen];
    b.state = State::Filling;
    b.request = request;
    b.next_chunk = 0;
    b.chunks_left = pieces(request.nbytes);
    order_.push_back(chosen);
  }
  return chosen;
}

void Staging::plan(const std::vector<Request>& order) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> keep;
  for (size_t k = 0; k < order.size() && k < buffers_.size(); ++k) {
    keep.push_back(order[k].block);
  }
  for (size_t k = 0; k < keep.size(); ++k) {
    if (find(keep[k]) < 0 && assign(order[k], keep) < 0) {
      break;
    }
  }
  // Threads serve the soonest block first.
  std::stable_sort(order_.begin(), order_.end(), [&](int a, int b) {
    const auto rank = [&](int i) {
      return std::find(keep.begin(), keep.end(), buffers_[i].request.block) - keep.begin();
    };
    return rank(a) < rank(b);
  });
  changed_.notify_all();
}

bool Staging::ready(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int i = find(block);
  return i >= 0 && buffers_[i].state == State::Filled;
}

const void* Staging::take(const Request& request, int* buffer) {
  std::unique_lock<std::mutex> lock(mutex_);
  int i = find(request.block);
  if (i < 0 || buffers_[i].state != State::Filled) {
    ++waits_;
    if (i < 0) {
      // Not planned (the first block of the first forward, or evicted from its slot): every
      // buffer is at worst being filled, which ends, so one frees up.
      changed_.wait(lock, [&] { return (i = assign(request, {request.block})) >= 0; });
    }
    order_.erase(std::find(order_.begin(), order_.end(), i));
    order_.insert(order_.begin(), i);
    changed_.notify_all();
    changed_.wait(lock, [&] { return buffers_[i].state == State::Filled; });
  }
  buffers_[i].state = State::Taken;
  // Counted when handed to an upload, so that the counts do not depend on how far ahead the threads are.
  staged_bytes_ += request.nbytes;
  ++staged_blocks_;
  *buffer = i;
  return buffers_[i].memory.const_data_ptr();
}

void Staging::uploaded(int buffer, std::unique_ptr<Fence> done) {
  std::lock_guard<std::mutex> lock(mutex_);
  Buffer& b = buffers_.at(static_cast<size_t>(buffer));
  b.state = State::Free;
  b.reading = std::move(done);
  changed_.notify_all();
}

void Staging::forget() {
  std::unique_lock<std::mutex> lock(mutex_);
  // A piece copied before the store changed may hold old bytes: let fills end, then drop them all.
  changed_.wait(lock, [&] { return order_.empty(); });
  for (Buffer& b : buffers_) {
    if (b.state == State::Filled) {
      b.state = State::Free;
    }
  }
}

void Staging::trace(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  tracing_ = on;
}

std::vector<Staging::Piece> Staging::take_trace() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::exchange(trace_, {});
}

void Staging::work(int thread) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    int i = -1;
    changed_.wait(lock, [&] {
      for (const int k : order_) {
        const Buffer& b = buffers_[k];
        if (!b.fencing && (b.reading || b.next_chunk < pieces(b.request.nbytes))) {
          i = k;
          return true;
        }
      }
      return stopping_;
    });
    if (stopping_) {
      return;
    }
    Buffer& b = buffers_[i];
    if (b.reading) {
      // The upload that last read this buffer must have finished before any piece is written.
      std::unique_ptr<Fence> reading = std::move(b.reading);
      b.fencing = true;
      lock.unlock();
      if (!faults_.reuse_staging_early) {
        reading->wait();
      }
      lock.lock();
      b.fencing = false;
      changed_.notify_all();
      continue;
    }
    const int64_t offset = b.next_chunk++ * kPieceBytes;
    const int64_t n = std::min(kPieceBytes, b.request.nbytes - offset);
    auto* base = static_cast<char*>(b.memory.data_ptr());
    const Request request = b.request;
    const bool traced = tracing_;
    const int64_t start = traced ? now_ns() : 0;
    lock.unlock();
    gather(request, base, offset, offset + n);
    const int64_t end = traced ? now_ns() : 0;
    lock.lock();
    if (traced && trace_.size() < kTracePieces) {
      trace_.push_back({b.request.block, thread, start, end});
    }
    if (--b.chunks_left == 0) {
      b.state = State::Filled;
      order_.erase(std::find(order_.begin(), order_.end(), i));
      changed_.notify_all();
    }
  }
}

}  // namespace fastvideo_offload
