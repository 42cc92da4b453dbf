#include "engine.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "host_store.h"
#include "ops.h"

#ifdef FVO_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace fastvideo_offload {
namespace {

std::unique_ptr<Transfer> make_transfer(const c10::Device& device, const Faults& faults) {
  if (device.is_cpu()) {
    // Read per engine, so a test can switch devices without rebuilding or restarting.
    const char* kind = std::getenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER");
    const std::string name = kind == nullptr ? "sync" : kind;
    if (name == "async") {
      return make_async_cpu_transfer(faults);
    }
    TORCH_CHECK_VALUE(name == "sync" || name.empty(), "FASTVIDEO_OFFLOAD_CPU_TRANSFER must be sync or async, got '",
                      name, "'");
    return make_cpu_transfer();
  }
  TORCH_CHECK_VALUE(device.is_cuda(), "offload device must be cpu or cuda, got ", device);
#ifdef FVO_WITH_CUDA
  const auto count = c10::cuda::device_count();
  TORCH_CHECK_VALUE(device.index() >= 0 && device.index() < count, "CUDA device ", device, " does not exist (",
                    static_cast<int>(count), " visible)");
  return make_cuda_transfer(device.index());
#else
  TORCH_CHECK_VALUE(false, "offload device ", device,
                    " needs the CUDA build of fastvideo_offload; this one was built without CUDA");
#endif
}

}  // namespace

Engine::Engine(c10::Device device, int64_t prefetch, int64_t staging_threads, std::shared_ptr<StagingPool> pool)
    : device_(device),
      prefetch_(prefetch),
      staging_threads_(staging_threads),
      faults_(Faults::from_env()),
      pool_(pool ? std::move(pool) : std::make_shared<StagingPool>(device)) {
  TORCH_CHECK_VALUE(prefetch >= 0, "prefetch must be >= 0, got ", prefetch);
  TORCH_CHECK_VALUE(staging_threads >= 1 && staging_threads <= 64, "staging_threads must be in [1, 64], got ",
                    staging_threads);
  TORCH_CHECK_VALUE(!device.is_cuda() || device.has_index(), "the CUDA device needs an index, got ", device);
  TORCH_CHECK_VALUE(pool_->device() == device, "a staging pool for ", pool_->device(), " cannot serve ", device);
  transfer_ = make_transfer(device, faults_);
}

Engine::Block& Engine::block_at(int64_t block, const char* op) {
  TORCH_CHECK_INDEX(block >= 0 && block < static_cast<int64_t>(blocks_.size()), op, ": block ", block,
                    " does not exist (the engine has ", blocks_.size(), ")");
  return blocks_[block];
}

void Engine::check_idle(const char* op) const {
  for (const Block& blk : blocks_) {
    TORCH_CHECK(!blk.held, op, ": a block is running; call it between forward passes");
  }
}

bool Engine::busy() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::any_of(blocks_.begin(), blocks_.end(), [](const Block& b) { return b.held; });
}

int64_t Engine::add_block(const at::Tensor& host, at::TensorList params, at::IntArrayRef offsets, bool staged) {
  TORCH_CHECK_VALUE(host.defined() && host.device().is_cpu() && host.scalar_type() == at::kByte && host.dim() == 1 &&
                        host.is_contiguous(),
                    "add_block: the host buffer must be a contiguous 1-D uint8 CPU tensor");
  check_layout(params, offsets, host.numel(), "add_block");
  if (device_.is_cuda() && host.numel() > 0 && !staged) {
    TORCH_CHECK_VALUE(host.is_pinned(), "add_block: a block offloaded to ", device_,
                      " needs a pinned host buffer, or every copy would block the host");
  }
  Block blk;
  blk.host = host;
  blk.nbytes = host.numel();
  blk.staged = staged && blk.nbytes > 0;
  blk.segments.push_back({host.const_data_ptr(), 0, blk.nbytes});
  return add(std::move(blk), params, offsets);
}

