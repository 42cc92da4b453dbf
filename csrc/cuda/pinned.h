// Page-locked host memory from the CUDA runtime, at exactly the size asked for.
#pragma once

#include <cstddef>

namespace fastvideo_offload::cuda {

void* pinned_alloc(size_t nbytes);
void pinned_free(void* ptr);

}  // namespace fastvideo_offload::cuda
