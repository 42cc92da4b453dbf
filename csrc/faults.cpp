#include "faults.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <sstream>
#include <string>

namespace fastvideo_offload {

Faults Faults::from_env() {
  Faults faults;
  const char* value = std::getenv("FASTVIDEO_OFFLOAD_INJECT_FAULT");
  if (value == nullptr) {
    return faults;
  }
  std::stringstream names(value);
  std::string name;
  while (std::getline(names, name, ',')) {
    if (name == "skip_ready_wait") {
      faults.skip_ready_wait = true;
    } else if (name == "skip_release_wait") {
      faults.skip_release_wait = true;
    } else if (name == "free_unsynchronized") {
      faults.free_unsynchronized = true;
    } else if (name == "reuse_staging_early") {
      faults.reuse_staging_early = true;
    } else if (!name.empty()) {
      TORCH_CHECK_VALUE(false, "FASTVIDEO_OFFLOAD_INJECT_FAULT: unknown fault '", name,
                        "' (skip_ready_wait, skip_release_wait, free_unsynchronized, reuse_staging_early)");
    }
  }
  return faults;
}

}  // namespace fastvideo_offload
