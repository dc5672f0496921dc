#include "runtime/program_runner.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>

#include "common/concurrently.h"
#include "common/error.h"
#include "runtime/call_barrier.h"
#include "runtime/rank_outputs.h"
#include "runtime/replication.h"

namespace mdtrt {

namespace {
// Every distinct program aborted at once (ranks often share one program object): a program's
// abort may tear down its own communicators (ncclCommAbort), which takes a while each.
void abort_programs(const std::vector<std::shared_ptr<RankProgram>>& programs) {
  std::vector<std::function<void()>> steps;
  std::vector<const RankProgram*> seen;
  for (const auto& p : programs) {
    if (!p || std::find(seen.begin(), seen.end(), p.get()) != seen.end()) continue;
    seen.push_back(p.get());
    steps.emplace_back([p] { p->abort(); });
  }
  run_concurrently(steps);
}
}  // namespace

void bind_programs(RankRuntime& runtime, const std::vector<std::shared_ptr<RankProgram>>& programs,
                   double timeout_seconds, bool sequential) {
  if (static_cast<int>(programs.size()) != runtime.num_local_ranks())
    throw_invalid_argument("one program per local rank is needed: got " + std::to_string(programs.size()) +
                           " for " + std::to_string(runtime.num_local_ranks()) + " ranks");
  int hook = runtime.add_abort_hook([programs] { abort_programs(programs); });
  try {
    // The programs by value: a rank given up on at the deadline binds on after this returned.
    runtime.run_on_all([programs](RankContext& ctx) { programs[ctx.local_index]->bind(ctx); }, timeout_seconds,
                       "bind", sequential);
  } catch (...) {
    runtime.remove_abort_hook(hook);
    throw;
  }
  runtime.remove_abort_hook(hook);
}

ProgramRunner::ProgramRunner(std::shared_ptr<DeviceGroup> group, std::vector<std::shared_ptr<RankProgram>> programs,
                             bool sequential_bind)
    : group_(std::move(group)), resources_(std::make_shared<Resources>()) {
  resources_->programs = std::move(programs);
  resources_->buffers.resize(group_->num_local_ranks());
  bind_programs(group_->runtime(), resources_->programs, group_->timeout(), sequential_bind);
  // Inputs are fixed once bound (an engine's IO does not change): read them once, not per call.
  for (int i = 0; i < group_->num_local_ranks(); ++i)
    input_specs_.push_back(resources_->programs[i]->input_specs(group_->runtime().context(i)));
  abort_hook_ = group_->runtime().add_abort_hook([programs = resources_->programs] { abort_programs(programs); });
  description_ = resources_->programs[0]->describe();
}

ProgramRunner::~ProgramRunner() {
  // Stream-ordered work may still use this runner's programs (a collective's own communicator,
  // whose destruction would wait for it) and buffers: it finishes first, or is aborted at its
  // deadline with this runner's abort hook still in place.
  group_->runtime().finish_in_flight();
  if (abort_hook_ >= 0) group_->runtime().remove_abort_hook(abort_hook_);
}

std::vector<TensorSpec> ProgramRunner::input_specs(int local_index) { return input_specs_.at(local_index); }

void ProgramRunner::set_cuda_graphs(bool on) {
  group_->runtime().throw_if_calling_back("cuda_graphs");
  std::lock_guard<std::mutex> call_lock(infer_mutex_);
  cuda_graphs_ = on;
  if (on) {
    std::lock_guard<std::mutex> lock(graph_fallback_mutex_);
    graph_fallback_.clear();
  }
  // A rank given up on may still be capturing or launching its graph; the group takes no more calls.
  if (group_->runtime().any_abandoned()) return;
  for (auto& b : resources_->buffers) b.graph = RankGraph{};
}

std::string ProgramRunner::graph_fallback() const {
  std::lock_guard<std::mutex> lock(graph_fallback_mutex_);
  return graph_fallback_;
}

std::vector<int> ProgramRunner::graph_captures() {
  group_->runtime().throw_if_calling_back("graph_captures");
  std::lock_guard<std::mutex> call_lock(infer_mutex_);
  std::vector<int> out;
  for (const auto& b : resources_->buffers) out.push_back(b.graph.captures);
  return out;
}

// With CUDA graphs, every local rank learns every other's capture outcome before any rank launches:
// nothing runs during a capture, so when one rank's capture fails (after the others captured
// collectives that would wait for it), all of them run that call as a plain enqueue instead, and
// no rank is left waiting on one that threw. A rank that fails before getting here releases the
// others too (they then skip their enqueue).
struct ProgramRunner::GraphRendezvous {
  explicit GraphRendezvous(int n) : arrived(n, 0) {}