int64_t Engine::add_gathered_block(at::TensorList sources, int64_t nbytes, at::TensorList params,
                                   at::IntArrayRef offsets) {
  TORCH_CHECK_VALUE(sources.size() == params.size(), "add_gathered_block: got ", sources.size(), " sources for ",
                    params.size(), " parameters");
  check_layout(params, offsets, nbytes, "add_gathered_block");
  Block blk;
  blk.host = at::empty({0}, at::TensorOptions().dtype(at::kByte));
  blk.nbytes = nbytes;
  blk.staged = nbytes > 0;
  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& s = sources[i];
    TORCH_CHECK_VALUE(s.defined() && s.device().is_cpu() && s.is_contiguous(), "add_gathered_block: source ", i,
                      " must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE(s.nbytes() == static_cast<size_t>(span_bytes(params[i])), "add_gathered_block: source ", i,
                      " has ", s.nbytes(), " bytes, its parameter spans ", span_bytes(params[i]));
    // The source's bytes are copied as they are into the parameter's slot view: same dtype, no gaps.
    TORCH_CHECK_VALUE(s.scalar_type() == params[i].scalar_type() && params[i].is_contiguous(),
                      "add_gathered_block: parameter ", i, " must be contiguous and of its source's dtype (",
                      s.scalar_type(), ")");
    blk.sources.push_back(s);
    blk.segments.push_back({s.const_data_ptr(), offsets[i], static_cast<int64_t>(s.nbytes())});
  }
  return add(std::move(blk), params, offsets);
}

int64_t Engine::add(Block blk, at::TensorList params, at::IntArrayRef offsets) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(slots_.empty(), "add_block: blocks are added before the first forward (or after trim)");
  TORCH_CHECK(std::none_of(blocks_.begin(), blocks_.end(), [](const Block& b) { return b.home >= 0; }),
              "add_block: blocks are added before residency is set");
  // A ring sized for the blocks so far, filling from their segments, is for them only.
  free_staging();
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const Block& blk : blocks_) {
    for (const at::Tensor& p : blk.params) {
      seen.insert(p.unsafeGetTensorImpl());
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(!p.is_meta(), "add_block: parameter ", i,
                      " is on the meta device; load real weights before enabling offload");
    TORCH_CHECK_VALUE(seen.insert(p.unsafeGetTensorImpl()).second, "add_block: parameter ", i,
                      " is already offloaded in another block (or twice in this one)");
    blk.params.push_back(p);
    blk.layouts.push_back(describe(p, offsets[i]));
    blk.placeholders.push_back(placeholder(p.scalar_type(), device_));
  }
  set_all(blk.params, blk.placeholders);
  const auto index = static_cast<int64_t>(blocks_.size());
  if (index > 0) {
    blocks_.back().next = index;
  }
  blk.next = 0;
  host_bytes_ += blk.nbytes;
  // No more blocks can be in flight than there are besides the running one.
  ring_ = static_cast<int>(std::min<int64_t>(prefetch_, index)) + 1;
  slot_bytes_ = std::max(slot_bytes_, blk.nbytes);
  if (blk.staged) {
    staged_block_bytes_ = std::max(staged_block_bytes_, blk.nbytes);
  }
  blocks_.push_back(std::move(blk));
  return index;
}

std::vector<int64_t> Engine::window(int64_t block) const {
  std::vector<int64_t> keep{block};
  int64_t b = block;
  // A resident block already on the device needs no copy: the lookahead counts the others.
  for (size_t k = 0, steps = 0; k < static_cast<size_t>(prefetch_) && steps < blocks_.size(); ++steps) {
    b = blocks_[b].next;
    if (b < 0 || std::find(keep.begin(), keep.end(), b) != keep.end()) {
      break;
    }
    if (blocks_[b].home >= 0 && blocks_[b].slot >= 0) {
      continue;
    }
    keep.push_back(b);
    ++k;
  }
  return keep;
}

