// PYMETA_MULTIVERSION: build a function for AVX-512, AVX2+FMA and baseline x86-64 and pick one
// at load time (GCC target_clones), so vectorized loops run fast and the library loads anywhere.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYMETA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYMETA_MULTIVERSION
#endif
