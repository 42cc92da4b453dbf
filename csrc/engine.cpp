#include "engine.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <unordered_set>
#include <utility>

#include "host_store.h"

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
      pool_(pool ? std::move(pool) : std::make_shared<StagingPool>(device)),
      schedule_(prefetch),
      slots_(device, prefetch, faults_, checked_transfer(), *this) {}

// The arguments are checked before the transfer is made: an error names the first wrong one.
std::unique_ptr<Transfer> Engine::checked_transfer() const {
  TORCH_CHECK_VALUE(prefetch_ >= 0, "prefetch must be >= 0, got ", prefetch_);
  TORCH_CHECK_VALUE(staging_threads_ >= 1 && staging_threads_ <= 64, "staging_threads must be in [1, 64], got ",
                    staging_threads_);
  TORCH_CHECK_VALUE(!device_.is_cuda() || device_.has_index(), "the CUDA device needs an index, got ", device_);
  TORCH_CHECK_VALUE(pool_->device() == device_, "a staging pool for ", pool_->device(), " cannot serve ", device_);
  return make_transfer(device_, faults_);
}

Engine::Block& Engine::block_at(int64_t block, const char* op) {
  TORCH_CHECK_INDEX(block >= 0 && block < static_cast<int64_t>(blocks_.size()), op, ": block ", block,
                    " does not exist (the engine has ", blocks_.size(), ")");
  return blocks_[block];
}

void Engine::check_idle(const char* op) const {
  for (const Block& blk : blocks_) {
    TORCH_CHECK(blk.state != Block::State::Running, op, ": a block is running; call it between forward passes");
    TORCH_CHECK(blk.holds == 0, op, ": a backward holds a block; call it between training steps");
  }
}

bool Engine::busy() {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::any_of(blocks_.begin(), blocks_.end(),
                     [](const Block& b) { return b.state == Block::State::Running || b.holds > 0; });
}

void Engine::evicted(int64_t block) {
  // See [Note: block life cycle]: OnDevice -> OnHost.
  Block& blk = blocks_[block];
  blk.slot = -1;
  blk.state = Block::State::OnHost;
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
  TORCH_CHECK(!slots_.made(), "add_block: blocks are added before the first forward (or after trim)");
  TORCH_CHECK(!slots_.any_resident(), "add_block: blocks are added before residency is set");
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
  schedule_.add_block();
  slots_.add_block(blk.nbytes);
  host_bytes_ += blk.nbytes;
  if (blk.staged) {
    staged_block_bytes_ = std::max(staged_block_bytes_, blk.nbytes);
  }
  blocks_.push_back(std::move(blk));
  return index;
}

void Engine::upload(int64_t block, int slot) {
  Block& blk = blocks_[block];
  slots_.vacate(slot);
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
      const auto buffers = static_cast<int>(std::min<int64_t>(slots_.ring() + 1, staged));
      staging_ =
          std::make_unique<Staging>(buffers, static_cast<int>(staging_threads_), staged_block_bytes_, pool_, faults_);
      staging_->trace(trace_staging_);
    }
    src = staging_->take(staging_request(block), &staging_buffer);
  }
  Transfer& transfer = slots_.transfer();
  transfer.upload(slot, slots_.buffer(slot).data_ptr(), src, static_cast<size_t>(blk.nbytes));
  if (staging_buffer >= 0) {
    staging_->uploaded(staging_buffer, transfer.fence());
  }
  slots_.fill(slot, block);
  // See [Note: block life cycle]: OnHost -> OnDevice.
  blk.slot = slot;
  blk.state = Block::State::OnDevice;
  ++uploads_;
  h2d_bytes_ += blk.nbytes;
  max_filled_ring_slots_ = std::max(max_filled_ring_slots_, slots_.streamed_held());
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
    const int s = slots_.claim(keep[k], keep, /*required=*/false);
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
  if (blk.state == Block::State::Running) {
    // Entered again without an exit: the last forward was interrupted past the post-hook.
    release(blk);
  }
  schedule_.entered(block);
  ++enters_;
  const std::vector<int64_t> keep =
      schedule_.window(block, [&](int64_t b) { return slots_.resident(b) && blocks_[b].slot >= 0; });
  if (blk.nbytes > 0 && blk.slot < 0) {
    const int s = slots_.claim(block, keep, /*required=*/true);
    TORCH_CHECK(s >= 0, "enter: all ", slots_.ring(),
                " streaming device slots (prefetch + 1) hold running blocks; block ", block,
                " cannot run inside another offloaded block: raise prefetch");
    upload(block, s);
    ++sync_loads_;
  }
  start_running(block, keep, /*fixed=*/false, Schedule::Direction::Forward);
}