int64_t Engine::allocated_bytes() const {
  int64_t total = 0;
  for (const Slot& slot : slots_) {
    total += slot.buffer.defined() ? slot.bytes : 0;
  }
  return total;
}

bool Engine::fits_budget(int index) const {
  return slot_budget_ < 0 || allocated_bytes() + slots_[index].bytes <= slot_budget_;
}

void Engine::make_slots() {
  if (!slots_.empty()) {
    return;
  }
  slots_.resize(static_cast<size_t>(ring_));
  for (Slot& slot : slots_) {
    slot.bytes = slot_bytes_;
  }
  for (const Block& blk : blocks_) {
    if (blk.home >= 0) {
      slots_.resize(std::max<size_t>(slots_.size(), static_cast<size_t>(home_slot(blk)) + 1));
      slots_[home_slot(blk)].bytes = blk.nbytes;
    }
  }
  transfer_->set_slot_count(static_cast<int>(slots_.size()));
}

void Engine::allocate_slot(int index) {
  slots_[index].buffer = at::empty({slots_[index].bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
  // The allocator may hand back memory that kernels queued on the compute stream still use:
  // the first copy into it waits until the compute stream has passed this point.
  transfer_->release(index);
}

void Engine::free_slots(const std::vector<int>& doomed) {
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
    if (slot.block >= 0) {
      blocks_[slot.block].slot = -1;
    }
    slot.buffer = at::Tensor();
    slot.block = -1;
    slot.last_use = 0;
    for (Block& blk : blocks_) {
      if (static_cast<size_t>(s) < blk.views.size()) {
        blk.views[s].clear();
      }
    }
  }
}

void Engine::free_slots_except(int keep) {
  std::vector<int> doomed;
  for (size_t s = 0; s < slots_.size(); ++s) {
    const Slot& slot = slots_[s];
    if (static_cast<int>(s) != keep && slot.buffer.defined() && (slot.block < 0 || !blocks_[slot.block].held)) {
      doomed.push_back(static_cast<int>(s));
    }
  }
  free_slots(doomed);
}

bool Engine::allocate(int index, bool required) {
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
    if (prefetch_alloc_blocked_ || !fits_budget(index) || no_room()) {
      prefetch_alloc_blocked_ = true;
      ++prefetch_skipped_oom_;
      return false;
    }
    try {
      allocate_slot(index);
      return true;
    } catch (const c10::OutOfMemoryError&) {
      prefetch_alloc_blocked_ = true;
      ++slot_alloc_failures_;
      ++prefetch_skipped_oom_;
      return false;
    }
  }
  if (fits_budget(index)) {
    try {
      allocate_slot(index);
      return true;
    } catch (const c10::OutOfMemoryError&) {
      ++slot_alloc_failures_;
    }
  }
  // The block must run: give back every slot that no running block needs, then try once more.
  free_slots_except(index);
  TORCH_CHECK_WITH(OutOfMemoryError, fits_budget(index), "fastvideo_offload: no device memory for one block (",
                   slots_[index].bytes, " bytes): the slot budget is ", slot_budget_, " bytes");
  try {
    allocate_slot(index);
  } catch (const c10::OutOfMemoryError& e) {
    ++slot_alloc_failures_;
    TORCH_CHECK_WITH(OutOfMemoryError, false, "fastvideo_offload: no device memory for one block (", slots_[index].bytes,
                     " bytes on ", device_, ") even after freeing every prefetched block: ", e.what_without_backtrace());
  }
  return true;
}

int Engine::claim_home(const Block& blk, bool required) {
  make_slots();
  return allocate(home_slot(blk), required) ? home_slot(blk) : -1;
}