  // Returns the first capture failure of any local rank ("" when none).
  std::string arrive(const RankContext& ctx, const std::string& capture_failure) {
    std::unique_lock<std::mutex> lock(mutex);
    arrived[ctx.local_index] = 1;
    ++count;
    if (!capture_failure.empty() && failure.empty()) failure = capture_failure;
    changed.notify_all();
    const bool done = changed.wait_until(lock, ctx.deadline.at(), [&] {
      return failed_rank >= 0 || count == static_cast<int>(arrived.size());
    });
    if (failed_rank >= 0)
      throw SkippedForOtherRank(ErrorKind::kGeneric,
                                "not enqueued: rank " + std::to_string(failed_rank) +
                                    " failed before its enqueue, and running on would wait on it",
                                ctx.rank, "infer");
    if (!done)
      throw Error(ErrorKind::kTimeout, "waited past the deadline for the other ranks to reach their enqueue", ctx.rank,
                  "infer");
    return failure;
  }
  // A rank that failed before arriving.
  void fail(const RankContext& ctx) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (arrived[ctx.local_index] || failed_rank >= 0) return;
      failed_rank = ctx.rank;
    }
    changed.notify_all();
  }

  std::mutex mutex;
  std::condition_variable changed;
  std::vector<char> arrived;
  int count = 0;
  int failed_rank = -1;
  std::string failure;  // the first capture failure
};

void ProgramRunner::enqueue_program(RankContext& ctx, RankProgram& program, RankBuffers& bufs,
                                    const std::vector<TensorView>& inputs, const std::vector<TensorView>& outputs,
                                    GraphRendezvous* rendezvous) {
  if (rendezvous == nullptr) {
    program.enqueue(ctx, inputs, outputs);
    return;
  }
  RankGraph& g = bufs.graph;
  std::vector<const void*> pointers;
  std::vector<Shape> shapes;
  for (const auto& v : inputs) {
    pointers.push_back(v.data);
    shapes.push_back(v.shape);
  }
  for (const auto& v : outputs) {
    pointers.push_back(v.data);
    shapes.push_back(v.shape);
  }
  const bool same = g.seen_once && pointers == g.pointers && shapes == g.shapes;
  CudaGraphExec captured;
  std::string failure;
  if (!same) {
    // New buffers or shapes: run as usual (a TensorRT context settles shape-dependent state on its
    // first enqueue, which must not happen inside a capture) and capture next time.
    g = RankGraph{pointers, shapes, true, CudaGraphExec(), g.captures};
  } else if (g.exec.get() == nullptr) {
    // Thread-local capture: the other ranks' threads capture on their own streams meanwhile.
    auto describe_failure = [&](const std::string& what) {
      return "rank " + std::to_string(ctx.rank) + ": capturing '" + program.describe() + "' failed (" + what + ")";
    };
    cudaGraph_t graph = nullptr;
    cudaError_t status = cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeThreadLocal);
    if (status != cudaSuccess) {
      cudaGetLastError();
      failure = describe_failure(std::string("cudaStreamBeginCapture: ") + cudaGetErrorString(status));
    } else {
      try {
        program.enqueue(ctx, inputs, outputs);
      } catch (const std::exception& e) {
        failure = describe_failure(e.what());
      }
      status = cudaStreamEndCapture(ctx.stream, &graph);
      if (failure.empty() && status != cudaSuccess)
        failure = describe_failure(std::string("cudaStreamEndCapture: ") + cudaGetErrorString(status));
      cudaGetLastError();  // the capture's sticky status is not the program's to keep
    }
    if (failure.empty()) {
      cudaGraphExec_t exec = nullptr;
      status = cudaGraphInstantiate(&exec, graph, 0);
      if (status != cudaSuccess) {
        cudaGetLastError();
        failure = describe_failure(std::string("cudaGraphInstantiate: ") + cudaGetErrorString(status));
      } else {
        captured = CudaGraphExec(ctx.device, exec);
      }
    }
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
  // Nothing of this call ran yet on any rank: agree on what runs.
  if (!rendezvous->arrive(ctx, failure).empty()) {
    g = RankGraph{};  // graphs are off for this runner from now on (infer switches them off)
    program.enqueue(ctx, inputs, outputs);
    return;
  }
  if (captured.get() != nullptr) {
    g.exec = std::move(captured);
    g.captures += 1;
  }
  if (same && g.exec.get() != nullptr) {
    MDTRT_CUDA_CHECK(cudaGraphLaunch(g.exec.get(), ctx.stream));
  } else {
    program.enqueue(ctx, inputs, outputs);
  }
}

