// The asynchronous CPU device: a copy engine that runs ahead of and behind the host, as a GPU's
// does, so that the CPU suite proves the engine's ordering (FASTVIDEO_OFFLOAD_CPU_TRANSFER=async).
//   copy stream (a thread):  wait(released[s]) -> poison slot -> copy in chunks, random delays -> ready[s]
//   compute side:            wait_ready blocks the host until ready[s]; release is completed by a
//                            second thread after a random lag (a GPU still running queued
//                            kernels), which poisons the slot first.
// A wait binds to the latest record at the time of the call, as cudaStreamWaitEvent does.
// Poisoned slots (0xFF bytes: NaN in every float type) make any read outside a block's window
// show in the output; the checker raises on every ordering violation it sees. A release keeps the
// slot's bytes before poisoning them, for a cache hit to put back: the upload's source may be a
// staging buffer that holds another block by then.
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../transfer.h"

namespace fastvideo_offload {
namespace {

constexpr unsigned char kPoison = 0xFF;

int64_t env_int(const char* name, int64_t fallback, int64_t least) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return fallback;
  }
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != nullptr && *end == '\0' && parsed >= least, name, " must be an integer >= ", least,
                    ", got '", value, "'");
  return parsed;
}

struct Options {
  int64_t max_delay_us;  // each chunk of a copy, and each release, is delayed by up to this
  int64_t chunk_bytes;
  uint64_t seed;

  static Options from_env() {
    Options o;
    o.max_delay_us = env_int("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", 200, 0);
    o.chunk_bytes = env_int("FASTVIDEO_OFFLOAD_ASYNC_CHUNK_BYTES", 64 << 10, 1);
    o.seed = static_cast<uint64_t>(env_int("FASTVIDEO_OFFLOAD_ASYNC_SEED", std::random_device{}(), 0));
    return o;
  }
};

class AsyncCpuTransfer final : public Transfer {
 public:
  AsyncCpuTransfer(const Faults& faults, const Options& options)
      : faults_(faults), options_(options), copier_([this] { run_copies(); }), completer_([this] { run_releases(); }) {}

