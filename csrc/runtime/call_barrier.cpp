#include "runtime/call_barrier.h"

#include <exception>
#include <memory>
#include <thread>

#include "common/error.h"
#include "common/spin_wait.h"

namespace mdtrt {

void CallBarrier::arrive(bool ready) {
  if (!ready) all_ready_.store(false, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    arrived_.fetch_add(1, std::memory_order_acq_rel);
  }
  changed_.notify_all();
}

bool CallBarrier::wait(const Deadline& deadline, int rank, const std::string& what) {
  // The other ranks are running the same checks right now: a short spin usually ends the wait
  // without a sleep and a wake-up.
  const bool arrived = spin_until([this] { return arrived_.load(std::memory_order_acquire) >= count_; },
                                  std::min(deadline.at(), Deadline::Clock::now() + std::chrono::microseconds(50)));
  if (!arrived) {
    std::unique_lock<std::mutex> lock(mutex_);
    const bool all_arrived = changed_.wait_until(
        lock, deadline.at(), [&] { return aborted_ || arrived_.load(std::memory_order_acquire) >= count_; });
    if (aborted_) throw Error(ErrorKind::kGeneric, "the call was aborted while this rank waited for the others", rank, what);
    if (!all_arrived) {
      all_ready_.store(false, std::memory_order_release);  // a rank arriving late must not launch alone
      throw Error(ErrorKind::kTimeout, "waited past the deadline for the other ranks to check their arguments", rank,
                  what);
    }
  }
  return all_ready_.load(std::memory_order_acquire);
}

void CallBarrier::abort() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
    all_ready_.store(false, std::memory_order_release);
  }
  changed_.notify_all();
}

void run_checked_then_launched(RankRuntime& runtime, std::function<void(RankContext&)> check,
                               std::function<void(RankContext&)> launch, double timeout_seconds,
                               const std::string& what, const std::function<void()>& while_ranks_run) {
  // Shared with the tasks: a task that outlives the deadline must not touch the caller's stack.
  // The caller's while_ranks_run is one more arrival: no rank launches before it returned. What it
  // does (allocating torch tensors: cudaMalloc, or cudaFree when torch's cache is full) may wait for
  // every GPU joined to this one by peer access, which must not happen between one rank's NCCL
  // launch and another's: the first one's kernel would wait for the second, which could not be
  // launched (NVIDIA/nccl#744; torch holds a mutex around cudaFree for the same reason). Its time
  // overlaps the ranks' checks instead.
  auto barrier = std::make_shared<CallBarrier>(runtime.num_local_ranks() + (while_ranks_run ? 1 : 0));
  // On the deadline (or an interrupt) the runtime runs its abort hooks: release the ranks waiting here.
  const int hook = runtime.add_abort_hook([barrier] { barrier->abort(); });
  struct RemoveHook {
    RankRuntime& runtime;
    int hook;
    ~RemoveHook() { runtime.remove_abort_hook(hook); }
  } remove_hook{runtime, hook};
  std::function<void()> callers_part;
  std::exception_ptr callers_error;
  if (while_ranks_run)
    callers_part = [&while_ranks_run, &barrier, &callers_error] {
      // Caught here (run_on_all would drop it): a caller interrupted in its own work (Ctrl-C in a
      // Python callback) wants out, and its ranks, all still before their launch, are let go
      // without one, as after a rank's failed check; the group stays usable.
      try {
        while_ranks_run();
      } catch (...) {
        callers_error = std::current_exception();
      }
      barrier->arrive(!callers_error);
    };
  // Everything by value (check and launch own their state the same way): a rank given up on at the
  // deadline still runs this after the caller's frame is gone (see run_on_all).
  runtime.run_on_all(
      [barrier, check = std::move(check), launch = std::move(launch), what](RankContext& ctx) {
        try {
          check(ctx);
        } catch (...) {
          barrier->arrive(false);
          throw;
        }
        barrier->arrive(true);
        if (!barrier->wait(ctx.deadline, ctx.rank, what)) return;  // another rank failed its checks
        launch(ctx);
      },
      timeout_seconds, what, /*sequential=*/false, callers_part);
  if (callers_error) std::rethrow_exception(callers_error);
}

}  // namespace mdtrt