int Engine::claim_slot(const std::vector<int64_t>& keep, bool required) {
  make_slots();
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
    if ((slot.block >= 0 && blocks_[slot.block].held) || (!required && rank(s) == 3)) {
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

void Engine::upload(int64_t block, int slot_index) {
  Block& blk = blocks_[block];
  Slot& slot = slots_[slot_index];
  if (slot.block >= 0) {
    blocks_[slot.block].slot = -1;
    slot.block = -1;
  }
  // The source of the bytes: a pinned block's own buffer, or the staging buffer holding a staged one.
  const void* src = nullptr;
  int staging_buffer = -1;
  if (!blk.staged) {
    src = blk.host.const_data_ptr();
  } else {
    if (!staging_) {
      // Enough buffers for the prefetched uploads in flight and one being filled ahead, and no
      // more than there are staged blocks to hold.
      const auto staged = std::count_if(blocks_.begin(), blocks_.end(), [](const Block& b) { return b.staged; });
      const auto buffers = static_cast<int>(std::min<int64_t>(ring_ + 1, staged));
      staging_ = std::make_unique<Staging>(buffers, static_cast<int>(staging_threads_), staged_block_bytes_, pool_,
                                           faults_);
      staging_->trace(trace_staging_);
    }
    src = staging_->take(staging_request(block), &staging_buffer);
  }
  transfer_->upload(slot_index, slot.buffer.data_ptr(), src, static_cast<size_t>(blk.nbytes));
  if (staging_buffer >= 0) {
    staging_->uploaded(staging_buffer, transfer_->fence());
  }
  slot.block = block;
  slot.last_use = ++tick_;
  blk.slot = slot_index;
  ++uploads_;
  h2d_bytes_ += blk.nbytes;
  const auto streamed = std::count_if(slots_.begin(), slots_.begin() + ring_, [](const Slot& s) { return s.block >= 0; });
  max_resident_ = std::max<int64_t>(max_resident_, streamed);
}

void Engine::prefetch_after(const std::vector<int64_t>& keep) {
  for (size_t k = 1; k < keep.size(); ++k) {
    Block& blk = blocks_[keep[k]];
    if (blk.slot >= 0 || blk.nbytes == 0) {
      continue;
    }
    if (!bytes_ready(blk, keep[k])) {
      return;  // a prefetch does not wait for staging; the block waits for it when it must run
    }
    const int s = blk.home >= 0 ? claim_home(blk, /*required=*/false) : claim_slot(keep, /*required=*/false);
    if (s < 0) {
      return;
    }
    upload(keep[k], s);
    ++prefetches_;
  }
}

void Engine::enter(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "enter");
  if (blk.held) {
    // Entered again without an exit: the last forward was interrupted past the post-hook.
    release(blk);
  }
  if (last_entered_ >= 0 && last_entered_ != block) {
    blocks_[last_entered_].next = block;
  }
  last_entered_ = block;
  if (starting_) {
    first_entered_ = block;
    starting_ = false;
  }
  ++enters_;
  const std::vector<int64_t> keep = window(block);
  if (blk.nbytes > 0) {
    if (blk.slot < 0) {
      const int s = blk.home >= 0 ? claim_home(blk, /*required=*/true) : claim_slot(keep, /*required=*/true);
      TORCH_CHECK(s >= 0, "enter: all ", ring_, " streaming device slots (prefetch + 1) hold running blocks; block ",
                  block, " cannot run inside another offloaded block: raise prefetch");
      upload(block, s);
      ++sync_loads_;
    }
    if (!faults_.skip_ready_wait) {
      transfer_->wait_ready(blk.slot);
    }
    if (blk.views.size() != slots_.size()) {
      blk.views.resize(slots_.size());
    }
    auto& views = blk.views[blk.slot];
    if (views.empty()) {
      for (const TensorLayout& layout : blk.layouts) {
        views.push_back(view_into(slots_[blk.slot].buffer, layout));
      }
    }
    set_all(blk.params, views);
  } else if (!blk.params.empty()) {
    // Only empty tensors: their views need no bytes, only the device to live on.
    if (blk.views.empty()) {
      blk.views.emplace_back();
      for (const TensorLayout& layout : blk.layouts) {
        blk.views[0].push_back(view_into(placeholder(at::kByte, device_), layout));
      }
    }
    set_all(blk.params, blk.views[0]);
  }
  blk.held = true;
  // A block with bytes that is held sits in a slot: counting slots keeps this O(slots), not O(blocks).
  const auto materialized = std::count_if(slots_.begin(), slots_.end(),
                                          [&](const Slot& s) { return s.block >= 0 && blocks_[s.block].held; });
  max_materialized_ = std::max<int64_t>(max_materialized_, materialized);
  prefetch_after(keep);
  plan_staging(block);
}

bool Engine::bytes_ready(const Block& blk, int64_t block) {
  return !blk.staged || (staging_ && staging_->ready(block));
}

void Engine::plan_staging(int64_t block) {
  if (!staging_) {
    return;
  }
  // The staged blocks that will need an upload next, in the learned execution order.
  std::vector<Staging::Request> order;
  int64_t b = block;
  for (size_t steps = 0; steps < blocks_.size() && order.size() < static_cast<size_t>(staging_->buffers()); ++steps) {
    b = blocks_[b].next;
    if (b < 0 || b == block) {
      break;
    }
    const Block& next = blocks_[b];
    if (next.staged && next.slot < 0) {
      order.push_back(staging_request(b));
    }
  }
  staging_->plan(order);
}

std::vector<int64_t> Engine::order() {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto n = static_cast<int64_t>(blocks_.size());
  std::vector<bool> seen(blocks_.size(), false);
  std::vector<int64_t> out;
  for (int64_t b = first_entered_ >= 0 ? first_entered_ : 0; b >= 0 && b < n && !seen[b]; b = blocks_[b].next) {
    seen[b] = true;
    out.push_back(b);
  }
  for (int64_t b = 0; b < n; ++b) {
    if (!seen[b]) {
      out.push_back(b);
    }
  }
  return out;
}

Staging::Counts Engine::staging_counts() const {
  if (!staging_) {
    return staged_before_;
  }
  const Staging::Counts now = staging_->counts();
  return {staged_before_.waits + now.waits, staged_before_.bytes + now.bytes, staged_before_.fills + now.fills};
}

Staging::Request Engine::staging_request(int64_t block) const {
  const Block& blk = blocks_[block];
  return {block, blk.segments.data(), static_cast<int64_t>(blk.segments.size()), blk.nbytes};
}

void Engine::release(Block& blk) {
  set_all(blk.params, blk.placeholders);
  blk.held = false;
  if (blk.slot >= 0) {
    transfer_->release(blk.slot);
    slots_[blk.slot].last_use = ++tick_;
  }
}

void Engine::exit(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "exit");
  if (!blk.held) {
    return;
  }
  // A forward that assigned new data to a parameter (a repack, as bitsandbytes' nf4 does) would
  // have it dropped here, and every later forward would read the old bytes: refuse loudly. The
  // block is released first, so the engine stays consistent and the model can still be disabled.
  int64_t replaced = -1;
  if (!blk.params.empty()) {
    const auto& views = blk.nbytes > 0 ? blk.views[blk.slot] : blk.views[0];
    for (size_t i = 0; i < blk.params.size() && replaced < 0; ++i) {
      if (!holds(blk.params[i], views[i])) {
        replaced = static_cast<int64_t>(i);
      }
    }
  }
  if (watch_memory_) {
    const int64_t allocated = transfer_->allocated_bytes();
    if (allocated >= 0) {
      forward_peak_ = std::max(forward_peak_, allocated - allocated_bytes());
    }
  }
  release(blk);
  TORCH_CHECK(replaced < 0, "the forward of offloaded block ", block, " replaced the data of its parameter ", replaced,
              " (", blk.layouts[replaced].dtype, " ", c10::IntArrayRef(blk.layouts[replaced].sizes),
              ") with a new tensor; offload cannot keep data a forward creates (the host store keeps the old "
              "weights, which the next forward would read), so it refuses. Modules that repack their weights in "
              "their forward (bitsandbytes 4-bit) cannot be offloaded; disable() restores the stored weights");
}

