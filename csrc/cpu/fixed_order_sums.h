// Per-chunk partial sums spread over torch's threads and added in chunk order, so a reduction's
// result does not depend on the thread count (the fused CPU kernels' per-channel sums).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace pymeta {

// `width` sums over `chunks` chunks: chunk_sums(k, acc) adds chunk k's into acc (width zeros).
template <typename F>
std::vector<double> fixed_order_sums(int64_t chunks, int64_t width, const F& chunk_sums) {
  std::vector<double> partial(chunks * width, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) chunk_sums(k, partial.data() + k * width);
  });
  std::vector<double> total(width, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t j = 0; j < width; ++j) total[j] += partial[k * width + j];
  }
  return total;
}

}  // namespace pymeta