std::vector<ProgramRunner::RankOrdering> ProgramRunner::order_after_callers(
    const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options, std::vector<CallerUse>& used) {
  // The caller's arrays are stream-ordered: each rank reads (and writes) them only after the work
  // already queued on their streams; a producer's pending kernel is otherwise raced by the rank
  // streams, which are non-blocking. The event is recorded whether or not the stream is idle:
  // recording and waiting cost about 0.2 us each on the host (2x H200, CUDA 13), asking whether
  // the stream is idle (cudaStreamQuery) 1.3 us, and in a stream-ordered loop the caller stream is
  // never idle (it waits for the previous call).
  std::vector<CallerStream>& streams = resources_->caller_streams;
  if (streams.size() > 64) streams.clear();  // streams come and go; keep the list short
  const size_t n = inputs.size();
  auto note = [&](size_t rank, int device, uintptr_t stream) {
    if (stream == 0 || device < 0) return;
    int index = -1;
    for (size_t c = 0; c < streams.size() && index < 0; ++c)
      if (streams[c].device == device && streams[c].stream == stream) index = static_cast<int>(c);
    if (index < 0) {
      streams.push_back(CallerStream{device, stream, CudaEvent(device, false)});
      index = static_cast<int>(streams.size()) - 1;
    }
    auto use = std::find_if(used.begin(), used.end(), [index](const CallerUse& u) { return u.stream == index; });
    if (use == used.end()) use = used.insert(used.end(), CallerUse{index, {}});
    if (std::find(use->ranks.begin(), use->ranks.end(), static_cast<int>(rank)) == use->ranks.end())
      use->ranks.push_back(static_cast<int>(rank));
  };
  for (size_t i = 0; i < n; ++i) {
    for (const InputArg& a : inputs[i]) note(i, a.device, a.stream);
    if (i < options.outputs.size())
      for (const OutputArg& g : options.outputs[i]) note(i, g.device, g.stream);
  }
  // A stream of one rank's own GPU that no other rank uses (torch's current stream of that GPU, the
  // usual case) is ordered by that rank on its thread: the events are recorded and waited for
  // there, at once on every rank, instead of one after another on the calling thread with a device
  // switch each (2x H200: about 2 us before the hand-off and 2 us after it, per call on 2 GPUs).
  // Not the per-thread default stream: on a rank's thread that handle names the rank thread's own.
  const std::vector<int>& devices = group_->runtime().devices();
  std::vector<RankOrdering> order(n);
  for (CallerUse& use : used) {
    CallerStream& c = streams[use.stream];
    use.by_rank = use.ranks.size() == 1 && c.device == devices[use.ranks[0]] &&
                  c.stream != reinterpret_cast<uintptr_t>(cudaStreamPerThread);
    if (use.by_rank) {
      order[use.ranks[0]].own.push_back(use.stream);
      continue;
    }
    ScopedDevice on(c.device);
    MDTRT_CUDA_CHECK(cudaEventRecord(c.ready.get(), reinterpret_cast<cudaStream_t>(c.stream)));
    for (int rank : use.ranks) order[rank].wait.push_back(use.stream);
  }
  return order;
}

CallPlan ProgramRunner::plan(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options) {
  RankRuntime& runtime = group_->runtime();
  return plan_call(inputs, options, input_specs_, runtime.ranks(), group_->all_peer_access(), group_->all_nvlink(),
                   runtime.num_local_ranks() == group_->world_size());
}

std::vector<RankResult> ProgramRunner::infer(const std::vector<std::vector<InputArg>>& inputs,
                                             const InferOptions& options) {
  return run(plan(inputs, options), inputs, options);
}