void Engine::park(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "park");
  TORCH_CHECK(!blk.held, "park: block ", block, " is running");
  set_all(blk.params, blk.placeholders);
}

void Engine::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  prefetch_alloc_blocked_ = false;
  h2d_at_forward_ = h2d_bytes_;
  forward_peak_ = 0;
  starting_ = true;
  for (Block& blk : blocks_) {
    if (blk.held) {
      release(blk);
    }
  }
}

void Engine::set_slot_budget(int64_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_VALUE(nbytes >= -1, "slot budget must be >= 0 bytes (or -1 for none), got ", nbytes);
  slot_budget_ = nbytes;
}

void Engine::invalidate() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_idle("invalidate");
  for (Slot& slot : slots_) {
    slot.block = -1;
  }
  for (Block& blk : blocks_) {
    blk.slot = -1;
  }
  if (staging_) {
    staging_->forget();
  }
}

void Engine::trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_idle("trim");
  free_all_slots();
  free_staging();
}

void Engine::free_staging() {
  if (!staging_) {
    return;
  }
  // Its pinned buffers are as idle as the slots; the next staged upload makes a new ring.
  staged_before_ = staging_counts();
  for (const Staging::Piece& piece : staging_->take_trace()) {
    if (trace_before_.size() < Staging::kTracePieces) {
      trace_before_.push_back(piece);
    }
  }
  staging_.reset();  // waits for the uploads that read its buffers, then gives them to the pool
  if (pool_.use_count() == 1) {
    pool_->clear();  // no other engine of a group can use them
  }
}

