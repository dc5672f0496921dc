// Waiting for another thread's store by spinning, for the hand-offs between a caller and its rank
// threads, which take microseconds: looking with the CPU's pause hint first, because a
// sched_yield per look (a system call, about 1 us in a VM) added its own length to every hand-off;
// then yielding, so that a thread that spins for long gives its core to others that need it.
#pragma once

#include <algorithm>
#include <chrono>
#include <thread>

#include "common/deadline.h"

namespace mdtrt {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Spins until ready() or `until`; returns ready(). Pauses for the first pause_micros, yields after.
template <typename Ready>
bool spin_until(Ready&& ready, Deadline::Clock::time_point until, int pause_micros = 50) {
  if (ready()) return true;
  const auto start = Deadline::Clock::now();
  const auto pause_until = std::min(until, start + std::chrono::microseconds(pause_micros));
  for (unsigned looks = 1;; ++looks) {
    // The clock is read every 16 looks: a pause is tens of nanoseconds, a clock read about as long.
    if (looks % 16 == 0) {
      const auto now = Deadline::Clock::now();
      if (now >= until) return ready();
      if (now >= pause_until) std::this_thread::yield();
    }
    cpu_relax();
    if (ready()) return true;
  }
}

}  // namespace mdtrt