bool Engine::enter_grad(int64_t block, bool in_backward) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "enter");
  if (blk.state == Block::State::Running) {
    release(blk);
  }
  ++enters_;
  if (in_backward && blk.holds > 0) {
    // A non-reentrant checkpoint's recompute inside the block's own backward: the hold keeps its
    // bytes in its slot, and the blocks before it are being fetched already.
    start_running(block, {block}, /*fixed=*/true, Schedule::Direction::Backward);
    return true;
  }
  const auto direction = in_backward ? Schedule::Direction::Backward : Schedule::Direction::ForwardToEnd;
  if (!in_backward) {
    schedule_.entered(block);
  }
  const std::vector<int64_t> keep =
      schedule_.window(block, [&](int64_t b) { return slots_.resident(b) && blocks_[b].slot >= 0; }, direction);
  const int64_t uploads = uploads_;
  if (blk.nbytes > 0) {
    fill_fixed(block, "enter");
  }
  sync_loads_ += uploads_ - uploads;
  start_running(block, keep, /*fixed=*/true, direction);
  if (in_backward) {
    backward_uploads_ += uploads_ - uploads;
  }
  return false;
}

void Engine::fill_fixed(int64_t block, const char* op) {
  Block& blk = blocks_[block];
  const int fixed = slots_.fixed_slot(block);
  if (blk.slot == fixed) {
    return;
  }
  const int s = slots_.claim_fixed(block, /*required=*/true);
  TORCH_CHECK(s >= 0, op, ": block ", block, " runs in grad mode from device slot ", fixed, ", which block ",
              slots_.holder(fixed),
              " still needs (running, or held for its backward): in training, blocks that run inside another, "
              "or backwards that overlap, need more streaming slots: raise prefetch");
  if (blk.slot >= 0) {
    slots_.vacate(blk.slot);  // cached in another ring slot by a forward without grad
  }
  upload(block, s);
}

void Engine::start_running(int64_t block, const std::vector<int64_t>& keep, bool fixed, Schedule::Direction direction) {
  Block& blk = blocks_[block];
  if (blk.nbytes > 0 && !faults_.skip_ready_wait) {
    slots_.transfer().wait_ready(blk.slot);
  }
  set_all(blk.params, views_of(blk, block));
  // See [Note: block life cycle]: OnHost or OnDevice -> Running.
  blk.state = Block::State::Running;
  // A block with bytes that is running sits in a slot: counting slots keeps this O(slots), not O(blocks).
  max_materialized_ = std::max(max_materialized_, slots_.in_use_held());
  if (fixed) {
    prefetch_fixed(keep);
  } else {
    prefetch_after(keep);
  }
  plan_staging(block, direction);
}

void Engine::prefetch_fixed(const std::vector<int64_t>& keep) {
  for (size_t k = 1; k < keep.size(); ++k) {
    const int64_t b = keep[k];
    Block& blk = blocks_[b];
    if (blk.nbytes == 0 || blk.slot == slots_.fixed_slot(b) || in_use(b)) {
      continue;
    }
    if (!bytes_ready(blk, b)) {
      return;
    }
    const int s = slots_.claim_fixed(b, /*required=*/false);
    if (s < 0) {
      return;
    }
    if (blk.slot >= 0) {
      slots_.vacate(blk.slot);
    }
    upload(b, s);
    ++prefetches_;
  }
}

const std::vector<at::Tensor>& Engine::views_of(Block& blk, int64_t block) {
  if (blk.nbytes > 0) {
    auto& views = slots_.views(blk.slot, block);
    if (views.empty()) {
      for (const TensorLayout& layout : blk.layouts) {
        views.push_back(view_into(slots_.buffer(blk.slot), layout));
      }
    }
    return views;
  }
  // Only empty tensors: their views need no bytes, only the device to live on.
  if (blk.empty_views.empty()) {
    for (const TensorLayout& layout : blk.layouts) {
      blk.empty_views.push_back(view_into(placeholder(at::kByte, device_), layout));
    }
  }
  return blk.empty_views;
}

bool Engine::bytes_ready(const Block& blk, int64_t block) {
  return !blk.staged || (staging_ && staging_->ready(block));
}

void Engine::plan_staging(int64_t block, Schedule::Direction direction) {
  if (!staging_) {
    return;
  }
  // The staged blocks that will need an upload next, in the learned execution order (backwards in a backward).
  const std::vector<int64_t> next = schedule_.upcoming(
      block, static_cast<size_t>(staging_->buffers()),
      [&](int64_t b) { return blocks_[b].staged && blocks_[b].state == Block::State::OnHost; }, direction);
  std::vector<Staging::Request> order;
  order.reserve(next.size());
  for (const int64_t b : next) {
    order.push_back(staging_request(b));
  }
  staging_->plan(order);
}

