#include "runtime/rank_runtime.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "common/error.h"
#include "common/interrupt.h"
#include "common/spin_wait.h"

namespace mdtrt {
namespace {
constexpr double kGraceAfterAbortSeconds = 10.0;
// Spinning saves a thread wake-up per rank per call, but only pays when every rank thread and the
// caller have a core of their own, with as many left for the driver's and NCCL's threads and the
// rest of the process; on smaller machines it would steal the cores doing the work.
bool spin_by_default(int local_ranks) {
  return static_cast<int>(std::thread::hardware_concurrency()) >= 2 * (local_ranks + 1);
}
// An idle rank thread spins this long by default (MDTRT_RANK_SPIN_US): a call that follows one of up
// to about 2 ms (`call; synchronize` at tens to hundreds of MiB) then finds its rank threads awake.
// Woken from a sleep instead, each call's launch came 10-20 us later (2x H200 in a VM, per call at
// 64 MiB: reduce 265.6 -> 253.9 us, gather 166.2 -> 151.0 us, device-input replication 239.0 ->
// 219.8 us with 200 -> 2000 us of spin; 20000 us gained nothing more). Past 2 ms a wake-up costs
// under 1% of the call. The price: a core per rank thread stays busy for 2 ms after each call.
constexpr int kDefaultWorkerSpinMicros = 2000;
constexpr int kCallerSpinMicros = 2000;  // how long the caller looks for completion (when spinning)
// After its spin, an idle rank thread waits in slices of a poll interval (a new task wakes it at
// once all the same) for kWorkerReady before it sleeps until woken: a thread asleep for long lets
// its core drop into a deep idle state, which delayed the next call's launch (one H200, 1 GiB
// all_reduce per synchronize: p90 726-765 us without, 540-544 us with 100 us slices). The
// periodic wake-ups keep the core's idle state shallow, for about 1% of a core per rank thread.
constexpr auto kWorkerReady = std::chrono::milliseconds(100);
constexpr int kMaxEnvMicros = 100000;

// A whole number of microseconds from the environment variable `name` (0 to kMaxEnvMicros), else
// `fallback`; `zero_means` says what 0 does, for the error.
int micros_from_env(const char* name, int fallback, const char* zero_means) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long value = std::strtol(env, &end, 10);
  // Digits only (strtol would take leading blanks and a sign), as MDTRT_STREAM_PRIORITY takes its words only.
  if (env[0] < '0' || env[0] > '9' || *end != '\0' || value < 0 || value > kMaxEnvMicros)
    throw_invalid_argument(std::string(name) + " must be a whole number of microseconds from 0 to " +
                           std::to_string(kMaxEnvMicros) + " (0: " + zero_means + "), not '" + env +
                           "'; unset it for the default");
  return static_cast<int>(value);
}
// Whether rank streams run at the device's greatest priority: MDTRT_STREAM_PRIORITY=high or
// normal (default normal). A collective on a high-priority stream gets its thread blocks
// scheduled ahead of the pending blocks of kernels on normal streams, so that it runs beside
// a long compute kernel instead of after it.
bool high_priority_streams() {
  const char* env = std::getenv("MDTRT_STREAM_PRIORITY");
  if (env == nullptr || *env == '\0') return false;
  const std::string value = env;
  if (value == "high") return true;
  if (value == "normal") return false;
  throw_invalid_argument("MDTRT_STREAM_PRIORITY must be 'high' or 'normal', not '" + value +
                         "'; unset it for the default");
}
// How often the watchdog looks at stream-ordered work: a deadline is acted on at most this late.
constexpr auto kWatchdogIdlePoll = std::chrono::milliseconds(50);
constexpr auto kWatchdogBusyPoll = std::chrono::milliseconds(5);

std::string join_ranks(const std::vector<int>& ranks) {
  std::string s;
  for (int r : ranks) s += (s.empty() ? "" : ", ") + std::to_string(r);
  return s;
}
}  // namespace

RankRuntimeSettings rank_runtime_settings(int local_ranks) {
  // How long an idle rank thread looks for new work (MDTRT_RANK_SPIN_US), and its poll interval
  // after that (MDTRT_RANK_POLL_US).
  const bool spin = spin_by_default(local_ranks);
  return RankRuntimeSettings{micros_from_env("MDTRT_RANK_SPIN_US", spin ? kDefaultWorkerSpinMicros : 0, "no spinning"),
                             micros_from_env("MDTRT_RANK_POLL_US", spin ? 100 : 0,
                                             "idle rank threads sleep until woken"),
                             high_priority_streams(), spin ? kCallerSpinMicros : 0};
}

