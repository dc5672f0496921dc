// Test programs and benchmark probes, built into their own target (mdtrt_testing, linked only
// into the Python module's _core.testing), never into the shipped core.
//
// Programs that exercise the rank runtime without GPUs or NCCL, for tests on any machine:
// a bind that is a CPU barrier across ranks (collective like setCommunicator: deadlocks when ranks
// are bound one after another) and a bind that fails on one rank.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "runtime/cuda_handles.h"
#include "runtime/rank_program.h"
#include "runtime/rank_runtime.h"

namespace mdtrt {

class NoIoProgram : public RankProgram {
 public:
  std::vector<TensorSpec> input_specs(const RankContext&) const override { return {}; }
  std::vector<TensorSpec> resolve_outputs(RankContext&, const std::vector<TensorView>&) override { return {}; }
  void enqueue(RankContext&, const std::vector<TensorView>&, const std::vector<TensorView>&) override {}
};

class BarrierBindProgram : public NoIoProgram {
 public:
  explicit BarrierBindProgram(int num_ranks) : num_ranks_(num_ranks) {}
  std::string describe() const override { return "barrier bind test program"; }
  void bind(RankContext& ctx) override;
  void abort() override;
  int arrived() const;

 private:
  int num_ranks_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  int arrived_ = 0;
  bool aborted_ = false;
};

class FailingBindProgram : public NoIoProgram {
 public:
  FailingBindProgram(int fail_rank, std::string message) : fail_rank_(fail_rank), message_(std::move(message)) {}
  std::string describe() const override { return "failing bind test program"; }
  void bind(RankContext& ctx) override;

 private:
  int fail_rank_;
  std::string message_;
};

// One input, one output of the same shape: a device-to-device copy. The trivial program used to
// measure the runner's own overhead per call.
class CopyProgram : public RankProgram {
 public:
  explicit CopyProgram(DType dtype) : dtype_(dtype) {}
  std::string describe() const override { return "copy test program"; }
  void bind(RankContext&) override {}
  std::vector<TensorSpec> input_specs(const RankContext&) const override { return {{"input", dtype_, {-1}}}; }
  std::vector<TensorSpec> resolve_outputs(RankContext&, const std::vector<TensorView>& inputs) override;
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;

 protected:
  DType dtype_;
};

// Two inputs ("a", "b"), two outputs listed "b_copy" then "a_copy", each a copy of its input (any
// shapes): the path of engines with several inputs and outputs (EngineRunner's fast path).
class PairCopyProgram : public RankProgram {
 public:
  explicit PairCopyProgram(DType dtype) : dtype_(dtype) {}
  std::string describe() const override { return "pair copy test program"; }
  void bind(RankContext&) override {}
  std::vector<TensorSpec> input_specs(const RankContext&) const override {
    return {{"a", dtype_, {-1}}, {"b", dtype_, {-1}}};
  }
  std::vector<TensorSpec> resolve_outputs(RankContext&, const std::vector<TensorView>& inputs) override;
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;

 private:
  DType dtype_;
};

// One input, a one-element output, no work: what remains is getting the input onto every GPU.
class SinkProgram : public CopyProgram {
 public:
  using CopyProgram::CopyProgram;
  std::string describe() const override { return "sink test program"; }
  std::vector<TensorSpec> resolve_outputs(RankContext& ctx, const std::vector<TensorView>& inputs) override;
  void enqueue(RankContext&, const std::vector<TensorView>&, const std::vector<TensorView>&) override {}
};

// A copy that waits for itself on the host: legal on its own, forbidden inside a CUDA graph capture
// (what a program that synchronizes looks like to cuda_graph=True).
class SynchronizingCopyProgram : public CopyProgram {
 public:
  using CopyProgram::CopyProgram;
  std::string describe() const override { return "synchronizing copy test program"; }
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;
};

// A float32 sum all_reduce over the world communicator that, on world rank `sync_rank` only, also
// waits for its stream on the host: capturable on every rank but that one (a CUDA graph capture
// that fails on one rank while the others capture collectives waiting for it).
class RankSynchronizingAllReduceProgram : public CopyProgram {
 public:
  explicit RankSynchronizingAllReduceProgram(int sync_rank) : CopyProgram(DType::kFloat32), sync_rank_(sync_rank) {}
  std::string describe() const override { return "rank-synchronizing all_reduce test program"; }
  void bind(RankContext& ctx) override;
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;

 private:
  int sync_rank_;
};

// A copy that, like TensorRT's setTensorAddress, takes only 256-byte aligned addresses and refuses
// any other: the runner must stage misaligned arrays (sliced views) through aligned buffers.
class AlignedCopyProgram : public CopyProgram {
 public:
  using CopyProgram::CopyProgram;
  std::string describe() const override { return "aligned copy test program"; }
  size_t required_alignment() const override { return 256; }
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;
};

// A copy whose enqueue on world rank `stuck_rank` first sleeps `seconds`, ignoring the abort (as a
// driver call that never returns would): the runner gives that rank up and throws while its task
// still runs, then the task returns into the call's state (tests that it owns what it touches).
class StubbornCopyProgram : public CopyProgram {
 public:
  StubbornCopyProgram(DType dtype, int stuck_rank, double seconds)
      : CopyProgram(dtype), stuck_rank_(stuck_rank), seconds_(seconds) {}
  std::string describe() const override { return "stubborn copy test program"; }
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;

