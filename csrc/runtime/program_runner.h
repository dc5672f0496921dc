// Runs a RankProgram (a TensorRT engine, a native collective, a test program) on every rank of a
// DeviceGroup: binds it on all ranks at once; per call, plans it (runtime/call_plan.h), lets every
// rank check its arguments and allocate, and only then, on every rank at once, stages the inputs
// (runtime/replication.h), enqueues the program, handles the outputs (runtime/rank_outputs.h)
// and waits with a deadline.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/call_plan.h"
#include "runtime/device_group.h"
#include "runtime/memory_pool.h"
#include "runtime/rank_program.h"

namespace mdtrt {

struct RankResult {
  std::vector<TensorSpec> outputs;
  std::vector<std::vector<uint8_t>> host;              // per output, when fetched
  std::vector<std::shared_ptr<PooledBuffer>> device;   // per output, when device_outputs
};

// Binds programs[i] on local rank i, all ranks at once (or one after another when `sequential`,
// which deadlocks a collective bind: that switch exists to prove the deadline catches it).
void bind_programs(RankRuntime& runtime, const std::vector<std::shared_ptr<RankProgram>>& programs,
                   double timeout_seconds, bool sequential);

class ProgramRunner {
 public:
  ProgramRunner(std::shared_ptr<DeviceGroup> group, std::vector<std::shared_ptr<RankProgram>> programs,
                bool sequential_bind = false);

  // With CUDA graphs on, each rank captures its program's enqueue into a graph the second time it
  // sees the same buffers and shapes, and replays it while they stay the same: one launch instead
  // of one per kernel, for small latency-bound engines. Off by default.
  void set_cuda_graphs(bool on);
  bool cuda_graphs() const { return cuda_graphs_; }
  // Per local rank: graphs captured so far (tests and benchmarks check that replays happen). Waits
  // for a call in progress (its rank threads count the captures).
  std::vector<int> graph_captures();
  // Why CUDA graphs were switched off for this runner ("" while they were not): a capture failed on
  // a rank, and every local rank then ran that call, and runs every later one, without graphs.
  std::string graph_fallback() const;
  ~ProgramRunner();

  // inputs[i] are local rank i's inputs, in the program's input order. The same host pointer on
  // every rank means "replicate"; a device pointer on another GPU is copied peer-to-peer.
  std::vector<RankResult> infer(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options);
  // The checks and decisions of a call, made once for arguments that are used again (prepare()).
  CallPlan plan(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options);
  // A call planned by plan() for these same inputs and options (options.outputs may differ).
  // `while_ranks_run`: the caller's own work done while its ranks check the call; they launch
  // once it returned (run_checked_then_launched); it must not wait for them. When it throws, no
  // rank launches and the call fails with what it threw (after a rank's own error).
  std::vector<RankResult> run(const CallPlan& plan, const std::vector<std::vector<InputArg>>& inputs,
                              const InferOptions& options, const std::function<void()>& while_ranks_run = {});

  Replication last_replication() const { return last_replication_; }
  std::vector<TensorSpec> input_specs(int local_index);
  RankProgram& program(int local_index) { return *resources_->programs.at(local_index); }
  DeviceGroup& group() { return *group_; }

 private:
  // The last enqueue's buffers and shapes, and its graph once captured.
  struct RankGraph {
    std::vector<const void*> pointers;
    std::vector<Shape> shapes;
    bool seen_once = false;
    CudaGraphExec exec;
    int captures = 0;
  };
  struct RankBuffers {
    std::vector<DeviceBuffer> inputs;
    std::vector<DeviceBuffer> outputs;
    std::vector<CudaEvent> chunk_events;  // on this rank's device, signalling staged input chunks
    RankGraph graph;
  };
  struct GraphRendezvous;
  static void enqueue_program(RankContext& ctx, RankProgram& program, RankBuffers& bufs,
                              const std::vector<TensorView>& inputs, const std::vector<TensorView>& outputs,
                              GraphRendezvous* rendezvous);
  // A caller stream of one call (index into caller_streams_) and the local ranks that read or
  // write an array of it. by_rank: its one rank, on the stream's GPU, orders itself after the
  // stream and (stream-ordered) the stream after its work, on its own thread.
  struct CallerUse {
    int stream;
    std::vector<int> ranks;
    bool by_rank = false;
  };
  // How each local rank orders its work after the caller's streams (indices into caller_streams_)
  // before it touches the caller's arrays.
  struct RankOrdering {
    std::vector<int> wait;      // streams whose ready event the caller recorded: the rank waits for it
    std::vector<int> own;       // streams of the rank's GPU used by it alone: it records and waits itself
  };
  // `used` gets every caller stream of the call.
  std::vector<RankOrdering> order_after_callers(const std::vector<std::vector<InputArg>>& inputs,
                                                const InferOptions& options, std::vector<CallerUse>& used);

