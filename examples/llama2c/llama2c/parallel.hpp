// Work over independent sequences runs in parallel, one sequence per task: for a model
// this small that keeps both cores busy with far fewer synchronizations than
// parallelizing each small product. Inside a task, lowbit's kernels see they are already
// in a parallel region and stay serial.
#pragma once

#include <lowbit/core/threading.hpp>

#include <exception>
#include <vector>

namespace llama2c {

// Calls fn(i) for i in [0, count), in parallel. An exception thrown by any call is
// rethrown here after all calls finished (the first by index), never inside the
// parallel region.
template <class Fn>
void parallel_tasks(std::size_t count, Fn&& fn) {
  std::vector<std::exception_ptr> errors(count);
  lowbit::detail::parallel_for(static_cast<lowbit::Index>(count), [&](lowbit::Index i) {
    try {
      fn(static_cast<std::size_t>(i));
    } catch (...) {
      errors[static_cast<std::size_t>(i)] = std::current_exception();
    }
  });
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace llama2c
