// Process-wide settings of the compiled core, set from Python through pymeta._C.
#pragma once

#include <atomic>
#include <cstdint>

namespace pymeta {

// Most bytes of activations one thread keeps from the inner loop for the reverse sweep of the
// model-aware core; above it the sweep recomputes them (less memory, more arithmetic).
inline std::atomic<int64_t>& activation_cache_limit() {
  static std::atomic<int64_t> limit{int64_t{64} << 20};
  return limit;
}

}  // namespace pymeta
