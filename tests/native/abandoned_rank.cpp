// The abandoned-rank scenario of tests/test_rank_runtime.py without Python, for a build under
// AddressSanitizer (tests/test_sanitized_runtime.py): a rank whose task ignores the abort past the
// grace returns after its caller and runtime are gone, into state it must own: in a call's launch,
// and in a bind of a program only the caller held. Exit status 0 when both late tasks returned and
// found their state and rank context intact.
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "testing/test_programs.h"

int main() {
  int expected = 0;
  for (const char* step : {"launch", "bind"}) {
    // 3 CPU-only ranks; rank 0 sleeps 1 s in its task; deadline 0.2 s; grace 0.1 s.
    const std::string error = mdtrt::run_abandoned_rank_test(3, 0, 1.0, 0.2, 0.1, step);
    std::printf("%s error: %s\n", step, error.c_str());
    ++expected;
    // Further runtimes and calls meanwhile reuse the memory a use-after-free would touch.
    for (int k = 0; k < 300 && mdtrt::abandoned_rank_report().first < expected; ++k) {
      const auto call = mdtrt::run_checked_launch_test(3, -1, 0.0, 10.0);
      if (!call.second.empty()) std::printf("a later call failed: %s\n", call.second.c_str());
      std::vector<char> churn(1 << 16, static_cast<char>(k));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  const auto report = mdtrt::abandoned_rank_report();
  std::printf("late tasks: %d intact: %d\n", report.first, report.second);
  return report.first == expected && report.second == expected ? 0 : 1;
}