PreparedInfer::PreparedInfer(std::shared_ptr<ProgramRunner> runner, std::vector<std::vector<InputArg>> inputs,
                             InferOptions options)
    : runner_(std::move(runner)), inputs_(std::move(inputs)), options_(std::move(options)),
      plan_(runner_->plan(inputs_, options_)) {}

std::vector<RankResult> PreparedInfer::run(std::vector<std::vector<OutputArg>> outputs, bool stream_ordered) {
  if (outputs.size() > static_cast<size_t>(plan_.num_ranks))
    throw_invalid_argument("output buffers for " + std::to_string(outputs.size()) + " ranks given, this group has " +
                           std::to_string(plan_.num_ranks) + " local ranks");
  const InferOptions options = options_for(std::move(outputs), stream_ordered);
  if (stream_ordered) {
    const CallPlan plan = runner_->plan(inputs_, options);  // checks what a stream-ordered call needs
    return runner_->run(plan, inputs_, options);
  }
  return runner_->run(plan_, inputs_, options);
}

std::vector<RankResult> PreparedInfer::run_stream_ordered() {
  const InferOptions* options = nullptr;
  const CallPlan* plan = nullptr;
  {
    std::lock_guard<std::mutex> lock(ordered_mutex_);
    if (!ordered_plan_) {
      auto ordered = std::make_unique<const InferOptions>(options_for(options_.outputs, true));
      // Checks what a stream-ordered call needs (device arrays with streams, every output given):
      // a call that cannot be one raises here on every run, and keeps nothing.
      auto made = std::make_unique<const CallPlan>(runner_->plan(inputs_, *ordered));
      ordered_options_ = std::move(ordered);
      ordered_plan_ = std::move(made);
    }
    options = ordered_options_.get();
    plan = ordered_plan_.get();
  }
  return runner_->run(*plan, inputs_, *options);  // both live as long as this call
}

InferOptions PreparedInfer::options_for(std::vector<std::vector<OutputArg>> outputs, bool stream_ordered) const {
  InferOptions options = options_;
  options.outputs = std::move(outputs);
  options.stream_ordered = stream_ordered;
  return options;
}

std::vector<RankResult> PreparedInfer::run_at(const std::vector<std::vector<InputAddress>>& addresses,
                                             std::vector<std::vector<OutputArg>> outputs, bool stream_ordered) {
  if (addresses.size() != inputs_.size())
    throw_invalid_argument("inputs for " + std::to_string(addresses.size()) + " ranks given, this call has " +
                           std::to_string(inputs_.size()));
  std::vector<std::vector<InputArg>> inputs = inputs_;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (addresses[i].size() != inputs[i].size())
      throw_invalid_argument("local rank " + std::to_string(i) + " got " + std::to_string(addresses[i].size()) +
                             " input addresses; this call has " + std::to_string(inputs[i].size()) + " inputs");
    for (size_t k = 0; k < inputs[i].size(); ++k) {
      inputs[i][k].data = addresses[i][k].data;
      inputs[i][k].stream = addresses[i][k].stream;
    }
  }
  const InferOptions options = options_for(std::move(outputs), stream_ordered);
  const CallPlan plan = runner_->plan(inputs, options);
  return runner_->run(plan, inputs, options);
}

InferOptions PreparedInfer::options_with_outputs(const std::vector<std::string>& names,
                                                 const std::vector<size_t>& nbytes, const std::vector<int>& devices,
                                                 bool stream_ordered) const {
  const size_t m = names.size(), n = inputs_.size();
  if (m == 0 || nbytes.size() != n * m || devices.size() != n * m)
    throw_invalid_argument("a run with every output given takes the output names and, for each of the " +
                           std::to_string(n) + " local ranks, each output's size and GPU: got " +
                           std::to_string(m) + " names, " + std::to_string(nbytes.size()) + " sizes and " +
                           std::to_string(devices.size()) + " devices");
  std::vector<std::vector<OutputArg>> outputs(n);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < m; ++j)
      outputs[i].push_back(OutputArg{names[j], nullptr, nbytes[i * m + j], devices[i * m + j], 0});
  return options_for(std::move(outputs), stream_ordered);
}