std::vector<int64_t> Engine::order() {
  std::lock_guard<std::mutex> lock(mutex_);
  return schedule_.order();
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
  if (blk.holds > 0) {
    // Its backward reads the parameters themselves too (layer norm saves its weight, not a view):
    // they stay views into the slot until the last unhold. See [Note: block life cycle].
    blk.state = Block::State::OnDevice;
    return;
  }
  set_all(blk.params, blk.placeholders);
  // See [Note: block life cycle]: Running -> OnDevice (OnHost without bytes).
  blk.state = blk.slot >= 0 ? Block::State::OnDevice : Block::State::OnHost;
  if (blk.slot >= 0) {
    slots_.release(blk.slot);
  }
}

void Engine::exit(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "exit");
  if (blk.state == Block::State::Running) {
    finish(blk, block);
  }
}

int64_t Engine::exit_grad(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "exit");
  if (blk.holds > 0) {
    // Under non-reentrant checkpointing the post-hook also runs when the recompute stops early:
    // the backward still needs the block.
    if (blk.state == Block::State::Running) {
      release(blk);
    }
    return kHeld;
  }
  if (blk.state != Block::State::Running) {
    return kNoSlot;
  }
  finish(blk, block);
  return blk.slot >= 0 ? token(blk.slot) : kNoSlot;
}

namespace {
// A token: the slot (16 bits), its generation (24) and the weights' epoch (23), each as far as its bits go.
constexpr int kSlotBits = 16;
constexpr int kGenerationBits = 24;
constexpr int64_t kGenerationMask = (int64_t{1} << kGenerationBits) - 1;
constexpr int64_t kEpochMask = (int64_t{1} << 23) - 1;
}  // namespace

int64_t Engine::token(int slot) const {
  return static_cast<int64_t>(slot) | ((static_cast<int64_t>(slots_.generation(slot)) & kGenerationMask) << kSlotBits) |
         ((weights_epoch_ & kEpochMask) << (kSlotBits + kGenerationBits));
}

void Engine::hold(int64_t block, int64_t token) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "hold");
  TORCH_CHECK_VALUE(token >= 0, "hold: block ", block, ": ", token, " is not a token of exit_grad");
  const int slot = static_cast<int>(token & ((1 << kSlotBits) - 1));
  const int64_t generation = (token >> kSlotBits) & kGenerationMask;
  const int64_t epoch = token >> (kSlotBits + kGenerationBits);
  TORCH_CHECK(epoch == (weights_epoch_ & kEpochMask), "backward: the weights of block ", block,
              " changed between its forward and its backward (mutate, load_state_dict): the backward would not "
              "match the forward; change offloaded weights between training steps");
  TORCH_CHECK(slots_.made() && slot == slots_.fixed_slot(block) &&
                  generation == (static_cast<int64_t>(slots_.generation(slot)) & kGenerationMask),
              "backward: the device memory block ", block,
              "'s forward ran in was freed or given another use before its backward (trim, disable, a device "
              "budget that re-planned residency, limit_device_memory, or device memory that ran out during the "
              "forward); change these between training steps, and give the device room for the whole ring of "
              "prefetch + 1 slots");
  const int64_t uploads = uploads_;
  if (blk.slot != slot) {
    const int64_t occupant = slots_.holder(slot);
    TORCH_CHECK(occupant < 0 || !in_use(occupant), "backward: block ", block, " needs device slot ", slot,
                ", which block ", occupant,
                " still holds for its own backward: their backwards overlap by more than the ring's prefetch + 1 "
                "slots; raise prefetch");
    if (blk.slot >= 0) {
      slots_.vacate(blk.slot);
    }
    upload(block, slot);
  }
  if (!faults_.skip_ready_wait) {
    slots_.transfer().wait_ready(slot);
  }
  if (blk.holds++ == 0 && blk.state != Block::State::Running) {
    set_all(blk.params, views_of(blk, block));
  }
  const std::vector<int64_t> keep = schedule_.window(
      block, [&](int64_t b) { return slots_.resident(b) && blocks_[b].slot >= 0; }, Schedule::Direction::Backward);
  prefetch_fixed(keep);
  plan_staging(block, Schedule::Direction::Backward);
  backward_uploads_ += uploads_ - uploads;
  max_materialized_ = std::max(max_materialized_, slots_.in_use_held());
  if (watch_memory_) {
    const int64_t allocated = slots_.transfer().allocated_bytes();
    if (allocated >= 0) {
      forward_peak_ = std::max(forward_peak_, allocated - slots_.allocated_bytes());
    }
  }
}

