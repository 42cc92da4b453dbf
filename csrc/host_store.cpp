// Host side of the store: a block's tensors packed into one exact-size buffer.
#include "host_store.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>

#include "ops.h"
#ifdef FVO_WITH_CUDA
#include "cuda/pinned.h"
#endif

namespace fastvideo_offload {
namespace {

constexpr int64_t kPageBytes = 4096;
// Alignment beyond a huge page buys nothing, and bounds align_up away from overflow.
constexpr int64_t kMaxAlignment = int64_t{1} << 30;
// Pieces this large keep every thread busy without splitting small tensors.
constexpr int64_t kCopyChunkBytes = int64_t{4} << 20;

int64_t align_up(int64_t value, int64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

}  // namespace

void parallel_memcpy(void* dst, const void* src, int64_t nbytes) {
  if (nbytes <= 0) {
    return;  // an empty tensor's pointer may be null, which memcpy must never see
  }
  if (nbytes <= kCopyChunkBytes) {
    // Waking the thread pool costs more than copying a few MiB.
    std::memcpy(dst, src, static_cast<size_t>(nbytes));
    return;
  }
  const int64_t chunks = (nbytes + kCopyChunkBytes - 1) / kCopyChunkBytes;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t off = k * kCopyChunkBytes;
      std::memcpy(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off,
                  static_cast<size_t>(std::min(kCopyChunkBytes, nbytes - off)));
    }
  });
}

int64_t span_bytes(const at::Tensor& t) {
  if (t.numel() == 0) {
    return 0;
  }
  // torch refuses a tensor whose storage an int64 cannot count, so this sum cannot overflow.
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  return (last + 1) * static_cast<int64_t>(t.element_size());
}

at::Tensor alloc_host(int64_t nbytes, bool pinned, std::optional<c10::Device> device) {
  TORCH_CHECK_VALUE(nbytes >= 0, "host buffer size must be >= 0, got ", nbytes);
  TORCH_CHECK_VALUE(!pinned || !device.has_value() || device->is_cuda(),
                    "pinned host memory is for a CUDA device, got ", *device);
  const auto options = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
  if (nbytes == 0) {
    return at::empty({0}, options);
  }
  if (pinned) {
#ifdef FVO_WITH_CUDA
    const c10::DeviceIndex index = device.has_value() && device->has_index() ? device->index() : -1;
    c10::DeviceIndex used = -1;
    void* ptr = cuda::pinned_alloc(static_cast<size_t>(nbytes), index, &used);
    return at::from_blob(ptr, {nbytes}, [used](void* p) { cuda::pinned_free(p, used); }, options);
#else
    TORCH_CHECK(false,
                "pinned host memory needs the CUDA build of fastvideo_offload; this one was built "
                "without CUDA (reinstall with a CUDA build of torch and nvcc on PATH)");
#endif
  }
  void* ptr = nullptr;
  const int rc = posix_memalign(&ptr, kPageBytes, static_cast<size_t>(nbytes));
  TORCH_CHECK(rc == 0 && ptr != nullptr, "could not allocate ", nbytes, " bytes of host memory");
  return at::from_blob(ptr, {nbytes}, [](void* p) { std::free(p); }, options);
}

namespace {

void check_pinnable(const at::Tensor& memory, const char* op) {
  TORCH_CHECK_VALUE(memory.defined() && memory.device().is_cpu() && memory.is_contiguous(), op,
                    ": expected a contiguous CPU tensor");
#ifndef FVO_WITH_CUDA
  TORCH_CHECK(memory.nbytes() == 0,
              "pinned host memory needs the CUDA build of fastvideo_offload; this one was "
              "built without CUDA");
#endif
}

}  // namespace

void pin_host(const at::Tensor& memory, c10::Device device, bool read_only) {
  TORCH_CHECK_VALUE(device.is_cuda(), "pin_host: pinned host memory is for a CUDA device, got ", device);
  check_pinnable(memory, "pin_host");
  if (memory.nbytes() == 0) {
    return;  // the runtime refuses an empty range; there is nothing to pin
  }
#ifdef FVO_WITH_CUDA
  cuda::host_register(memory.data_ptr(), memory.nbytes(), device.has_index() ? device.index() : -1, read_only);
#endif
}