RankWorker::RankWorker(int local_index, int device, const RankRuntimeSettings& settings)
    : local_index_(local_index), device_(device), spin_micros_(settings.spin_micros),
      poll_micros_(settings.poll_micros), high_priority_(settings.high_priority_streams) {
  auto started = started_.get_future();
  thread_ = std::thread([this] { loop(); });
  started.get();  // rethrows a failure to bind the device or create the stream
}

RankWorker::~RankWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void RankWorker::abandon() {
  // The stuck thread still references this object, which the owner therefore never destroys.
  if (thread_.joinable()) thread_.detach();
}

void RankWorker::post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    tasks_.push_back(std::move(task));
    pending_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_one();
}

void RankWorker::loop() {
  try {
    if (device_ >= 0) {
      MDTRT_CUDA_CHECK(cudaSetDevice(device_));
      int priority = 0;
      if (high_priority_) {
        int least = 0;
        MDTRT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &priority));
      }
      stream_ = CudaStream(device_, priority);
    }
    started_.set_value();
  } catch (...) {
    started_.set_exception(std::current_exception());
    return;
  }
  for (;;) {
    // Back-to-back calls post the next task within microseconds: spin a little before sleeping,
    // so that a call does not pay a thread wake-up per rank.
    if (spin_micros_ > 0)
      spin_until([this] { return pending_.load(std::memory_order_acquire) != 0 || stopping_.load(); },
                 Deadline::Clock::now() + std::chrono::microseconds(spin_micros_));
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (poll_micros_ > 0) {
        const auto ready_until = Deadline::Clock::now() + kWorkerReady;
        while (!stopping_ && tasks_.empty() && Deadline::Clock::now() < ready_until)
          wake_.wait_for(lock, std::chrono::microseconds(poll_micros_));
      }
      wake_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping with nothing left to do
      task = std::move(tasks_.front());
      tasks_.pop_front();
      pending_.fetch_sub(1, std::memory_order_relaxed);
    }
    task();
  }
}

namespace {
// Completion of one run_on_all call, shared with the tasks (a task that outlives a deadline must
// not touch the caller's stack).
struct Completion {
  explicit Completion(size_t n) : finished(new std::atomic<bool>[n]), errors(n) {
    for (size_t i = 0; i < n; ++i) finished[i] = false;
  }
  void finish(size_t i, std::exception_ptr error) {
    errors[i] = std::move(error);
    finished[i].store(true, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mutex);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
    changed.notify_all();
  }
  enum class Wait { kDone, kDeadline, kInterrupted };
  // Spins briefly (a fast call finishes within microseconds), then sleeps until `count` tasks are
  // done or the deadline passes; an `interruptible` wait also asks interrupt_requested() every
  // kInterruptPollInterval (without the lock: the check may wait for Python's GIL).
  Wait wait_for(int count, Deadline::Clock::time_point deadline, int spin_micros, bool interruptible = true) {
    auto all_done = [&] { return done.load(std::memory_order_acquire) >= count; };
    if (spin_micros > 0)
      spin_until(all_done, std::min(deadline, Deadline::Clock::now() + std::chrono::microseconds(spin_micros)));
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      const auto now = Deadline::Clock::now();
      const auto until = interruptible && deadline - now > kInterruptPollInterval ? now + kInterruptPollInterval : deadline;
      if (changed.wait_until(lock, until, all_done)) return Wait::kDone;
      if (Deadline::Clock::now() >= deadline) return Wait::kDeadline;
      lock.unlock();
      const bool stop = interrupt_requested();
      lock.lock();
      if (stop) return all_done() ? Wait::kDone : Wait::kInterrupted;
    }
  }
  bool is_finished(size_t i) const { return finished[i].load(std::memory_order_acquire); }

  std::atomic<int> done{0};
  std::unique_ptr<std::atomic<bool>[]> finished;
  std::vector<std::exception_ptr> errors;
  std::mutex mutex;
  std::condition_variable changed;
};
}  // namespace