void Engine::unhold(int64_t block) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block& blk = block_at(block, "unhold");
  if (blk.holds > 0 && --blk.holds == 0 && blk.state != Block::State::Running) {
    release(blk);  // on the stream the backward ran on
  }
}

int64_t Engine::drop_holds() {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t dropped = 0;
  for (Block& blk : blocks_) {
    if (blk.holds == 0) {
      continue;
    }
    ++dropped;
    blk.holds = 0;
    if (blk.state != Block::State::Running) {
      release(blk);
    }
  }
  return dropped;
}

void Engine::finish(Block& blk, int64_t block) {
  // A forward that assigned new data to a parameter (a repack, as bitsandbytes' nf4 does) would
  // have it dropped here, and every later forward would read the old bytes: refuse loudly. The
  // block is released first, so the engine stays consistent and the model can still be disabled.
  int64_t replaced = -1;
  if (!blk.params.empty()) {
    const auto& views = blk.nbytes > 0 ? slots_.views(blk.slot, block) : blk.empty_views;
    for (size_t i = 0; i < blk.params.size() && replaced < 0; ++i) {
      if (!holds(blk.params[i], views[i])) {
        replaced = static_cast<int64_t>(i);
      }
    }
  }
  if (watch_memory_) {
    const int64_t allocated = slots_.transfer().allocated_bytes();
    if (allocated >= 0) {
      forward_peak_ = std::max(forward_peak_, allocated - slots_.allocated_bytes());
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
  TORCH_CHECK(blk.state != Block::State::Running, "park: block ", block, " is running");
  // See [Note: block life cycle]: the state stays.
  set_all(blk.params, blk.placeholders);
}

void Engine::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  slots_.restart();
  h2d_at_forward_ = h2d_bytes_;
  forward_peak_ = 0;
  schedule_.restart();
  for (Block& blk : blocks_) {
    if (blk.state == Block::State::Running) {
      release(blk);
    }
  }
}

void Engine::set_slot_budget(int64_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_VALUE(nbytes >= -1, "slot budget must be >= 0 bytes (or -1 for none), got ", nbytes);
  slots_.set_budget(nbytes);
}

void Engine::invalidate() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_idle("invalidate");
  ++weights_epoch_;
  slots_.forget();
  if (staging_) {
    staging_->forget();
  }
}

void Engine::trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_idle("trim");
  slots_.free_all();
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

void Engine::set_resident(at::IntArrayRef blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_idle("set_resident");
  std::vector<bool> chosen(blocks_.size(), false);
  for (const int64_t b : blocks) {
    block_at(b, "set_resident");
    TORCH_CHECK_VALUE(!chosen[b], "set_resident: block ", b, " is named twice");
    chosen[b] = true;
  }
  slots_.set_resident(chosen);
}

void Engine::watch_memory(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  watch_memory_ = on;
}

c10::Dict<std::string, int64_t> Engine::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  c10::Dict<std::string, int64_t> out;
  out.insert("blocks", static_cast<int64_t>(blocks_.size()));
  out.insert("host_bytes", host_bytes_);
  out.insert("slot_bytes", slots_.slot_bytes());
  out.insert("device_slots", slots_.allocated_slots());
  out.insert("device_bytes", slots_.allocated_bytes());
  const int64_t resident = slots_.resident_blocks();
  out.insert("resident_blocks", resident);
  out.insert("resident_bytes", slots_.resident_bytes());
  out.insert("streamed_blocks", static_cast<int64_t>(blocks_.size()) - resident);
  out.insert("enters", enters_);
  out.insert("uploads", uploads_);
  out.insert("prefetches", prefetches_);
  out.insert("sync_loads", sync_loads_);
  out.insert("prefetches_skipped", slots_.prefetches_skipped());
  out.insert("slot_alloc_failures", slots_.alloc_failures());
  out.insert("h2d_bytes", h2d_bytes_);
  out.insert("forward_h2d_bytes", h2d_bytes_ - h2d_at_forward_);
  out.insert("max_filled_ring_slots", max_filled_ring_slots_);
  out.insert("max_materialized_blocks", max_materialized_);
  out.insert("running_blocks", std::count_if(blocks_.begin(), blocks_.end(),
                                             [](const Block& b) { return b.state == Block::State::Running; }));
  out.insert("held_blocks", std::count_if(blocks_.begin(), blocks_.end(), [](const Block& b) { return b.holds > 0; }));
  out.insert("backward_uploads", backward_uploads_);
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
  out.insert("prefetch", static_cast<int64_t>(slots_.ring()) - 1);
  out.insert("forward_peak_bytes", forward_peak_);
  return out;
}

}  // namespace fastvideo_offload