void unpin_host(const at::Tensor& memory, c10::Device device) {
  TORCH_CHECK_VALUE(device.is_cuda(), "unpin_host: pinned host memory is for a CUDA device, got ", device);
  check_pinnable(memory, "unpin_host");
#ifdef FVO_WITH_CUDA
  if (memory.nbytes() > 0) {
    cuda::host_unregister(memory.data_ptr(), device.has_index() ? device.index() : -1);
  }
#endif
}

void check_layout(at::TensorList tensors, at::IntArrayRef offsets, int64_t nbytes, const char* op) {
  TORCH_CHECK_VALUE(tensors.size() == offsets.size(), op, ": got ", tensors.size(), " tensors but ", offsets.size(),
                    " offsets");
  TORCH_CHECK_VALUE(nbytes >= 0, op, ": buffer size must be >= 0, got ", nbytes);
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].defined(), op, ": tensor ", i, " is undefined");
    const int64_t off = offsets[i];
    TORCH_CHECK_VALUE(off >= 0 && off % kMinAlignment == 0, op, ": offset ", i, " (", off,
                      ") must be a non-negative multiple of ", kMinAlignment);
    const int64_t span = span_bytes(tensors[i]);
    TORCH_CHECK_VALUE(off <= nbytes && span <= nbytes - off, op, ": tensor ", i, " (", span, " bytes at offset ", off,
                      ") does not fit in a buffer of ", nbytes, " bytes");
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return offsets[a] < offsets[b]; });
  for (size_t k = 1; k < order.size(); ++k) {
    const size_t prev = order[k - 1];
    const size_t cur = order[k];
    TORCH_CHECK_VALUE(offsets[prev] + span_bytes(tensors[prev]) <= offsets[cur], op, ": tensors ", prev, " and ", cur,
                      " overlap (offsets ", offsets[prev], " and ", offsets[cur], ")");
  }
}

void zero_padding(const at::Tensor& buffer, at::TensorList tensors, at::IntArrayRef offsets) {
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (size_t i = 0; i < tensors.size(); ++i) {
    spans.emplace_back(offsets[i], offsets[i] + span_bytes(tensors[i]));
  }
  std::sort(spans.begin(), spans.end());
  spans.emplace_back(buffer.numel(), buffer.numel());
  auto* base = static_cast<char*>(buffer.data_ptr());
  int64_t covered = 0;
  for (const auto& [begin, end] : spans) {
    if (begin > covered) {
      std::memset(base + covered, 0, static_cast<size_t>(begin - covered));
    }
    covered = std::max(covered, end);
  }
}

std::vector<int64_t> layout(at::TensorList tensors, int64_t alignment) {
  TORCH_CHECK_VALUE(alignment >= kMinAlignment && alignment <= kMaxAlignment && (alignment & (alignment - 1)) == 0,
                    "layout: alignment must be a power of two in [", kMinAlignment, ", ", kMaxAlignment, "], got ",
                    alignment);
  std::vector<int64_t> result;
  result.reserve(tensors.size() + 1);
  int64_t end = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].defined(), "layout: tensor ", i, " is undefined");
    TORCH_CHECK_VALUE(end <= std::numeric_limits<int64_t>::max() - alignment,
                      "layout: the tensors span more bytes than an int64 counts");
    const int64_t off = align_up(end, alignment);
    result.push_back(off);
    TORCH_CHECK_VALUE(!__builtin_add_overflow(off, span_bytes(tensors[i]), &end),
                      "layout: the tensors span more bytes than an int64 counts");
  }
  result.push_back(end);
  return result;
}

at::Tensor pack_cpu(at::TensorList tensors, at::IntArrayRef offsets, int64_t nbytes, bool pinned,
                    std::optional<c10::Device> device) {
  check_layout(tensors, offsets, nbytes, "pack");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].device().is_cpu(), "pack: tensor ", i, " is on ", tensors[i].device(),
                      "; all tensors of one block must be on the same device");
  }
  at::Tensor buffer = alloc_host(nbytes, pinned, device);
  zero_padding(buffer, tensors, offsets);
  auto* base = static_cast<char*>(buffer.data_ptr());
  for (size_t i = 0; i < tensors.size(); ++i) {
    parallel_memcpy(base + offsets[i], tensors[i].const_data_ptr(), span_bytes(tensors[i]));
  }
  return buffer;
}

}  // namespace fastvideo_offload
