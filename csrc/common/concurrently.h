// Running a few independent teardown steps at once.
#pragma once

#include <functional>
#include <system_error>
#include <thread>
#include <vector>

namespace mdtrt {

// Runs every step, each on a thread of its own (the first on the calling thread), and returns once
// all are done. For steps that block for a while each and do not depend on one another, such as
// aborting several NCCL communicators (ncclCommAbort: a call that passed its deadline on 2x H200
// raised ~2 s after it with four communicators aborted one after another). Steps must not throw.
// Where no thread can be started, the step runs on the calling thread.
inline void run_concurrently(const std::vector<std::function<void()>>& steps) {
  std::vector<std::thread> threads;
  for (size_t i = 1; i < steps.size(); ++i) {
    try {
      threads.emplace_back(steps[i]);
    } catch (const std::system_error&) {
      steps[i]();
    }
  }
  if (!steps.empty()) steps[0]();
  for (auto& t : threads) t.join();
}

}  // namespace mdtrt
