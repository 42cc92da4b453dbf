#include "schedule.h"

#include <algorithm>

namespace fastvideo_offload {

void Schedule::add_block() {
  const auto index = static_cast<int64_t>(next_.size());
  if (index > 0) {
    next_.back() = index;
  }
  next_.push_back(0);
  prev_.push_back(index > 0 ? index - 1 : 0);
  prev_[0] = index;
}

void Schedule::entered(int64_t block) {
  if (last_entered_ >= 0 && last_entered_ != block) {
    next_[last_entered_] = block;
    prev_[block] = last_entered_;
  }
  last_entered_ = block;
  if (starting_) {
    first_entered_ = block;
    starting_ = false;
  }
}

std::vector<int64_t> Schedule::order() const {
  const auto n = static_cast<int64_t>(next_.size());
  std::vector<bool> seen(next_.size(), false);
  std::vector<int64_t> out;
  for (int64_t b = first_entered_ >= 0 ? first_entered_ : 0; b >= 0 && b < n && !seen[b]; b = next_[b]) {
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

int64_t Schedule::step(int64_t block, Direction direction) const {
  const int64_t first = first_entered_ >= 0 ? first_entered_ : 0;
  switch (direction) {
    case Direction::Forward:
      return next_[block];
    case Direction::ForwardToEnd:
      return next_[block] == first ? -1 : next_[block];
    case Direction::Backward:
      return block == first ? -1 : prev_[block];
  }
  return -1;
}

std::vector<int64_t> Schedule::window(int64_t block, c10::function_ref<bool(int64_t)> skip, Direction direction) const {
  std::vector<int64_t> keep{block};
  int64_t b = block;
  for (size_t k = 0, steps = 0; k < static_cast<size_t>(prefetch_) && steps < next_.size(); ++steps) {
    b = step(b, direction);
    if (b < 0 || std::find(keep.begin(), keep.end(), b) != keep.end()) {
      break;
    }
    if (skip(b)) {
      continue;
    }
    keep.push_back(b);
    ++k;
  }
  return keep;
}

std::vector<int64_t> Schedule::upcoming(int64_t block, size_t most, c10::function_ref<bool(int64_t)> wanted,
                                        Direction direction) const {
  std::vector<int64_t> out;
  int64_t b = block;
  for (size_t steps = 0; steps < next_.size() && out.size() < most; ++steps) {
    b = step(b, direction);
    if (b < 0 || b == block) {
      break;
    }
    if (wanted(b)) {
      out.push_back(b);
    }
  }
  return out;
}

}  // namespace fastvideo_offload