AddressedRun::AddressedRun(std::shared_ptr<PreparedInfer> call, const std::vector<std::string>& names,
                           const std::vector<size_t>& nbytes, const std::vector<int>& devices, bool stream_ordered)
    : call_(std::move(call)),
      unaddressed_inputs_(call_->inputs()),
      unaddressed_options_(call_->options_with_outputs(names, nbytes, devices, stream_ordered)),
      inputs_(unaddressed_inputs_),
      options_(unaddressed_options_) {
  all_on_device_ = true;
  for (const auto& rank : inputs_) {
    input_count_ += rank.size();
    for (const InputArg& a : rank) all_on_device_ = all_on_device_ && a.device >= 0;
  }
  for (const auto& rank : options_.outputs) output_count_ += rank.size();
}

void AddressedRun::address(const std::vector<uintptr_t>& pointers, const std::vector<uintptr_t>& streams,
                           std::vector<std::vector<InputArg>>& inputs, InferOptions& options) const {
  size_t at = 0;
  for (auto& rank : inputs)
    for (InputArg& a : rank) {
      a.data = reinterpret_cast<const void*>(pointers[at]);
      a.stream = streams[at++];
    }
  for (auto& rank : options.outputs)
    for (OutputArg& o : rank) {
      o.data = reinterpret_cast<void*>(pointers[at]);
      o.stream = streams[at++];
    }
}

bool AddressedRun::plan_holds(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options) const {
  if (!all_on_device_) return false;  // host inputs shared by every rank are found by their addresses
  // What plan_call checks of addresses and streams (it says what is wrong when this fails).
  for (const auto& rank : inputs)
    for (const InputArg& a : rank)
      if ((a.data == nullptr && a.nbytes() > 0) || (options.stream_ordered && a.stream == 0)) return false;
  if (options.stream_ordered)
    for (const auto& rank : options.outputs)
      for (const OutputArg& o : rank)
        if (o.stream == 0 || o.device < 0) return false;
  return true;
}

void AddressedRun::run(const std::vector<uintptr_t>& pointers, const std::vector<uintptr_t>& streams,
                       const std::function<void()>& while_ranks_run) {
  if (pointers.size() != input_count_ + output_count_ || streams.size() != pointers.size())
    throw_invalid_argument("this call takes " + std::to_string(input_count_) + " input and " +
                           std::to_string(output_count_) + " output addresses, each with a stream: got " +
                           std::to_string(pointers.size()) + " pointers and " + std::to_string(streams.size()) +
                           " streams");
  ProgramRunner& runner = call_->runner();
  // Before the try_lock: from inside a run's own while_ranks_run (a finalizer running this call
  // again) this thread may hold mutex_ already, and try_lock by its owner is undefined.
  runner.group().runtime().throw_if_calling_back("infer");
  std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {  // another thread runs this call: its own copies, planned afresh
    std::vector<std::vector<InputArg>> inputs = unaddressed_inputs_;
    InferOptions options = unaddressed_options_;
    address(pointers, streams, inputs, options);
    runner.run(runner.plan(inputs, options), inputs, options, while_ranks_run);
    return;
  }
  address(pointers, streams, inputs_, options_);
  if (!plan_ || !plan_holds(inputs_, options_)) {
    auto plan = std::make_unique<const CallPlan>(runner.plan(inputs_, options_));  // throws what is wrong
    if (!plan_holds(inputs_, options_)) {
      runner.run(*plan, inputs_, options_, while_ranks_run);
      return;
    }
    plan_ = std::move(plan);
  }
  runner.run(*plan_, inputs_, options_, while_ranks_run);
}

// Everything a call's rank tasks read or write: shared by them and run() (see Resources), so that a
// rank given up on at the deadline writes into it, not into a frame that is gone.
struct ProgramRunner::Call {
  std::shared_ptr<Resources> resources;
  // The call's arguments, copied: the caller's may go once run() returned.
  CallPlan plan;
  std::vector<std::vector<InputArg>> inputs;
  InferOptions options;
  std::vector<RankOrdering> ordering;  // per rank: how it orders itself after the caller streams
  std::optional<ReplicationSource> source;
  int first_rank = 0;
  // Per rank, written by its task.
  std::vector<RankResult> results;
  std::vector<std::vector<TensorView>> input_views;
  std::vector<RankOutputs> outputs;
  std::unique_ptr<GraphRendezvous> rendezvous;  // with CUDA graphs
  std::vector<CudaEvent> done;                  // stream-ordered: per rank, after its work
  std::unique_ptr<std::atomic<bool>[]> recorded;  // per rank: done was recorded (its work is queued)
  std::unique_ptr<std::atomic<bool>[]> callers_wait;  // per rank: its own caller streams wait for done
  // A rank touches the caller's streams (its `own` ones) only holding its caller_mutex and while
  // caller_gone is false: a call that failed sets it (and takes every rank's mutex) before it
  // returns, after which those streams may be gone (a rank given up on runs on). One per rank, so
  // that the ranks' CUDA calls on their own streams do not wait for each other.
  std::unique_ptr<std::timed_mutex[]> caller_mutex;
  std::atomic<bool> caller_gone{false};
};

