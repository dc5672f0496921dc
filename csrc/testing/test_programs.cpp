#include "testing/test_programs.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <algorithm>
#include <thread>
#include <vector>

#include "common/concurrently.h"
#include "common/error.h"
#include "nccl/communicator.h"
#include "nccl/nccl_library.h"
#include "runtime/call_barrier.h"
#include "runtime/cuda_handles.h"
#include "runtime/program_runner.h"
#include "runtime/rank_runtime.h"

namespace mdtrt {

void BarrierBindProgram::bind(RankContext& ctx) {
  std::unique_lock<std::mutex> lock(mutex_);
  ++arrived_;
  changed_.notify_all();
  bool released = changed_.wait_until(lock, ctx.deadline.at(), [&] { return aborted_ || arrived_ >= num_ranks_; });
  if (aborted_) throw Error(ErrorKind::kGeneric, "barrier aborted", ctx.rank, "bind");
  if (!released) throw Error(ErrorKind::kTimeout, "barrier not reached by every rank", ctx.rank, "bind");
}

void BarrierBindProgram::abort() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
  }
  changed_.notify_all();
}

int BarrierBindProgram::arrived() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return arrived_;
}

void FailingBindProgram::bind(RankContext& ctx) {
  if (ctx.rank == fail_rank_) throw Error(ErrorKind::kGeneric, message_, -1, "bind");
}

std::vector<TensorSpec> CopyProgram::resolve_outputs(RankContext&, const std::vector<TensorView>& inputs) {
  if (inputs.size() != 1) throw_invalid_argument("the copy program takes one input");
  return {{"output", dtype_, inputs[0].shape}};
}

void CopyProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                          const std::vector<TensorView>& outputs) {
  MDTRT_CUDA_CHECK(
      cudaMemcpyAsync(outputs[0].data, inputs[0].data, inputs[0].nbytes(), cudaMemcpyDeviceToDevice, ctx.stream));
}

std::vector<TensorSpec> PairCopyProgram::resolve_outputs(RankContext&, const std::vector<TensorView>& inputs) {
  if (inputs.size() != 2) throw_invalid_argument("the pair copy program takes two inputs");
  return {{"b_copy", dtype_, inputs[1].shape}, {"a_copy", dtype_, inputs[0].shape}};
}

void PairCopyProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                              const std::vector<TensorView>& outputs) {
  for (size_t i = 0; i < 2; ++i)
    MDTRT_CUDA_CHECK(cudaMemcpyAsync(outputs[i].data, inputs[1 - i].data, inputs[1 - i].nbytes(),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
}

void SynchronizingCopyProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                                       const std::vector<TensorView>& outputs) {
  CopyProgram::enqueue(ctx, inputs, outputs);
  MDTRT_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
}

void RankSynchronizingAllReduceProgram::bind(RankContext& ctx) {
  if (ctx.world == nullptr) throw Error(ErrorKind::kGeneric, "this test program needs a communicator", ctx.rank, "bind");
}

void RankSynchronizingAllReduceProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                                                const std::vector<TensorView>& outputs) {
  if (ctx.rank == sync_rank_) MDTRT_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  const auto count = static_cast<size_t>(element_count(inputs.at(0).shape));
  MDTRT_NCCL_CHECK_ON(*ctx.world, ctx.deadline, AllReduce, inputs[0].data, outputs.at(0).data, count,
                      nccl::kFloat32, nccl::kSum, ctx.world->handle(), ctx.stream);
}

void AlignedCopyProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                                 const std::vector<TensorView>& outputs) {
  for (const auto* views : {&inputs, &outputs})
    for (const TensorView& v : *views)
      if (reinterpret_cast<uintptr_t>(v.data) % required_alignment() != 0)
        throw Error(ErrorKind::kInvalidArgument,
                    "address " + std::to_string(reinterpret_cast<uintptr_t>(v.data)) + " is not a multiple of " +
                        std::to_string(required_alignment()) + " bytes",
                    ctx.rank, "enqueue");
  CopyProgram::enqueue(ctx, inputs, outputs);
}

std::unique_ptr<RankRuntime> cpu_only_runtime(int num_ranks) {
  std::vector<int> devices(num_ranks, -1), ranks(num_ranks);
  for (int i = 0; i < num_ranks; ++i) ranks[i] = i;
  return std::make_unique<RankRuntime>(devices, ranks, num_ranks);
}