  ~AsyncCpuTransfer() override {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wait_idle(lock);
      stopping_ = true;
    }
    changed_.notify_all();
    copier_.join();
    completer_.join();
  }

  void set_slot_count(int count) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (static_cast<int>(slots_.size()) < count) {
      slots_.resize(static_cast<size_t>(count));
    }
  }

  void upload(int slot, void* dst, const void* src, size_t nbytes) override {
    std::unique_lock<std::mutex> lock(mutex_);
    raise_violation();
    SlotState& s = slot_at(slot);
    if (s.in_use) {
      violate("an upload into slot ", slot, " was issued while a block still runs from it (not ordered after ",
              "the slot's release)");
    }
    s.dst = dst;
    s.src = src;
    s.nbytes = nbytes;
    s.stale = false;
    enqueue_copy(slot);
    raise_violation();
  }

  std::unique_ptr<Fence> fence() override {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::make_unique<CopiesFence>(this, copies_issued_);
  }

  void wait_ready(int slot) override {
    std::unique_lock<std::mutex> lock(mutex_);
    raise_violation();
    SlotState& s = slot_at(slot);
    if (s.src == nullptr) {
      violate("a block was entered from slot ", slot, ", which no copy has filled");
    }
    if (s.stale) {
      // Released (and so poisoned) since its last copy, and entered again from the cache: the
      // copy engine puts the same bytes back, ordered after the release like any upload.
      s.src = s.kept->data();
      enqueue_copy(slot);
      s.stale = false;
    }
    const uint64_t target = s.ready.recorded;
    changed_.wait(lock, [&] { return slot_at(slot).ready.completed >= target || !violation_.empty(); });
    slot_at(slot).in_use = true;
    raise_violation();
  }

  void release(int slot) override {
    std::unique_lock<std::mutex> lock(mutex_);
    SlotState& s = slot_at(slot);
    // A filled slot is released by the block that ran from it, which must have waited first
    // (a fresh slot is released once, unfilled, when it is allocated).
    const bool ran_unwaited = s.src != nullptr && !s.in_use;
    s.in_use = false;
    s.stale = s.src != nullptr;
    s.settled = false;
    // Each release keeps into its own buffer: an earlier one may still be read by a copy.
    s.kept = s.src != nullptr ? std::make_shared<std::vector<unsigned char>>(s.nbytes) : nullptr;
    releases_.push_back({slot, ++s.released.recorded, s.dst, s.nbytes, s.kept});
    changed_.notify_all();
    raise_violation();
    if (ran_unwaited) {
      violate("a block ran from slot ", slot, " without waiting for its copy");
    }
  }

  void synchronize() override {
    std::unique_lock<std::mutex> lock(mutex_);
    wait_idle(lock);
    for (SlotState& s : slots_) {
      s.settled = true;
    }
    raise_violation();
  }

  void retire(int slot) override {
    std::unique_lock<std::mutex> lock(mutex_);
    SlotState& s = slot_at(slot);
    // As on a GPU, work that happens to have finished is not enough: the host must have waited
    // for it, or the same code frees memory under a running copy when the device is slower.
    if (!s.settled) {
      const bool copying = s.ready.completed < s.ready.recorded;
      violate("slot ", slot, "'s memory was freed without waiting for the copies into it and the compute that read it",
              copying ? " (a copy into it is still in flight)" : "");
    }
    s = SlotState{};
  }

 private:
  struct Event {
    uint64_t recorded = 0;
    uint64_t completed = 0;
  };
  // Copies run in issue order, so "every copy issued before" is one count.
  class CopiesFence final : public Fence {
   public:
    CopiesFence(AsyncCpuTransfer* owner, uint64_t issued) : owner_(owner), issued_(issued) {}
    void wait() override {
      std::unique_lock<std::mutex> lock(owner_->mutex_);
      owner_->changed_.wait(lock, [&] { return owner_->copies_done_ >= issued_; });
    }

   private:
    AsyncCpuTransfer* owner_;
    uint64_t issued_;
  };
  struct SlotState {
    Event ready;
    Event released;
    void* dst = nullptr;  // the last copy into the slot, which a cache hit repeats
    const void* src = nullptr;
    size_t nbytes = 0;
    bool in_use = false;                               // a block waited for it and has not released it
    bool stale = false;                                // released (poisoned) since its last copy
    bool settled = true;                               // the host has waited for every copy and release of it
    std::shared_ptr<std::vector<unsigned char>> kept;  // the bytes the last release poisoned
  };
  struct Copy {
    int slot;
    uint64_t after_release;  // the release this copy is ordered after
    uint64_t record;
    void* dst;
    const void* src;
    size_t nbytes;
    std::shared_ptr<std::vector<unsigned char>> hold;  // keeps a release's copy alive while it is read
  };
  struct Release {
    int slot;
    uint64_t record;
    void* dst;
    size_t nbytes;
    std::shared_ptr<std::vector<unsigned char>> keep;  // the slot's bytes before they are poisoned
  };

  SlotState& slot_at(int slot) {
    TORCH_CHECK_INDEX(slot >= 0 && slot < static_cast<int>(slots_.size()), "async transfer: slot ", slot,
                      " does not exist (", slots_.size(), " slots)");
    return slots_[static_cast<size_t>(slot)];
  }

  void enqueue_copy(int slot) {
    SlotState& s = slot_at(slot);
    s.settled = false;
    ++copies_issued_;
    copies_.push_back({slot, s.released.recorded, ++s.ready.recorded, s.dst, s.src, s.nbytes, s.kept});
    changed_.notify_all();
  }

  template <typename... Args>
  [[noreturn]] void violate(const Args&... what) {
    TORCH_CHECK(false, "fastvideo_offload async CPU device: ordering violation: ", what...);
  }

  // A violation seen by a worker thread is raised by the next call from the host.
  void raise_violation() {
    if (!violation_.empty()) {
      const std::string what = violation_;
      violation_.clear();
      TORCH_CHECK(false, "fastvideo_offload async CPU device: ordering violation: ", what);
    }
  }

  void wait_idle(std::unique_lock<std::mutex>& lock) {
    changed_.wait(lock, [&] { return copies_.empty() && releases_.empty() && !copying_ && !releasing_; });
  }

  void pause(std::mt19937_64& rng) {
    if (options_.max_delay_us > 0) {
      std::uniform_int_distribution<int64_t> delay(0, options_.max_delay_us);
      std::this_thread::sleep_for(std::chrono::microseconds(delay(rng)));
    }
  }

  void run_copies() {
    std::mt19937_64 rng(options_.seed);
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      changed_.wait(lock, [&] { return stopping_ || !copies_.empty(); });
      if (copies_.empty()) {
        return;
      }
      const Copy copy = copies_.front();
      copies_.pop_front();
      copying_ = true;
      if (!faults_.skip_release_wait) {
        changed_.wait(lock, [&] { return slots_[copy.slot].released.completed >= copy.after_release; });
      }
      if (slots_[copy.slot].released.completed < copy.after_release && violation_.empty()) {
        violation_ =
            "a copy into slot " + std::to_string(copy.slot) + " started before the compute side had released the slot";
      }
      lock.unlock();
      if (copy.nbytes > 0) {
        std::memset(copy.dst, kPoison, copy.nbytes);
        for (size_t done = 0; done < copy.nbytes;) {
          pause(rng);
          const size_t n = std::min(copy.nbytes - done, static_cast<size_t>(options_.chunk_bytes));
          std::memcpy(static_cast<char*>(copy.dst) + done, static_cast<const char*>(copy.src) + done, n);
          done += n;
        }
      }
      lock.lock();
      slots_[copy.slot].ready.completed = copy.record;
      ++copies_done_;
      copying_ = false;
      changed_.notify_all();
    }
  }

  void run_releases() {
    std::mt19937_64 rng(options_.seed + 1);
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      changed_.wait(lock, [&] { return stopping_ || !releases_.empty(); });
      if (releases_.empty()) {
        return;
      }
      const Release release = releases_.front();
      releases_.pop_front();
      releasing_ = true;
      lock.unlock();
      pause(rng);
      if (release.nbytes > 0) {
        if (release.keep != nullptr) {
          std::memcpy(release.keep->data(), release.dst, release.nbytes);
        }
        std::memset(release.dst, kPoison, release.nbytes);
      }
      lock.lock();
      slots_[release.slot].released.completed = release.record;
      releasing_ = false;
      changed_.notify_all();
    }
  }

  const Faults faults_;
  const Options options_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<SlotState> slots_;
  std::deque<Copy> copies_;
  std::deque<Release> releases_;
  bool copying_ = false;
  bool releasing_ = false;
  bool stopping_ = false;
  uint64_t copies_issued_ = 0;
  uint64_t copies_done_ = 0;
  std::string violation_;
  // Started last: they use every member above.
  std::thread copier_;
  std::thread completer_;
};

}  // namespace

std::unique_ptr<Transfer> make_async_cpu_transfer(const Faults& faults) {
  return std::make_unique<AsyncCpuTransfer>(faults, Options::from_env());
}

}  // namespace fastvideo_offload
