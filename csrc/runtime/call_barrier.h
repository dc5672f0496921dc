// The rule every call on the ranks follows: every rank checks its arguments and allocates what it
// needs first; only when every rank got that far does any rank enqueue work. One rank failing
// (a wrong-size output buffer, out of memory, a bad per-rank input) then fails the call at once,
// with that rank's error, and leaves no other rank's NCCL kernel waiting for it until the
// deadline (which would leave the group unusable).
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>

#include "common/deadline.h"
#include "runtime/rank_runtime.h"

namespace mdtrt {

// A one-use barrier of `count` rank threads that also carries whether each was ready.
class CallBarrier {
 public:
  explicit CallBarrier(int count) : count_(count) {}
  // Records this rank's arrival; a rank that is not ready arrives and leaves (it raises its error).
  void arrive(bool ready);
  // After arrive(): returns once every rank arrived, true when every one was ready. Throws a
  // timeout error when the deadline passes first (a rank stuck in its checks).
  bool wait(const Deadline& deadline, int rank, const std::string& what);
  // Releases the waiting ranks with an error (the call is being aborted: deadline, Ctrl-C).
  void abort();

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<bool> all_ready_{true};
  bool aborted_ = false;  // guarded by mutex_
  std::mutex mutex_;
  std::condition_variable changed_;
};

// Runs `check` on every rank, then, only when every rank's check succeeded, `launch` on every
// rank (in the same task: no second hand-off to the rank threads). A rank whose check fails
// raises its error; the others return without launching anything. Like run_on_all's fn, check
// and launch must own (by value, shared) everything they touch: a rank given up on at the deadline
// runs them on after the caller returned. `while_ranks_run`: as RankRuntime::run_on_all's, run
// while the ranks check; no rank launches before it returned (allocations there may synchronize
// the GPUs, which must not come between two ranks' NCCL launches: see the .cpp). When it throws
// (the caller was interrupted there: Ctrl-C in a Python callback), no rank launches either, and
// what it threw is thrown once every rank returned, unless a rank's own error comes first.
void run_checked_then_launched(RankRuntime& runtime, std::function<void(RankContext&)> check,
                               std::function<void(RankContext&)> launch, double timeout_seconds,
                               const std::string& what, const std::function<void()>& while_ranks_run = {});

}  // namespace mdtrt