std::pair<std::vector<bool>, std::string> run_checked_launch_test(int num_ranks, int fail_rank,
                                                                  double slow_check_seconds, double timeout) {
  const std::unique_ptr<RankRuntime> owned = cpu_only_runtime(num_ranks);
  RankRuntime& runtime = *owned;
  // Shared with the tasks, like every caller's state (see RankRuntime::run_on_all).
  std::shared_ptr<std::atomic<bool>[]> launched(new std::atomic<bool>[num_ranks]);
  for (int i = 0; i < num_ranks; ++i) launched[i] = false;
  std::string error;
  try {
    run_checked_then_launched(
      runtime,
      [fail_rank, slow_check_seconds](RankContext& ctx) {
        if (ctx.rank != fail_rank) return;
        if (slow_check_seconds > 0)
          std::this_thread::sleep_for(std::chrono::duration<double>(slow_check_seconds));
        else
          throw_invalid_argument("injected bad argument");
      },
      [launched](RankContext& ctx) { launched[ctx.local_index] = true; }, timeout, "infer");
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::vector<bool> out(num_ranks);
  for (int i = 0; i < num_ranks; ++i) out[i] = launched[i];
  return {out, error};
}

std::tuple<bool, int, std::string> run_while_ranks_run_test(int num_ranks, bool callback_throws) {
  const std::unique_ptr<RankRuntime> owned = cpu_only_runtime(num_ranks);
  RankRuntime& runtime = *owned;
  // Shared with the tasks, like every caller's state (see RankRuntime::run_on_all).
  struct Seen {
    std::atomic<bool> released{false};         // the callback started
    std::atomic<bool> callback_returned{false};
    std::atomic<bool> checks_released{true};   // every rank's check saw the callback start
    std::atomic<bool> launches_after{true};    // every rank launched after the callback returned
    std::atomic<int> launched{0};
  };
  auto seen = std::make_shared<Seen>();
  bool launched_before = false;
  std::string error;
  try {
    run_checked_then_launched(
        runtime,
        [seen](RankContext&) {  // a caller that waited for the ranks first would leave this unreleased
          const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
          while (!seen->released.load() && std::chrono::steady_clock::now() < until)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
          if (!seen->released.load()) seen->checks_released.store(false);
        },
        [seen](RankContext&) {
          if (!seen->callback_returned.load()) seen->launches_after.store(false);
          seen->launched.fetch_add(1);
        },
        30.0, "infer",
        [&] {
          launched_before = seen->launched.load() > 0;
          seen->released.store(true);
          std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a rank free to launch would by now
          seen->callback_returned.store(true);
          if (callback_throws) throw std::runtime_error("the caller's own work failed");
        });
  } catch (const std::exception& e) {
    error = e.what();
  }
  return {seen->checks_released.load() && seen->launches_after.load() && !launched_before, seen->launched.load(),
          error};
}

std::vector<std::string> run_reentering_test(int num_ranks) {
  const std::unique_ptr<RankRuntime> runtime = cpu_only_runtime(num_ranks);
  const std::unique_ptr<RankRuntime> other = cpu_only_runtime(num_ranks);
  std::vector<std::string> errors;
  auto attempt = [&](const std::function<void()>& step) {
    try {
      step();
      errors.emplace_back();
    } catch (const std::exception& e) {
      errors.emplace_back(e.what());
    }
  };
  run_checked_then_launched(
      *runtime, [](RankContext&) {}, [](RankContext&) {}, 10.0, "infer", [&] {
        // Another group's call, with a callback of its own, runs from here; a step of this group
        // from inside that callback still finds this thread holding this group's locks.
        attempt([&] {
          run_checked_then_launched(*other, [](RankContext&) {}, [](RankContext&) {}, 10.0, "other", [&] {
            attempt([&] { runtime->run_on_all([](RankContext&) {}, 5.0, "nested"); });
          });
        });
        attempt([&] { runtime->run_on_all([](RankContext&) {}, 5.0, "reentered"); });
        attempt([&] { runtime->mark_unusable("closed from inside"); });
      });
  attempt([&] { runtime->run_on_all([](RankContext&) {}, 5.0, "after"); });  // the mark went
  return errors;
}

bool broken_by_failure_test(int num_ranks, const std::string& how) {
  const std::unique_ptr<RankRuntime> runtime = cpu_only_runtime(num_ranks);
  auto close = [&] { runtime->mark_unusable("the DeviceGroup was closed"); };
  auto abort = [&] { runtime->mark_broken("the DeviceGroup was aborted"); };
  if (how == "close") {
    close();
  } else if (how == "abort") {
    abort();
  } else if (how == "abort, then close") {
    abort();
    close();
  } else if (how == "close, then abort") {
    close();
    abort();
  } else {
    throw_invalid_argument("unknown way to break a runtime: " + how);
  }
  return runtime->broken_by_failure();
}

namespace {
std::atomic<int> late_tasks_returned{0};
std::atomic<int> late_tasks_intact{0};

// What the tasks of run_abandoned_rank_test's step write; the stuck rank writes it after the step
// gave that rank up and the caller returned, so it must be owned by the task.
struct LateWrites {
  static constexpr uint64_t kCanary = 0x6d64747274756166ULL;
  LateWrites(int num_ranks, int stuck_rank, double stuck_seconds)
      : num_ranks(num_ranks), stuck_rank(stuck_rank), stuck_seconds(stuck_seconds), results(num_ranks),
        notes(num_ranks) {}
  // Rank ctx's part: the stuck rank sleeps first, ignoring the abort; each writes its result; the
  // stuck one then checks what it still reads (this object, its context: the runtime is gone).
  void run(const RankContext& ctx) {
    const bool stuck = ctx.rank == stuck_rank;
    if (stuck) std::this_thread::sleep_for(std::chrono::duration<double>(stuck_seconds));
    results[ctx.local_index] = kCanary ^ static_cast<uint64_t>(ctx.rank);
    notes[ctx.local_index] =
        "rank " + std::to_string(ctx.rank) + " of " + std::to_string(ctx.world_size) + " wrote its result late";
    if (!stuck) return;
    const bool intact = canary == kCanary && ctx.local_index == stuck_rank && ctx.rank == stuck_rank &&
                        ctx.world_size == num_ranks && ctx.device == -1 &&
                        results[ctx.local_index] == (kCanary ^ static_cast<uint64_t>(stuck_rank));
    late_tasks_intact.fetch_add(intact ? 1 : 0);
    late_tasks_returned.fetch_add(1);
  }

  uint64_t canary = kCanary;
  int num_ranks;
  int stuck_rank;
  double stuck_seconds;
  std::vector<uint64_t> results;
  std::vector<std::string> notes;  // heap memory the late task rewrites
};

// A program whose bind is LateWrites::run, owned only by the caller's list of programs.
class StubbornBindProgram : public NoIoProgram {
 public:
  StubbornBindProgram(int num_ranks, int stuck_rank, double stuck_seconds)
      : writes_(num_ranks, stuck_rank, stuck_seconds) {}
  std::string describe() const override { return "stubborn bind test program"; }
  void bind(RankContext& ctx) override { writes_.run(ctx); }

 private:
  LateWrites writes_;
};
}  // namespace

std::string run_abandoned_rank_test(int num_ranks, int stuck_rank, double stuck_seconds, double timeout,
                                    double grace_seconds, const std::string& step) {
  if (step != "launch" && step != "bind") throw_invalid_argument("unknown step " + step + " (launch or bind)");
  std::string error;
  {
    const std::unique_ptr<RankRuntime> owned = cpu_only_runtime(num_ranks);
    RankRuntime& runtime = *owned;
    runtime.set_abort_grace_for_testing(grace_seconds);
    try {
      if (step == "launch") {
        auto writes = std::make_shared<LateWrites>(num_ranks, stuck_rank, stuck_seconds);
        run_checked_then_launched(
            runtime, [](RankContext&) {}, [writes](RankContext& ctx) { writes->run(ctx); }, timeout, "infer");
      } else {
        const std::vector<std::shared_ptr<RankProgram>> programs(
            num_ranks, std::make_shared<StubbornBindProgram>(num_ranks, stuck_rank, stuck_seconds));
        bind_programs(runtime, programs, timeout, /*sequential=*/false);
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
  }  // the runtime goes here (and the programs), leaving the stuck rank's thread running
  return error;
}

std::pair<int, int> abandoned_rank_report() { return {late_tasks_returned.load(), late_tasks_intact.load()}; }

void StubbornCopyProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                                  const std::vector<TensorView>& outputs) {
  if (ctx.rank == stuck_rank_) std::this_thread::sleep_for(std::chrono::duration<double>(seconds_));
  CopyProgram::enqueue(ctx, inputs, outputs);
}

std::vector<TensorSpec> SinkProgram::resolve_outputs(RankContext&, const std::vector<TensorView>&) {
  return {{"output", dtype_, {1}}};
}

int concurrent_meeting(int steps, double timeout) {
  const int count = std::max(steps, 0);
  std::mutex mutex;
  std::condition_variable arrived_cv;
  int arrived = 0;
  int met = 0;
  std::vector<std::function<void()>> meet(static_cast<size_t>(count), [&] {
    std::unique_lock<std::mutex> lock(mutex);
    ++arrived;
    arrived_cv.notify_all();
    if (arrived_cv.wait_for(lock, std::chrono::duration<double>(timeout), [&] { return arrived == count; })) ++met;
  });
  run_concurrently(meet);
  return met;
}

void stop_idle_worker(int spin_micros, int poll_micros) {
  RankRuntimeSettings settings{};
  settings.spin_micros = spin_micros;
  settings.poll_micros = poll_micros;
  RankWorker worker(0, -1, settings);
  auto ran = std::make_shared<std::promise<void>>();  // shared: the task may still be in set_value
  std::future<void> done = ran->get_future();
  worker.post([ran] { ran->set_value(); });
  done.get();  // the task ran: the worker's thread now spins or polls, idle, until the destructor
}

BareCopies::BareCopies(const std::vector<int>& devices, size_t nbytes) : devices_(devices), nbytes_(nbytes) {
  if (devices.empty()) throw_invalid_argument("bare copies need at least one device");
  for (int device : devices) {
    streams_.emplace_back(device);
    from_.emplace_back(device, nbytes);
    to_.emplace_back(device, nbytes);
  }
}

void BareCopies::launch() {
  ScopedDevice keep(devices_[0]);  // restores the caller's current device
  for (size_t d = 0; d < devices_.size(); ++d) {
    MDTRT_CUDA_CHECK(cudaSetDevice(devices_[d]));
    MDTRT_CUDA_CHECK(cudaMemcpyAsync(to_[d].get(), from_[d].get(), nbytes_, cudaMemcpyDeviceToDevice,
                                     streams_[d].get()));
  }
}

void BareCopies::synchronize() {
  for (auto& stream : streams_) MDTRT_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
}

std::vector<double> bare_copy_loop_us(const std::vector<int>& devices, size_t nbytes, int iterations) {
  BareCopies copies(devices, nbytes);
  std::vector<double> out;
  for (int i = 0; i < iterations; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    copies.launch();
    copies.synchronize();
    out.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  return out;
}

namespace {
// GB/s of `iterations` copies issued by `copy` on `stream`, timed with CUDA events.
template <typename Copy>
double timed_bandwidth(int device, size_t nbytes, int iterations, cudaStream_t stream, Copy copy) {
  ScopedDevice on(device);
  CudaEvent start(device, true), stop(device, true);
  copy();  // warm-up
  MDTRT_CUDA_CHECK(cudaEventRecord(start.get(), stream));
  for (int i = 0; i < iterations; ++i) copy();
  MDTRT_CUDA_CHECK(cudaEventRecord(stop.get(), stream));
  MDTRT_CUDA_CHECK(cudaEventSynchronize(stop.get()));
  float ms = 0;
  MDTRT_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
  return static_cast<double>(nbytes) * iterations / (ms * 1e-3) / 1e9;
}
}  // namespace

double peer_copy_bandwidth_gbps(int src, int dst, size_t nbytes, int iterations) {
  DeviceBuffer from(src, nbytes), to(dst, nbytes);
  CudaStream stream(dst);
  {
    ScopedDevice on(dst);
    cudaError_t st = cudaDeviceEnablePeerAccess(src, 0);
    if (st == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError(); else MDTRT_CUDA_CHECK(st);
  }
  return timed_bandwidth(dst, nbytes, iterations, stream.get(), [&] {
    MDTRT_CUDA_CHECK(cudaMemcpyPeerAsync(to.get(), dst, from.get(), src, nbytes, stream.get()));
  });
}

double host_to_device_bandwidth_gbps(int device, size_t nbytes, int iterations, bool pinned) {
  DeviceBuffer to(device, nbytes);
  CudaStream stream(device);
  PinnedBuffer pinned_host;
  std::vector<char> pageable;
  void* host = nullptr;
  if (pinned) {
    pinned_host.reserve(nbytes);
    host = pinned_host.get();
  } else {
    pageable.assign(nbytes, 1);
    host = pageable.data();
  }
  return timed_bandwidth(device, nbytes, iterations, stream.get(), [&] {
    MDTRT_CUDA_CHECK(cudaMemcpyAsync(to.get(), host, nbytes, cudaMemcpyHostToDevice, stream.get()));
  });
}

// Holds a RankRuntime without GPUs, for the CPU tests of the runtime.
void run_bind_test(int num_ranks, const std::string& program, bool sequential, double timeout, int fail_rank) {
  const std::unique_ptr<RankRuntime> owned = cpu_only_runtime(num_ranks);
  RankRuntime& runtime = *owned;
  std::vector<std::shared_ptr<RankProgram>> programs;
  if (program == "barrier") {
    auto barrier = std::make_shared<BarrierBindProgram>(num_ranks);
    programs.assign(num_ranks, barrier);
  } else if (program == "fail") {
    programs.assign(num_ranks, std::make_shared<FailingBindProgram>(fail_rank, "injected failure"));
  } else {
    throw_invalid_argument("unknown test program " + program);
  }
  bind_programs(runtime, programs, timeout, sequential);
}

}  // namespace mdtrt