  // One event per caller stream seen (device, stream), reused across calls.
  struct CallerStream {
    int device;
    uintptr_t stream;
    CudaEvent ready;  // recorded on the stream once per call that uses it
  };
  // What the rank tasks use across calls, shared with them: a rank given up on at a deadline
  // (RankRuntime::run_on_all) runs on after the call threw and this runner may be gone.
  struct Resources {
    std::vector<std::shared_ptr<RankProgram>> programs;
    std::vector<RankBuffers> buffers;
    std::vector<CallerStream> caller_streams;
  };
  // One call's state, shared the same way (defined in the .cpp).
  struct Call;

  std::shared_ptr<DeviceGroup> group_;
  std::shared_ptr<Resources> resources_;
  std::vector<std::vector<TensorSpec>> input_specs_;  // per local rank, read after bind
  // The program's describe(), read once: every stream-ordered call names it to the watchdog, and
  // an engine's is formatted with a stream (about a microsecond a call).
  std::string description_;
  // The last call's state, reused by the next one unless a task given up on still holds it.
  std::shared_ptr<Call> call_;
  std::mutex infer_mutex_;  // one call at a time: calls share the staging buffers
  int abort_hook_ = -1;
  // Written by calls (under infer_mutex_, held for a whole call), read from Python without it: a
  // property read while another thread's call runs must neither wait for that call nor race it.
  std::atomic<bool> cuda_graphs_{false};
  std::atomic<Replication> last_replication_{Replication::kHost};
  mutable std::mutex graph_fallback_mutex_;
  std::string graph_fallback_;  // under graph_fallback_mutex_
};

// A call whose arguments were checked and planned once: run() repeats it on the same buffers.
class PreparedInfer {
 public:
  PreparedInfer(std::shared_ptr<ProgramRunner> runner, std::vector<std::vector<InputArg>> inputs,
                InferOptions options);
  std::vector<RankResult> run() { return runner_->run(plan_, inputs_, options_); }
  // With other output buffers for this call (fresh outputs per call); same shape of list.
  // stream_ordered: as InferOptions::stream_ordered, for this run (a call prepared before its
  // outputs could be given, an engine's first, runs waiting; later ones need not).
  std::vector<RankResult> run(std::vector<std::vector<OutputArg>> outputs, bool stream_ordered = false);
  // The call as prepared (its arrays, and the outputs given when it was prepared), stream-ordered
  // (see InferOptions::stream_ordered). Its plan is made by the first such run and kept: nothing
  // it depends on changes between runs, and a prepared call's loop then plans nothing per call.
  std::vector<RankResult> run_stream_ordered();
  // The same call on other arrays of the same dtypes, shapes and devices: addresses[i][k] is local
  // rank i's input k (data, producer stream). The one-shot entry points (DeviceGroup.collective,
  // EngineRunner.infer) keep one prepared call per argument signature and run it this way, so that
  // a call passes only its addresses and outputs (the plan is redone natively: host inputs
  // shared by every rank are found by their addresses); the later calls of a signature of torch
  // CUDA tensors run it through an AddressedRun instead.
  std::vector<RankResult> run_at(const std::vector<std::vector<InputAddress>>& addresses,
                                 std::vector<std::vector<OutputArg>> outputs, bool stream_ordered = false);
  // The argument lists of a run_at with these outputs, for AddressedRun: the prepared inputs, and
  // options whose outputs are named `names` on every rank with `nbytes` and `devices` (rank by rank)
  // and no addresses yet.
  std::vector<std::vector<InputArg>> inputs() const { return inputs_; }
  InferOptions options_with_outputs(const std::vector<std::string>& names, const std::vector<size_t>& nbytes,
                                    const std::vector<int>& devices, bool stream_ordered) const;
  ProgramRunner& runner() { return *runner_; }
  // Whether a run that failed may leave work that still uses its arrays: a rank of the group was
  // given up on (RankRuntime::any_abandoned), or the group broke (a deadline, an interrupt, a
  // failure on a GPU: kernels already queued by a blocking call, an engine's or a copy, are not
  // ended by aborting the communicators). The arrays of that run are then never to be freed. Not
  // when the group was only closed: a run refused for that queued nothing.
  bool arrays_may_be_in_use() const {
    const RankRuntime& runtime = runner_->group().runtime();
    return runtime.any_abandoned() || runtime.broken_by_failure();
  }