void Engine::trace_staging(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  trace_staging_ = on;
  if (staging_) {
    staging_->trace(on);
  }
}

at::Tensor Engine::staging_trace() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Staging::Piece> pieces = std::exchange(trace_before_, {});
  if (staging_) {
    const std::vector<Staging::Piece> recent = staging_->take_trace();
    pieces.insert(pieces.end(), recent.begin(), recent.end());
  }
  at::Tensor out = at::empty({static_cast<int64_t>(pieces.size()), 4}, at::kLong);
  int64_t* row = out.data_ptr<int64_t>();
  for (const Staging::Piece& piece : pieces) {
    *row++ = piece.block;
    *row++ = piece.thread;
    *row++ = piece.start_ns;
    *row++ = piece.end_ns;
  }
  return out;
}

void Engine::free_all_slots() {
  prefetch_alloc_blocked_ = false;
  if (slots_.empty()) {
    return;
  }
  free_slots_except(-1);
  slots_.clear();
  for (Block& blk : blocks_) {
    blk.slot = -1;
    blk.views.clear();
  }
}

void Engine::set_resident(at::IntArrayRef blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_idle("set_resident");
  std::vector<bool> chosen(blocks_.size(), false);
  for (const int64_t b : blocks) {
    block_at(b, "set_resident");
    TORCH_CHECK_VALUE(!chosen[b], "set_resident: block ", b, " is named twice");
    chosen[b] = true;
  }
  int64_t ring_bytes = 0;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    if (!chosen[b]) {
      ring_bytes = std::max(ring_bytes, blocks_[b].nbytes);
    }
  }
  // Only what changes is freed: the ring when its slots' size changes, and the homes of blocks
  // that stream from now on. A block that stays resident keeps its slot and the bytes in it.
  std::vector<int> doomed;
  std::vector<bool> taken;  // home indices kept by blocks that stay resident
  for (Block& blk : blocks_) {
    const bool stays = chosen[&blk - blocks_.data()];
    if (blk.home >= 0 && stays) {
      taken.resize(std::max<size_t>(taken.size(), static_cast<size_t>(blk.home) + 1), false);
      taken[blk.home] = true;
    } else if (blk.home >= 0) {
      if (!slots_.empty() && slots_[home_slot(blk)].buffer.defined()) {
        doomed.push_back(home_slot(blk));
      }
      blk.home = -1;
    }
  }
  if (ring_bytes != slot_bytes_ && !slots_.empty()) {
    for (int s = 0; s < ring_; ++s) {
      if (slots_[s].buffer.defined()) {
        doomed.push_back(s);
      }
    }
  }
  free_slots(doomed);
  slot_bytes_ = ring_bytes;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    Block& blk = blocks_[b];
    if (!chosen[b] || blk.home >= 0) {
      continue;
    }
    // A block that becomes resident may be cached in a ring slot: it is copied into its own once.
    if (blk.slot >= 0) {
      slots_[blk.slot].block = -1;
      blk.slot = -1;
    }
    const auto free_home = std::find(taken.begin(), taken.end(), false);
    blk.home = static_cast<int>(free_home - taken.begin());
    if (free_home == taken.end()) {
      taken.push_back(true);
    } else {
      *free_home = true;
    }
  }
  if (slots_.empty()) {
    return;  // make_slots sizes them at the first forward
  }
  for (int s = 0; s < ring_; ++s) {
    slots_[s].bytes = slot_bytes_;
  }
  slots_.resize(static_cast<size_t>(ring_) + taken.size());
  for (size_t k = static_cast<size_t>(ring_); k < slots_.size(); ++k) {
    slots_[k].bytes = 0;  // unused until a block makes it its home
  }
  for (const Block& blk : blocks_) {
    if (blk.home >= 0) {
      slots_[home_slot(blk)].bytes = blk.nbytes;
    }
  }
  transfer_->set_slot_count(static_cast<int>(slots_.size()));
}

