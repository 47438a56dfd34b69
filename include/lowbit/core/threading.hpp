// Threading: OpenMP when the build has it, serial otherwise. Work is always split by
// index, never by arrival, so results are identical for any thread count.
#pragma once

#include "lowbit/core/types.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lowbit {

// Threads lowbit's parallel loops use (OpenMP's setting; 1 without OpenMP).
[[nodiscard]] inline int num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Sets the thread count for lowbit's (and the process's) OpenMP loops.
inline void set_num_threads(int threads) {
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

namespace detail {

// Calls body(i) for i in [0, count), statically partitioned across threads.
// Loops below `min_parallel` iterations stay on the calling thread.
template <class Body>
void parallel_for(Index count, Body&& body, Index min_parallel = 2) {
#if defined(_OPENMP)
  if (count >= min_parallel && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < count; ++i) body(i);
    return;
  }
#else
  (void)min_parallel;
#endif
  for (Index i = 0; i < count; ++i) body(i);
}

}  // namespace detail
}  // namespace lowbit
