// One worker thread per local rank, each bound to its GPU once, with its own non-blocking stream.
// run_on_all() runs a function on every rank concurrently and waits with a deadline: the first
// failure is re-raised with its rank; on the deadline the registered abort hooks run (they abort
// communicators, unblock programs) and the error names the ranks that did not finish. A rank still
// inside its task after a grace is given up on and left running: its task owns (shared) all it
// touches, so nothing is freed under it (see run_on_all).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/deadline.h"
#include "common/error.h"
#include "runtime/cuda_handles.h"
#include "runtime/rank_program.h"

namespace mdtrt {

// The rank threads' settings, as a group created now would take them from the environment
// (MDTRT_RANK_SPIN_US, MDTRT_RANK_POLL_US, MDTRT_STREAM_PRIORITY). Throws InvalidArgumentError, naming the variable,
// for a value a group would refuse.
// The spin defaults depend on local_ranks, the group's rank threads in this process: on (2 ms) only
// when the host has at least 2 x (local_ranks + 1) hardware threads.
struct RankRuntimeSettings {
  int spin_micros;   // how long an idle rank thread spins before it waits (default 0 on small machines)
  int poll_micros;   // the idle rank thread's wake-up interval for 0.1 s after a call (0: off)
  bool high_priority_streams;
  int caller_spin_micros;  // how long a caller spins for its ranks' completion before it sleeps
};
RankRuntimeSettings rank_runtime_settings(int local_ranks);

// Thrown by a rank that left its step undone because another rank of the same run failed first
// (running on would leave it waiting on that rank); run_on_all reports the other rank's error.
class SkippedForOtherRank : public Error {
 public:
  using Error::Error;
};

class RankWorker {
 public:
  // device < 0: a CPU-only worker (used by tests of the runtime on machines without GPUs).
  // Once idle, the thread spins for settings.spin_micros, then (poll_micros > 0) wakes every
  // poll_micros for a while before it sleeps until woken (keeps its core out of deep idle states
  // between calls); high_priority_streams: the rank's stream has the device's greatest priority.
  RankWorker(int local_index, int device, const RankRuntimeSettings& settings);
  ~RankWorker();
  RankWorker(const RankWorker&) = delete;
  RankWorker& operator=(const RankWorker&) = delete;

  // Queues a task; the worker runs tasks in order. Tasks report their own completion.
  void post(std::function<void()> task);
  cudaStream_t stream() const { return stream_.get(); }
  int device() const { return device_; }
  // Leaves the thread running forever (it is stuck in a task that ignored abort); used so that a
  // destructor never blocks on a thread that cannot finish.
  void abandon();
  // Keeps `state` alive as long as this worker: what a task given up on (stuck past the abort's
  // grace) still references. Its owner then leaks the worker, so the state is never destroyed,
  // neither under the task nor on its thread (a destructor there could wait on the runtime).
  void keep_alive(std::shared_ptr<const void> state) { kept_alive_.push_back(std::move(state)); }

 private:
  void loop();

  int local_index_;
  int device_;
  int spin_micros_;
  int poll_micros_;
  bool high_priority_;
  CudaStream stream_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_;
  std::atomic<int> pending_{0};  // lets the worker spin on new work without taking the lock
  std::atomic<bool> stopping_{false};  // atomic: the idle spin looks at it without the lock
  std::thread thread_;
  std::promise<void> started_;
  std::vector<std::shared_ptr<const void>> kept_alive_;  // only by the owner's thread (see keep_alive)
};

class RankRuntime {
 public:
  // devices[i] is local rank i's GPU (-1 for CPU-only); ranks[i] its rank in the world.
  RankRuntime(std::vector<int> devices, std::vector<int> ranks, int world_size);
  ~RankRuntime();

  int num_local_ranks() const { return static_cast<int>(workers_.size()); }
  RankContext& context(int local_index) { return *contexts_.at(local_index); }
  const std::vector<int>& devices() const { return devices_; }
  const std::vector<int>& ranks() const { return ranks_; }
  int world_size() const { return world_size_; }

  // Runs fn(context) on every local rank's thread; all at once, or one after another when
  // `sequential` (only for proving that collective set-up deadlocks without concurrency).
  // `what` names the step in errors ("bind", "infer").
  // A rank that ignores the abort past a grace is given up on and left running (abandoned(i)):
  // `fn` must therefore own (shared, by value) everything it touches, never reference the
  // caller's frame, which is gone by the time that rank returns. `fn` and the rank's context are
  // kept alive forever for it; on every other path `fn` is destroyed on the caller's thread.
  // `while_ranks_run` (not with `sequential`) runs on the caller's thread once every rank has its
  // task, before the caller waits for them: the caller's own work that need not wait for the ranks
  // (the next call's outputs, allocated while the ranks check this one). It must not throw (what
  // it throws is dropped) nor wait for the ranks.
  void run_on_all(std::function<void(RankContext&)> fn, double timeout_seconds, const std::string& what,
                  bool sequential = false, const std::function<void()>& while_ranks_run = {});
  // Throws (InvalidArgument, naming `what`) on the thread of a run_on_all of this runtime that is
  // inside its while_ranks_run, also from a call of another group run there (whose own callback
  // may run this): that thread holds this runtime's locks (and its runner's), so a step
  // of this group there (a Python finalizer that garbage collection runs inside the callback, say)
  // would wait for itself forever. Every entry point that takes them asks first.
  void throw_if_calling_back(const std::string& what) const;
  // Whether local rank i was given up on by a run_on_all that timed out (still inside its task):
  // the caller must not touch what that rank's task may still write.
  bool abandoned(int local_index) const {
    return static_cast<size_t>(local_index) < stuck_.size() && stuck_[local_index];
  }
  // Whether any rank was given up on (from any thread): what the caller lent that call (its arrays)
  // may still be read or written by that rank, and must never be freed.
  bool any_abandoned() const { return any_abandoned_.load(std::memory_order_acquire); }
  // Test-only: how long a timed-out run_on_all waits for aborted ranks before giving up on them.
  void set_abort_grace_for_testing(double seconds) { grace_after_abort_seconds_ = seconds; }