RankRuntime::RankRuntime(std::vector<int> devices, std::vector<int> ranks, int world_size)
    : devices_(std::move(devices)), ranks_(std::move(ranks)), world_size_(world_size),
      grace_after_abort_seconds_(kGraceAfterAbortSeconds) {
  if (devices_.empty()) throw_invalid_argument("a rank runtime needs at least one rank");
  if (ranks_.size() != devices_.size()) throw_invalid_argument("one world rank per local device is needed");
  const RankRuntimeSettings settings = rank_runtime_settings(static_cast<int>(devices_.size()));
  caller_spin_micros_ = settings.caller_spin_micros;
  for (size_t i = 0; i < devices_.size(); ++i) {
    workers_.emplace_back(
        new RankWorker(static_cast<int>(i), devices_[i], settings));
    auto ctx = std::make_shared<RankContext>();
    ctx->local_index = static_cast<int>(i);
    ctx->rank = ranks_[i];
    ctx->world_size = world_size_;
    ctx->device = devices_[i];
    ctx->stream = workers_.back()->stream();
    contexts_.push_back(std::move(ctx));
  }
  spare_events_.resize(devices_.size());
}

RankRuntime::~RankRuntime() {
  finish_in_flight();
  {
    std::lock_guard<std::mutex> lock(in_flight_mutex_);
    stopping_watchdog_ = true;
  }
  in_flight_changed_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  // A worker stuck in a task that ignored the abort is never joined (that would hang): it is
  // intentionally leaked with its thread. Every other worker is stopped and joined.
  for (size_t i = 0; i < stuck_.size() && i < workers_.size(); ++i) {
    if (stuck_[i]) {
      workers_[i]->abandon();
      workers_[i].release();
    }
  }
}

void RankRuntime::mark_unusable(const std::string& reason) {
  throw_if_calling_back("close");
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  set_broken(reason, ErrorKind::kGeneric, /*closing=*/true);
}

void RankRuntime::mark_broken(const std::string& reason) { set_broken(reason, ErrorKind::kGeneric); }

bool RankRuntime::broken() const {
  std::lock_guard<std::mutex> lock(state_mutex_);
  return !broken_reason_.empty();
}

std::string RankRuntime::broken_reason() const {
  std::lock_guard<std::mutex> lock(state_mutex_);
  return broken_reason_;
}

bool RankRuntime::broken_by_failure() const {
  std::lock_guard<std::mutex> lock(state_mutex_);
  return !broken_reason_.empty() && !broken_by_close_;
}

void RankRuntime::set_broken(const std::string& reason, ErrorKind kind, bool closing) {
  std::lock_guard<std::mutex> lock(state_mutex_);
  if (!broken_reason_.empty()) return;  // the first cause is the one to report
  broken_reason_ = reason;
  broken_kind_ = kind;
  broken_by_close_ = closing;
}

void RankRuntime::break_and_abort(const std::string& reason, ErrorKind kind) {
  set_broken(reason, kind);  // before the abort: no step may take work the abort ends early for finished
  abort_all();
}

void RankRuntime::throw_if_broken(const std::string& what) const {
  std::lock_guard<std::mutex> lock(state_mutex_);
  if (!broken_reason_.empty())
    throw Error(broken_kind_, "this device group can no longer be used: " + broken_reason_ + ". Create a new one.", -1,
                what);
}

CudaEvent RankRuntime::take_event(int local_index) {
  {
    std::lock_guard<std::mutex> lock(in_flight_mutex_);
    auto& spare = spare_events_.at(local_index);
    if (!spare.empty()) {
      CudaEvent e = std::move(spare.back());
      spare.pop_back();
      return e;
    }
  }
  return CudaEvent(devices_.at(local_index), false);
}

void RankRuntime::add_in_flight(std::vector<CudaEvent> done, double timeout_seconds, const std::string& what) {
  // The watchdog is not woken: it looks every kWatchdogIdlePoll when idle, soon enough for a
  // deadline (waking it would cost every call a thread wake-up and a race for the lock: in a loop
  // of `call; synchronize` every call finds it idle).
  std::lock_guard<std::mutex> lock(in_flight_mutex_);
  in_flight_.push_back(InFlight{std::move(done), Deadline::after_seconds(timeout_seconds), timeout_seconds, what});
  if (!watchdog_.joinable()) watchdog_ = std::thread([this] { watchdog_loop(); });
}

