// Launch geometry shared by the CUDA kernels: threads per block, and the grid of a grid-stride
// elementwise loop over n elements (capped: each thread then takes several elements).
#pragma once

#include <algorithm>
#include <cstdint>

namespace pymeta {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

}  // namespace pymeta