 private:
  // The prepared options with this run's outputs and mode.
  InferOptions options_for(std::vector<std::vector<OutputArg>> outputs, bool stream_ordered) const;

  std::shared_ptr<ProgramRunner> runner_;
  std::vector<std::vector<InputArg>> inputs_;
  InferOptions options_;
  CallPlan plan_;
  // run_stream_ordered's options and plan, made by its first run that could plan (under the mutex:
  // two threads may run one prepared call).
  std::mutex ordered_mutex_;
  std::unique_ptr<const InferOptions> ordered_options_;
  std::unique_ptr<const CallPlan> ordered_plan_;
};

// A PreparedInfer's run_at with every output given, whose outputs' names, sizes and GPUs and whose
// stream ordering are fixed once: each run passes only the addresses and streams of its inputs and
// outputs. The one-shot entry points (DeviceGroup.collective and the op methods, EngineRunner.infer,
// a prepared call's run into new outputs) keep one per argument signature, so that a run converts
// two lists of integers and builds no argument lists; with every input on a device the plan does
// not depend on addresses and is made once (what does, null data and missing streams, is checked
// per run).
class AddressedRun {
 public:
  // names: each rank's outputs, the same on every rank; nbytes and devices: every output's, rank
  // by rank in the order of names. Throws InvalidArgument for lists that do not fit together.
  AddressedRun(std::shared_ptr<PreparedInfer> call, const std::vector<std::string>& names,
               const std::vector<size_t>& nbytes, const std::vector<int>& devices, bool stream_ordered);
  // pointers and streams: each rank's inputs in turn (data, producer stream), then each rank's
  // outputs in turn (data, caller stream; in the order of names). The caller holds every array.
  // `while_ranks_run`: as ProgramRunner::run's (a one-shot call allocates the next call's outputs
  // there, while its ranks check this one).
  void run(const std::vector<uintptr_t>& pointers, const std::vector<uintptr_t>& streams,
           const std::function<void()>& while_ranks_run = {});
  bool arrays_may_be_in_use() const { return call_->arrays_may_be_in_use(); }

 private:
  // Writes the addresses into inputs and options (sized as inputs_ and options_).
  void address(const std::vector<uintptr_t>& pointers, const std::vector<uintptr_t>& streams,
               std::vector<std::vector<InputArg>>& inputs, InferOptions& options) const;
  // Whether `plan_` holds for these addressed arguments: every input on a device (made from the
  // arguments' dtypes, shapes and devices alone), and no null data or missing stream that
  // plan_call would refuse.
  bool plan_holds(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options) const;

  std::shared_ptr<PreparedInfer> call_;
  // The arguments without addresses, never written after construction: a run finding mutex_ taken
  // (another thread's run of the same call) copies these instead of waiting. Not inputs_ and
  // options_, which that other run may be rewriting meanwhile.
  const std::vector<std::vector<InputArg>> unaddressed_inputs_;
  const InferOptions unaddressed_options_;
  size_t input_count_ = 0;   // inputs of all ranks
  size_t output_count_ = 0;  // outputs of all ranks
  // The arguments, rewritten with each run's addresses (under mutex_: the runner copies them into
  // the call's state, which it reuses: no argument list is allocated per run).
  std::mutex mutex_;
  std::vector<std::vector<InputArg>> inputs_;
  InferOptions options_;
  bool all_on_device_ = false;
  std::unique_ptr<const CallPlan> plan_;  // under mutex_; made by the first run that could plan
};

}  // namespace mdtrt