 private:
  int stuck_rank_;
  double seconds_;
};

// A rank runtime of `num_ranks` CPU-only rank threads, world ranks 0..num_ranks-1 (the CPU tests of
// the runtime).
std::unique_ptr<RankRuntime> cpu_only_runtime(int num_ranks);

// Runs the check-then-launch step of a call (runtime/call_barrier.h) on `num_ranks` CPU-only rank
// threads: the check fails on `fail_rank` (-1: none), or sleeps `slow_check_seconds` there first.
// Returns, per rank, whether its launch ran, and the call's error message ("" when it succeeded).
std::pair<std::vector<bool>, std::string> run_checked_launch_test(int num_ranks, int fail_rank,
                                                                  double slow_check_seconds, double timeout);

// A check-then-launch call on `num_ranks` CPU-only rank threads whose checks wait (up to 5 s each)
// for the caller's while_ranks_run to start, which then takes 20 ms and throws when
// `callback_throws`: (every check saw it start and no launch came before it returned, the number
// of ranks that launched, the call's error or "").
std::tuple<bool, int, std::string> run_while_ranks_run_test(int num_ranks, bool callback_throws);

// Steps of a CPU-only runtime asked for on the thread inside its while_ranks_run (as a finalizer
// run there by garbage collection would): [run_on_all from inside the callback of another
// runtime's call run there, that call, run_on_all, mark_unusable] from inside, then run_on_all
// after it: each one's error, "" for none.
std::vector<std::string> run_reentering_test(int num_ranks);

// Whether a CPU-only runtime says it broke by a failure (broken_by_failure) after `how`: "close"
// (mark_unusable), "abort" (mark_broken), "abort, then close" or "close, then abort".
bool broken_by_failure_test(int num_ranks, const std::string& how);

// A step on `num_ranks` CPU-only rank threads ("launch": a check-then-launch call; "bind":
// bind_programs of a program the caller's list alone owns) whose task on `stuck_rank` ignores the
// abort: it sleeps `stuck_seconds`, past the deadline (`timeout`) and the runtime's grace after the
// abort (`grace_seconds`), so the step gives that rank up and throws, and the runtime (and the
// caller's programs) go. The task then returns, writes its result into the state it shares and
// checks what it still reads (that state, its rank context). Returns the step's error message.
std::string run_abandoned_rank_test(int num_ranks, int stuck_rank, double stuck_seconds, double timeout,
                                    double grace_seconds, const std::string& step);
// The late tasks of run_abandoned_rank_test so far: (returned, found their state and context intact).
std::pair<int, int> abandoned_rank_report();

// Binds `program` ("barrier": a CPU barrier across ranks; "fail": fails on `fail_rank`) on
// `num_ranks` CPU-only rank threads, one after another when `sequential`, within `timeout` seconds.
void run_bind_test(int num_ranks, const std::string& program, bool sequential, double timeout, int fail_rank);

// How many of `steps` steps run through run_concurrently (the helper that aborts communicators and
// programs at once) met all the others: each step arrives, then waits at most `timeout` seconds for
// every step to have arrived. Steps that run at once all meet (returns `steps`, at once); steps run
// one after another do not (the first waits out the timeout alone). A count, not a duration, so the
// test of it holds on a loaded machine.
int concurrent_meeting(int steps, double timeout);

// Makes a CPU-only rank worker that idles with the given spin and poll intervals (microseconds,
// beyond the limits of MDTRT_RANK_SPIN_US / MDTRT_RANK_POLL_US), runs one task on it, then destroys
// it while its thread idles. Returns once the worker is gone: at once if the destructor stops the
// idle thread, only after the whole spin or poll interval if it waited for it.
void stop_idle_worker(int spin_micros, int poll_micros);

// Raw figures of this machine, for benchmarks to compare against.
// The fan-out benchmark's work without mdtrt: one device-to-device copy of nbytes on each device,
// queued on a stream of each device by launch(), from the calling thread.
class BareCopies {
 public:
  BareCopies(const std::vector<int>& devices, size_t nbytes);
  void launch();          // queues the copies; the current device is left as it was
  void synchronize();     // cudaStreamSynchronize of each stream

 private:
  std::vector<int> devices_;
  size_t nbytes_;
  std::vector<CudaStream> streams_;
  std::vector<DeviceBuffer> from_, to_;
};
// Per iteration: BareCopies::launch, then its synchronize, from one thread (what the same work
// costs on these GPUs without mdtrt or Python).
std::vector<double> bare_copy_loop_us(const std::vector<int>& devices, size_t nbytes, int iterations);
double peer_copy_bandwidth_gbps(int src, int dst, size_t nbytes, int iterations);
double host_to_device_bandwidth_gbps(int device, size_t nbytes, int iterations, bool pinned);

}  // namespace mdtrt
