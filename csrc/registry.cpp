// The engine ops: engines are named by integer handles, each checked on every call.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "engine.h"
#include "ops.h"

namespace fastvideo_offload {

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
bool engine_enter_grad(int64_t engine, int64_t block, bool in_backward) {
  return lookup(engine)->enter_grad(block, in_backward);
}
int64_t engine_exit_grad(int64_t engine, int64_t block) { return lookup(engine)->exit_grad(block); }
void engine_hold(int64_t engine, int64_t block, int64_t token) { lookup(engine)->hold(block, token); }
void engine_unhold(int64_t engine, int64_t block) { lookup(engine)->unhold(block); }
int64_t engine_drop_holds(int64_t engine) { return lookup(engine)->drop_holds(); }
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
  TORCH_CHECK(!doomed->busy(), "destroy: a block of engine ", engine, " is running or held for a backward");
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().erase(engine);
}

}  // namespace fastvideo_offload