std::vector<RankResult> ProgramRunner::run(const CallPlan& plan, const std::vector<std::vector<InputArg>>& inputs,
                                           const InferOptions& options, const std::function<void()>& while_ranks_run) {
  group_->runtime().throw_if_calling_back("infer");  // before the locks that thread would hold
  std::lock_guard<std::mutex> call_lock(infer_mutex_);
  RankRuntime& runtime = group_->runtime();
  // From the step to the hand-over of its events: the watchdog's order of calls is their order on
  // the rank streams, also when other runners of the group are called from other threads.
  const std::unique_lock<std::mutex> submission = runtime.lock_submission();
  runtime.throw_if_broken("infer");  // before any CUDA call: a failed GPU would answer with its own error
  const int n = plan.num_ranks;
  if (plan.replicated_inputs > 0) last_replication_ = plan.replication;
  // The previous call's state, unless a task given up on still holds it: no allocation per call.
  if (!call_ || call_.use_count() != 1) {
    call_ = std::make_shared<Call>();
    call_->resources = resources_;
    call_->recorded.reset(new std::atomic<bool>[n]);
    call_->callers_wait.reset(new std::atomic<bool>[n]);
    call_->caller_mutex.reset(new std::timed_mutex[n]);
  }
  const std::shared_ptr<Call> call = call_;
  Call& c = *call;
  c.caller_gone = false;
  c.plan = plan;
  c.inputs = inputs;
  c.options = options;
  std::vector<CallerUse> call_streams;  // every caller stream of this call, with the ranks that use it
  c.ordering = order_after_callers(inputs, options, call_streams);
  const bool stream_ordered = options.stream_ordered;
  c.done.clear();
  if (stream_ordered) {
    for (int i = 0; i < n; ++i) {
      c.done.push_back(runtime.take_event(i));
      c.recorded[i] = false;
      c.callers_wait[i] = false;
    }
  }

  // Shared across rank threads: sized here, before any thread can read them.
  RankBuffers& first = resources_->buffers[0];
  while (static_cast<int>(first.chunk_events.size()) < plan.max_chunks)
    first.chunk_events.emplace_back(runtime.devices()[0], false);
  c.source.emplace(plan.num_inputs);
  c.source->staging = &first.inputs;
  c.source->chunk_events = &first.chunk_events;
  c.first_rank = runtime.ranks()[0];

  c.results.assign(n, RankResult{});
  c.input_views.resize(n);
  c.outputs.assign(n, RankOutputs{});
  c.rendezvous.reset(cuda_graphs_ ? new GraphRendezvous(n) : nullptr);

  // Every rank checks and allocates; only when all of them could does any rank enqueue. Both own
  // the call's state (by value): nothing of this frame.
  auto check = [call](RankContext& ctx) {
    static const std::vector<OutputArg> kNoOutputs;
    Call& c = *call;
    const int i = ctx.local_index;
    RankProgram& program = *c.resources->programs[i];
    RankBuffers& bufs = c.resources->buffers[i];
    c.input_views[i] = place_inputs(ctx, c.inputs[i], bufs.inputs, program.required_alignment());
    c.outputs[i] = place_outputs(ctx, program, c.input_views[i],
                                 i < static_cast<int>(c.options.outputs.size()) ? c.options.outputs[i] : kNoOutputs,
                                 c.options.device_outputs, bufs.outputs);
    if (c.options.stream_ordered)
      for (size_t o = 0; o < c.outputs[i].device.size(); ++o)
        if (c.outputs[i].device[o])
          // A pooled output goes back to the pool in the rank stream's order, which a caller stream
          // still reading it would not follow.
          throw_invalid_argument("a stream-ordered call writes only into outputs the caller owns (out= / outputs=, "
                                 "or torch tensors the call allocates); output '" + c.outputs[i].specs[o].name +
                                 "' of rank " + std::to_string(ctx.rank) + " would come from mdtrt's pool. Give "
                                 "it with out= / outputs=, or pass stream_ordered=False");
    // The caller's streams of this rank's GPU that only it uses: this rank orders itself after them
    // here, before the barrier, so that a stream that cannot take an event fails the call before
    // any rank enqueues. The device made explicit: the legacy default stream means the current one's.
    if (!c.ordering[i].own.empty()) {
      const std::vector<CallerStream>& callers = c.resources->caller_streams;
      std::lock_guard<std::timed_mutex> lock(c.caller_mutex[i]);
      if (c.caller_gone)
        throw Error(ErrorKind::kGeneric, "the call was given up on before this rank ordered itself", ctx.rank,
                    "infer");
      ScopedDevice on(ctx.device);
      for (int index : c.ordering[i].own) {
        const CallerStream& caller = callers[index];
        MDTRT_CUDA_CHECK(cudaEventRecord(caller.ready.get(), reinterpret_cast<cudaStream_t>(caller.stream)));
        MDTRT_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream, caller.ready.get(), 0));
      }
    }
  };
  auto launch = [call](RankContext& ctx) {
    Call& c = *call;
    const int i = ctx.local_index;
    try {
      const std::vector<CallerStream>& callers = c.resources->caller_streams;
      for (int index : c.ordering[i].wait)
        MDTRT_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream, callers[index].ready.get(), 0));
      stage_inputs(ctx, c.plan, c.inputs[i], c.input_views[i], *c.source, c.first_rank);
      if (c.options.poison_outputs) poison_outputs(ctx, c.outputs[i]);
      enqueue_program(ctx, *c.resources->programs[i], c.resources->buffers[i], c.input_views[i],
                      c.outputs[i].views, c.rendezvous.get());
      RankResult& result = c.results[i];
      finish_outputs(ctx, c.outputs[i], c.plan.fetch[i], result.host);
      if (c.options.stream_ordered) {
        MDTRT_CUDA_CHECK(cudaEventRecord(c.done[i].get(), ctx.stream));
        c.recorded[i] = true;
        // The caller's own streams wait for this rank's work (hand_over does it for the others,
        // and for these when this rank did not: a call given up on, see caller_gone).
        if (!c.ordering[i].own.empty()) {
          std::lock_guard<std::timed_mutex> lock(c.caller_mutex[i]);
          if (!c.caller_gone) {
            ScopedDevice on(ctx.device);
            for (int index : c.ordering[i].own)
              MDTRT_CUDA_CHECK(
                  cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(callers[index].stream), c.done[i].get(), 0));
            c.callers_wait[i] = true;
          }
        }
      } else if (!wait_stream(ctx.stream, ctx.deadline)) {
        throw Error(ErrorKind::kTimeout, "the enqueued work did not finish before the deadline", ctx.rank, "infer");
      }
      result.outputs = std::move(c.outputs[i].specs);
      result.device = std::move(c.outputs[i].device);
    } catch (...) {
      if (c.rendezvous) c.rendezvous->fail(ctx);  // no-op once this rank reached its enqueue
      if (i == 0) c.source->fail();  // the others may wait for its staged chunks
      throw;
    }
  };
  const double timeout = options.timeout_seconds > 0 ? options.timeout_seconds : group_->timeout();
  // Stream-ordered: the caller streams wait for every rank's queued work, and the work is handed to
  // the runtime's watchdog with its deadline. Also when the call failed after some rank queued work
  // (another rank's enqueue failed): that work may wait for the failed rank, and must neither be
  // raced by the caller's streams nor left without a deadline (a waiting call would have reached it).
  auto hand_over = [&] {
    bool any = false;
    for (int i = 0; i < n; ++i) any = any || c.recorded[i];
    if (!any) return;
    std::vector<CudaEvent> done;
    std::string failed;
    for (int i = 0; i < n; ++i) {
      // A rank given up on may still record or use its own event later: it keeps that one (in the
      // call's state, which it owns) and the watchdog gets another, recorded here after whatever
      // the rank queued so far.
      const bool abandoned = runtime.abandoned(i);
      done.push_back(abandoned ? runtime.take_event(i) : std::move(c.done[i]));
      if (c.recorded[i] && !abandoned) continue;
      const RankContext& ctx = runtime.context(i);
      ScopedDevice on(ctx.device, std::nothrow);
      const cudaError_t status = on.ok() ? cudaEventRecord(done[i].get(), ctx.stream) : cudaGetLastError();
      if (status != cudaSuccess) failed += std::string(failed.empty() ? "" : ", ") + cudaGetErrorName(status) +
                                           " on rank " + std::to_string(ctx.rank);
    }
    // A rank whose stream cannot even take an event has a failed GPU: the others' queued work may
    // wait for it forever. The events recorded are still handed over (the watchdog, and the caller
    // streams, wait only for work that can finish once the communicators are aborted).
    if (!failed.empty())
      runtime.break_and_abort("a stream-ordered '" + description_ + "' failed on the GPU (" +
                                  failed + ") after other ranks queued their work; the communicators were aborted",
                              ErrorKind::kCuda);
    std::exception_ptr wait_error;  // the work is handed to the watchdog even when a wait failed
    try {
      // Each caller stream waits for the work of every rank that used an array of it: a consumer
      // of an output, and a producer about to overwrite an input that a rank (on its GPU, or
      // copying it to another) still reads, run after that. Only those ranks: a wait on another
      // GPU's event would add a cross-device hop to every call (NCCL guarantees that a peer is
      // done with a rank's buffers when that rank's collective completes). Issued on this (the
      // caller's) thread, so that a legacy or per-thread default stream means the caller's.
      for (const CallerUse& use : call_streams) {
        // A stream its rank already made wait (it says so in callers_wait; a rank that failed or
        // was given up on before then did not, and cannot later: see caller_gone).
        if (use.by_rank && c.callers_wait[use.ranks[0]]) continue;
        const CallerStream& caller = resources_->caller_streams[use.stream];
        ScopedDevice on(caller.device);
        for (int rank : use.ranks)
          MDTRT_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(caller.stream), done[rank].get(), 0));
      }
    } catch (...) {
      wait_error = std::current_exception();
    }
    runtime.add_in_flight(std::move(done), timeout, description_);
    if (wait_error) std::rethrow_exception(wait_error);
  };
  try {
    run_checked_then_launched(runtime, std::move(check), std::move(launch), timeout, "infer", while_ranks_run);
  } catch (...) {
    // From here on no rank touches the caller's streams (they may be gone once this returns); a
    // rank inside such a step finishes it first (CUDA calls that queue work: microseconds).
    c.caller_gone = true;
    // Only a rank given up on can still be running; each gets at least 50 ms, all together 1 s.
    const auto settled_by = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    for (int i = 0; i < n; ++i)
      if (runtime.abandoned(i) &&
          c.caller_mutex[i].try_lock_until(
              std::max(settled_by, std::chrono::steady_clock::now() + std::chrono::milliseconds(50))))
        c.caller_mutex[i].unlock();
    if (stream_ordered) {
      try {
        hand_over();
      } catch (...) {
        // The call's own error is the one to report.
      }
    }
    // Outputs allocated for a call that failed are never handed over: freed once each rank's
    // stream reached their allocation, given up where a stream is stuck (after a deadline). Not
    // those of a rank given up on: its task may still be placing them.
    const Deadline soon = Deadline::after_seconds(runtime.broken() ? 0.0 : 1.0);
    for (int i = 0; i < n; ++i)
      if (!runtime.abandoned(i)) drop_unused_outputs(c.outputs[i], runtime.context(i).stream, soon);
    throw;
  }
  if (stream_ordered) hand_over();
  if (c.rendezvous && !c.rendezvous->failure.empty()) {
    // Every rank ran this call without graphs; later calls do too (a program that failed to capture
    // once would fail again on every new buffer).
    cuda_graphs_ = false;
    std::lock_guard<std::mutex> lock(graph_fallback_mutex_);
    graph_fallback_ = c.rendezvous->failure +
                      "; every rank ran without CUDA graphs instead, and this runner does from now on";
  }
  return std::move(c.results);
}

}  // namespace mdtrt