  // Hooks run (once each, from the waiting thread) when a deadline passes.
  int add_abort_hook(std::function<void()> hook);
  void remove_abort_hook(int id);

  // After a deadline the runtime is unusable: its communicators are aborted.
  bool broken() const;
  // Whether it broke while work of a step may have been running (a deadline, an interrupt, a
  // failure on a GPU, an abort), not only closed: mark_unusable waits for the step in flight and
  // refuses every later one before it starts, so a step refused for it queued nothing.
  bool broken_by_failure() const;
  // Makes every later run_on_all fail with `reason` (waits for a run in flight).
  void mark_unusable(const std::string& reason);
  // The same without waiting for a run in flight (from any thread: an abort while a call runs).
  void mark_broken(const std::string& reason);
  std::string broken_reason() const;

  // Stream-ordered calls return once their work is queued on every rank: each hands over one
  // event per local rank (recorded after its work on that rank's stream) with its deadline. A
  // watchdog thread aborts the communicators when one passes its deadline unfinished, so that the
  // caller streams waiting on it are released (as torch.distributed's watchdog does); the group
  // is unusable afterwards, and synchronize() and every later step say why.
  void add_in_flight(std::vector<CudaEvent> done, double timeout_seconds, const std::string& what);
  // Waits until every stream-ordered call queued so far has finished on every rank (each within
  // its own deadline; Ctrl-C aborts). Throws the timeout error of a call that passed its deadline.
  void synchronize();
  // The same without raising: waits (each call within its deadline) before communicators go.
  void finish_in_flight();
  // An event of local rank i's device for add_in_flight (recycled from finished calls).
  CudaEvent take_event(int local_index);
  // Throws, naming `what`, when the runtime is broken (Error of the kind that broke it).
  void throw_if_broken(const std::string& what) const;
  // Runs every abort hook now (communicators, programs); from any thread.
  void abort_all();
  // Marks the runtime broken with `reason` (unless it already is) and aborts every communicator:
  // for a rank whose GPU failed, which the other ranks' queued collectives would wait for forever.
  void break_and_abort(const std::string& reason, ErrorKind kind);
  // A stream-ordered call holds this from before its step until its events are handed over
  // (add_in_flight), so that in_flight_ lists calls in the order their events were recorded on
  // every rank stream, also with calls from several threads (retire_finished_locked relies on it).
  std::unique_lock<std::mutex> lock_submission() { return std::unique_lock<std::mutex>(submission_mutex_); }

 private:
  struct InFlight {
    std::vector<CudaEvent> done;
    Deadline deadline;
    double timeout_seconds;
    std::string what;
  };
  // Drops finished calls from the front of in_flight_ (returning their events to the pool); on a
  // passed deadline aborts, marks the runtime broken and returns false. Needs in_flight_mutex_.
  bool retire_finished_locked();
  void watchdog_loop();
  // Polls until every stream-ordered call queued so far finished or the runtime broke (a call
  // failed or passed its deadline); `interruptible`: Ctrl-C aborts (synchronize), else not (clean-up).
  void wait_in_flight(bool interruptible);
  // `closing`: by mark_unusable (broken_by_failure stays false when that is the first cause).
  void set_broken(const std::string& reason, ErrorKind kind, bool closing = false);

  std::vector<int> devices_;
  std::vector<int> ranks_;
  int world_size_;
  std::vector<std::unique_ptr<RankWorker>> workers_;
  // Shared: an abandoned rank's task keeps its context (kept alive by its leaked worker).
  std::vector<std::shared_ptr<RankContext>> contexts_;
  std::mutex hooks_mutex_;
  std::vector<std::pair<int, std::function<void()>>> abort_hooks_;
  int next_hook_id_ = 0;
  mutable std::mutex state_mutex_;  // guards broken_reason_ (the watchdog sets it too)
  std::string broken_reason_;
  ErrorKind broken_kind_ = ErrorKind::kGeneric;
  bool broken_by_close_ = false;
  std::mutex in_flight_mutex_;
  std::condition_variable in_flight_changed_;
  std::deque<InFlight> in_flight_;
  std::vector<std::vector<CudaEvent>> spare_events_;  // per local rank (sized in the constructor)
  std::thread watchdog_;
  bool stopping_watchdog_ = false;  // guarded by in_flight_mutex_
  std::vector<bool> stuck_;  // workers whose task ignored an abort: never joined
  std::atomic<bool> any_abandoned_{false};
  double grace_after_abort_seconds_;
  int caller_spin_micros_ = 0;  // from RankRuntimeSettings: the caller's spin for its ranks
  std::mutex run_mutex_;  // one run_on_all at a time: ranks must see steps in the same order
  std::mutex submission_mutex_;  // see lock_submission(); taken before run_mutex_
};

}  // namespace mdtrt