bool RankRuntime::retire_finished_locked() {
  // Each rank's events are recorded on its one stream in the order of in_flight_ (calls hold
  // lock_submission() from their step to add_in_flight): when the newest call is done on every
  // rank, so are all the others (one query per rank instead of one per call and rank, under the
  // lock the callers take too).
  if (in_flight_.size() > 1) {
    bool all_done = true;
    for (const CudaEvent& e : in_flight_.back().done) all_done = all_done && cudaEventQuery(e.get()) == cudaSuccess;
    if (all_done) {
      for (InFlight& call : in_flight_)
        for (size_t i = 0; i < call.done.size(); ++i) spare_events_[i].push_back(std::move(call.done[i]));
      in_flight_.clear();
      return true;
    }
  }
  while (!in_flight_.empty()) {
    InFlight& front = in_flight_.front();
    std::vector<int> unfinished;
    std::string cuda_error;
    for (size_t i = 0; i < front.done.size(); ++i) {
      const cudaError_t status = cudaEventQuery(front.done[i].get());
      if (status == cudaErrorNotReady) {
        unfinished.push_back(ranks_[i]);
      } else if (status != cudaSuccess && cuda_error.empty()) {
        cuda_error = std::string(cudaGetErrorName(status)) + " on rank " + std::to_string(ranks_[i]);
      }
    }
    if (!cuda_error.empty()) {
      // Aborted too: the other ranks' queued collectives would wait forever for the failed rank.
      break_and_abort("a stream-ordered '" + front.what + "' failed on the GPU (" + cuda_error +
                      "); the communicators were aborted and its outputs and those of later stream-ordered calls "
                      "are not valid", ErrorKind::kCuda);
      in_flight_.clear();  // a failed context completes nothing more: nothing is waited for any more
      return false;
    }
    if (!unfinished.empty()) {
      if (!front.deadline.passed()) return true;
      char seconds[32];
      std::snprintf(seconds, sizeof(seconds), "%g s", front.timeout_seconds);
      // Broken before the abort: a waiting call whose kernels the abort ends early must not take
      // its outputs for valid (run_on_all checks again when its ranks are done).
      set_broken("a stream-ordered '" + front.what + "' did not finish within " + seconds + " on rank(s) " +
                 join_ranks(unfinished) + "; the communicators were aborted (so no stream waits on it forever) and "
                 "its outputs and those of later stream-ordered calls are not valid. A rank that never arrives, a "
                 "hung collective, or a timeout too short for this work are the usual causes", ErrorKind::kTimeout);
      abort_all();
      in_flight_.clear();  // aborted: nothing of it is waited for any more
      return false;
    }
    for (size_t i = 0; i < front.done.size(); ++i) spare_events_[i].push_back(std::move(front.done[i]));
    in_flight_.pop_front();
  }
  return true;
}

void RankRuntime::watchdog_loop() {
  // A device of this runtime, so that querying and destroying events never creates GPU 0's context
  // in a process that does not use GPU 0 (one rank per process under a launcher).
  if (devices_[0] >= 0) cudaSetDevice(devices_[0]);
  // Relaxed: this thread's event queries must not invalidate a CUDA graph the application captures
  // meanwhile on another thread (torch's default capture mode is global).
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  std::unique_lock<std::mutex> lock(in_flight_mutex_);
  while (!stopping_watchdog_) {
    // Polls: CUDA events have no completion callback that could wake a thread without a stream.
    in_flight_changed_.wait_for(lock, in_flight_.empty() ? kWatchdogIdlePoll : kWatchdogBusyPoll);
    if (!in_flight_.empty()) retire_finished_locked();
  }
}

void RankRuntime::wait_in_flight(bool interruptible) {
  auto next_interrupt_check = Deadline::Clock::now();
  int sleep_us = 20;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(in_flight_mutex_);
      if (!retire_finished_locked() || in_flight_.empty()) return;  // failed, aborted, or all done
    }
    // Asked at most every kInterruptPollInterval: the check takes Python's GIL.
    if (interruptible && Deadline::Clock::now() >= next_interrupt_check) {
      if (interrupt_requested()) {
        set_broken("'synchronize' was interrupted and the communicators were aborted", ErrorKind::kGeneric);
        {
          std::lock_guard<std::mutex> lock(in_flight_mutex_);
          in_flight_.clear();
        }
        abort_all();
        throw Error(ErrorKind::kInterrupted,
                    "interrupted while waiting for stream-ordered calls; communicators were aborted and this device "
                    "group can no longer be used", -1, "synchronize");
      }
      next_interrupt_check = Deadline::Clock::now() + kInterruptPollInterval;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    if (sleep_us < 1000) sleep_us *= 2;
  }
}

void RankRuntime::synchronize() {
  wait_in_flight(/*interruptible=*/true);
  throw_if_broken("synchronize");
}

void RankRuntime::finish_in_flight() { wait_in_flight(/*interruptible=*/false); }

int RankRuntime::add_abort_hook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(hooks_mutex_);
  abort_hooks_.emplace_back(next_hook_id_, std::move(hook));
  return next_hook_id_++;
}