void Engine::watch_memory(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  watch_memory_ = on;
}

c10::Dict<std::string, int64_t> Engine::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto allocated = std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.buffer.defined(); });
  c10::Dict<std::string, int64_t> out;
  out.insert("blocks", static_cast<int64_t>(blocks_.size()));
  out.insert("host_bytes", host_bytes_);
  out.insert("slot_bytes", slot_bytes_);
  out.insert("device_slots", allocated);
  out.insert("device_bytes", allocated_bytes());
  int64_t resident = 0;
  int64_t resident_bytes = 0;
  for (const Block& blk : blocks_) {
    resident += blk.home >= 0 ? 1 : 0;
    resident_bytes += blk.home >= 0 ? blk.nbytes : 0;
  }
  out.insert("resident_blocks", resident);
  out.insert("resident_bytes", resident_bytes);
  out.insert("streamed_blocks", static_cast<int64_t>(blocks_.size()) - resident);
  out.insert("enters", enters_);
  out.insert("uploads", uploads_);
  out.insert("prefetches", prefetches_);
  out.insert("sync_loads", sync_loads_);
  out.insert("prefetch_skipped_oom", prefetch_skipped_oom_);
  out.insert("slot_alloc_failures", slot_alloc_failures_);
  out.insert("h2d_bytes", h2d_bytes_);
  out.insert("forward_h2d_bytes", h2d_bytes_ - h2d_at_forward_);
  out.insert("max_resident_blocks", max_resident_);
  out.insert("max_materialized_blocks", max_materialized_);
  out.insert("running_blocks", std::count_if(blocks_.begin(), blocks_.end(), [](const Block& b) { return b.held; }));
  int64_t staged = 0;
  int64_t staged_host = 0;
  for (const Block& blk : blocks_) {
    staged += blk.staged ? 1 : 0;
    staged_host += blk.staged ? blk.nbytes : 0;
  }
  const Staging::Counts counts = staging_counts();
  out.insert("staged_blocks", staged);
  out.insert("staging_threads", staging_threads_);
  out.insert("pinned_bytes", host_bytes_ - staged_host);
  out.insert("staging_buffer_bytes", staging_ ? staging_->buffers() * staging_->buffer_bytes() : 0);
  out.insert("staged_bytes", counts.bytes);
  out.insert("stagings", counts.fills);
  out.insert("staging_waits", counts.waits);
  out.insert("staging_pool_bytes", pool_->idle_bytes());
  out.insert("staging_buffer_allocs", pool_->allocations());
  out.insert("prefetch", static_cast<int64_t>(ring_) - 1);
  out.insert("forward_peak_bytes", forward_peak_);
  return out;
}

