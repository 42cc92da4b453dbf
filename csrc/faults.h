// Ordering mistakes a test can switch on, to prove that the asynchronous CPU device and its
// checker catch each one. Read from FASTVIDEO_OFFLOAD_INJECT_FAULT (comma-separated names) when an
// engine is created; nothing but the tests sets it.
#pragma once

namespace fastvideo_offload {

struct Faults {
  bool skip_ready_wait = false;      // a block runs without waiting for its copy
  bool skip_release_wait = false;    // a copy into a slot does not wait for the slot's release
  bool free_unsynchronized = false;  // slot memory is freed without waiting for copies and compute
  bool reuse_staging_early = false;  // a staging buffer is refilled before the upload reading it finished

  static Faults from_env();
};

}  // namespace fastvideo_offload