void RankRuntime::remove_abort_hook(int id) {
  std::lock_guard<std::mutex> lock(hooks_mutex_);
  abort_hooks_.erase(std::remove_if(abort_hooks_.begin(), abort_hooks_.end(),
                                    [id](const auto& h) { return h.first == id; }),
                     abort_hooks_.end());
}

void RankRuntime::abort_all() {
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard<std::mutex> lock(hooks_mutex_);
    for (auto& h : abort_hooks_) hooks.push_back(h.second);
  }
  for (auto& h : hooks) {
    try {
      h();
    } catch (...) {
      // An abort hook failing must not stop the others.
    }
  }
}

namespace {
// The runtimes whose run_on_all this thread is inside the while_ranks_run of, innermost first: a
// callback may run a call of another group whose own callback runs in turn (finalizers that garbage
// collection runs there), and this thread then holds the locks of every runtime on the chain.
struct CallingBack {
  const RankRuntime* runtime;
  const CallingBack* outer;
};
thread_local const CallingBack* calling_back = nullptr;
}  // namespace

void RankRuntime::throw_if_calling_back(const std::string& what) const {
  bool inside = false;
  for (const CallingBack* mark = calling_back; mark != nullptr && !inside; mark = mark->outer)
    inside = mark->runtime == this;
  if (inside)
    throw Error(ErrorKind::kInvalidArgument,
                "called from inside a call of this device group while its ranks run (its while_ranks_run: a "
                "finalizer that garbage collection ran there, say), on the thread that holds the group's locks: "
                "it would wait for itself forever",
                -1, what);
}

