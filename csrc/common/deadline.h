// Every blocking wait in mdtrt has a deadline; this is the one type for it.
#pragma once

#include <chrono>
#include <limits>

namespace mdtrt {

class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  static Deadline after_seconds(double seconds) {
    if (!(seconds < 1e9)) return Deadline(Clock::time_point::max());
    return Deadline(Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds)));
  }
  static Deadline never() { return Deadline(Clock::time_point::max()); }

  bool passed() const { return Clock::now() >= at_; }
  Clock::time_point at() const { return at_; }
  double remaining_seconds() const {
    if (at_ == Clock::time_point::max()) return std::numeric_limits<double>::infinity();
    return std::chrono::duration<double>(at_ - Clock::now()).count();
  }

 private:
  explicit Deadline(Clock::time_point at) : at_(at) {}
  Clock::time_point at_;
};

}  // namespace mdtrt