// ---- the op layer: engines are named by an integer handle, checked on every call ----

namespace {

std::mutex registry_mutex;
std::unordered_map<int64_t, std::shared_ptr<Engine>>& registry() {
  static auto* engines = new std::unordered_map<int64_t, std::shared_ptr<Engine>>();
  return *engines;
}
std::atomic<int64_t> next_handle{1};

std::shared_ptr<Engine> lookup(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(handle);
  TORCH_CHECK_VALUE(it != registry().end(), "no offload engine with handle ", handle,
                    " (never created, or already destroyed)");
  return it->second;
}

}  // namespace

int64_t engine_create(c10::Device device, int64_t prefetch, int64_t staging_threads, int64_t share_staging_with) {
  std::shared_ptr<StagingPool> pool;
  if (share_staging_with != 0) {
    const std::shared_ptr<Engine> peer = lookup(share_staging_with);
    TORCH_CHECK_VALUE(peer->device() == device, "engine_create: engine ", share_staging_with, " stages for ",
                      peer->device(), ", not ", device, "; only engines of one device share staging buffers");
    pool = peer->staging_pool();
  }
  auto engine = std::make_shared<Engine>(device, prefetch, staging_threads, std::move(pool));
  const int64_t handle = next_handle++;
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().emplace(handle, std::move(engine));
  return handle;
}

int64_t engine_add_block(int64_t engine, const at::Tensor& host, at::TensorList params, at::IntArrayRef offsets,
                         bool staged) {
  return lookup(engine)->add_block(host, params, offsets, staged);
}

std::vector<int64_t> engine_order(int64_t engine) { return lookup(engine)->order(); }

int64_t engine_add_gathered_block(int64_t engine, at::TensorList sources, int64_t nbytes, at::TensorList params,
                                  at::IntArrayRef offsets) {
  return lookup(engine)->add_gathered_block(sources, nbytes, params, offsets);
}

void engine_enter(int64_t engine, int64_t block) { lookup(engine)->enter(block); }
void engine_exit(int64_t engine, int64_t block) { lookup(engine)->exit(block); }
void engine_park(int64_t engine, int64_t block) { lookup(engine)->park(block); }
void engine_reset(int64_t engine) { lookup(engine)->reset(); }
void engine_set_slot_budget(int64_t engine, int64_t nbytes) { lookup(engine)->set_slot_budget(nbytes); }
void engine_invalidate(int64_t engine) { lookup(engine)->invalidate(); }
void engine_trim(int64_t engine) { lookup(engine)->trim(); }
void engine_set_resident(int64_t engine, at::IntArrayRef blocks) { lookup(engine)->set_resident(blocks); }
c10::Dict<std::string, int64_t> engine_stats(int64_t engine) { return lookup(engine)->stats(); }
void engine_trace_staging(int64_t engine, bool on) { lookup(engine)->trace_staging(on); }
void engine_watch_memory(int64_t engine, bool on) { lookup(engine)->watch_memory(on); }
at::Tensor engine_staging_trace(int64_t engine) { return lookup(engine)->staging_trace(); }

void engine_destroy(int64_t engine) {
  std::shared_ptr<Engine> doomed = lookup(engine);
  TORCH_CHECK(!doomed->busy(), "destroy: a block of engine ", engine, " is running");
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().erase(engine);
}

}  // namespace fastvideo_offload