void RankRuntime::run_on_all(std::function<void(RankContext&)> fn, double timeout_seconds,
                             const std::string& what, bool sequential, const std::function<void()>& while_ranks_run) {
  throw_if_calling_back(what);
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  {
    // A stream-ordered call that passed its deadline is reported by the next step; one that
    // failed on a GPU, once the watchdog has seen it (within kWatchdogIdlePoll). Its events are not
    // queried here: that would cost every call about 1.3 us per rank, which the watchdog pays.
    std::lock_guard<std::mutex> lock(in_flight_mutex_);
    if (!in_flight_.empty() && in_flight_.front().deadline.passed()) retire_finished_locked();
  }
  throw_if_broken(what);
  const Deadline deadline = Deadline::after_seconds(timeout_seconds);
  const size_t n = workers_.size();
  auto completion = std::make_shared<Completion>(n);
  auto task_fn = std::make_shared<const std::function<void(RankContext&)>>(std::move(fn));
  std::vector<bool> posted(n, false);
  auto post = [&](size_t i) {
    // Not owned by the task: the context outlives it (the runtime's, or kept alive with the
    // worker when the task is given up on).
    RankContext* ctx = contexts_[i].get();
    ctx->deadline = deadline;
    workers_[i]->post([completion, task_fn, ctx, i]() mutable {
      std::exception_ptr error;
      try {
        (*task_fn)(*ctx);
      } catch (...) {
        error = std::current_exception();
      }
      // Let go of fn before reporting: the caller's reference is then the last, and what fn owns
      // is destroyed on the caller's thread, never on this one (where a destructor that waits on
      // the runtime would deadlock).
      task_fn.reset();
      completion->finish(i, error);
    });
    posted[i] = true;
  };
  // A rank may hit the deadline inside its own wait (a collective that never completes) and
  // report a timeout error itself: that counts as the group's timeout too.
  auto is_timeout = [](const std::exception_ptr& p) {
    if (!p) return false;
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      return e.kind() == ErrorKind::kTimeout;
    } catch (...) {
    }
    return false;
  };

  bool timed_out = false, interrupted = false;
  using Wait = Completion::Wait;
  if (sequential) {
    for (size_t i = 0; i < n; ++i) {
      post(i);
      const Wait w = completion->wait_for(static_cast<int>(i) + 1, deadline.at(), caller_spin_micros_);
      if (w != Wait::kDone) {
        (w == Wait::kInterrupted ? interrupted : timed_out) = true;
        break;
      }
      if (completion->errors[i]) break;  // later ranks would only fail on what it left
    }
  } else {
    for (size_t i = 0; i < n; ++i) post(i);
    if (while_ranks_run) {
      // Marked for throw_if_calling_back, on top of the marks of calls of other groups whose
      // callbacks this one runs in (they stay: their locks are held too); the mark goes however
      // the callback ends.
      struct Mark {
        explicit Mark(const RankRuntime* runtime) : entry{runtime, calling_back} { calling_back = &entry; }
        ~Mark() { calling_back = entry.outer; }
        CallingBack entry;
      } mark(this);
      try {
        while_ranks_run();
      } catch (...) {
        // The ranks are running: they are waited for whatever the caller's own work did.
      }
    }
    const Wait w = completion->wait_for(static_cast<int>(n), deadline.at(), caller_spin_micros_);
    interrupted = w == Wait::kInterrupted;
    timed_out = w == Wait::kDeadline;
  }
  std::vector<int> unfinished, never_started;
  for (size_t i = 0; i < n; ++i) {
    if (posted[i] && (!completion->is_finished(i) || is_timeout(completion->errors[i])))
      unfinished.push_back(ranks_[i]);
  }
  timed_out = !interrupted && (timed_out || !unfinished.empty());
  for (size_t i = 0; i < n && timed_out; ++i)
    if (!posted[i]) never_started.push_back(ranks_[i]);

  if (timed_out || interrupted) {
    char seconds[32];
    std::snprintf(seconds, sizeof(seconds), "%g s", timeout_seconds);
    // Broken before the abort: no other step may take the work the abort ends early for finished.
    set_broken(interrupted ? "'" + what + "' was interrupted and the communicators were aborted"
                           : "'" + what + "' passed its deadline of " + seconds + " on rank(s) " +
                                 join_ranks(unfinished) + " and the communicators were aborted",
               ErrorKind::kGeneric);
    abort_all();
    // Give the aborted ranks a moment to unwind so their threads can be reused or joined.
    const Deadline grace = Deadline::after_seconds(grace_after_abort_seconds_);
    bool stuck = false;
    stuck_.resize(n, false);
    int expected = 0;
    for (size_t i = 0; i < n; ++i) expected += posted[i] ? 1 : 0;
    completion->wait_for(expected, grace.at(), caller_spin_micros_, /*interruptible=*/false);
    for (size_t i = 0; i < n; ++i) {
      if (posted[i] && !completion->is_finished(i)) {
        // Given up on: its task may run fn on its context after this frame, the caller's and even
        // this runtime are gone. The worker, leaked with it, keeps both (so the last reference to
        // what fn owns is never dropped on the rank thread either).
        stuck = stuck_[i] = true;
        workers_[i]->keep_alive(task_fn);
        workers_[i]->keep_alive(contexts_[i]);
      }
    }
    if (stuck) any_abandoned_.store(true, std::memory_order_release);
    if (interrupted) {
      throw Error(ErrorKind::kInterrupted,
                  "interrupted while waiting for '" + what + "'; communicators were aborted and this device group "
                  "can no longer be used" + (stuck ? " (some rank threads are still stuck and were abandoned)" : ""),
                  -1, what);
    }
    std::string message = "rank(s) " + join_ranks(unfinished) + " did not finish '" + what + "' within " + seconds +
                          (never_started.empty() ? "" : "; rank(s) " + join_ranks(never_started) + " never started it") +
                          (sequential ? " (ranks were run one after another: a collective step needs all ranks "
                                        "at once)"
                                      : "") +
                          "; communicators were aborted and this device group can no longer be used" +
                          (stuck ? " (some rank threads are still stuck and were abandoned)" : "") +
                          ". A rank that never arrives, a hung collective, or a timeout too short for this work "
                          "are the usual causes.";
    throw Error(ErrorKind::kTimeout, message, -1, what);
  }

  // All finished: re-raise the first failure in rank order, attributed to its rank; a rank that only
  // stopped because another failed is reported last.
  for (bool skipped_too : {false, true}) {
    for (size_t i = 0; i < n; ++i) {
      if (!posted[i] || !completion->errors[i]) continue;
      try {
        std::rethrow_exception(completion->errors[i]);
      } catch (const SkippedForOtherRank& e) {
        if (skipped_too) throw e.with_rank(ranks_[i]);
      } catch (const Error& e) {
        throw e.with_rank(ranks_[i]);
      } catch (const std::exception& e) {
        throw Error(ErrorKind::kGeneric, e.what(), ranks_[i], what);
      }
    }
  }
  // Every rank finished, but the group broke meanwhile (the watchdog aborted a stream-ordered call
  // that this step's work was queued behind, or DeviceGroup.abort()): the abort may have ended this
  // step's kernels early, so its results are not valid.
  throw_if_broken(what);
}

}  // namespace mdtrt
