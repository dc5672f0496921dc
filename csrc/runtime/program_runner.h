// Runs a RankProgram (a TensorRT engine, a native collective, a test program) on every rank of a
// DeviceGroup: binds it on all ranks at once, then per call replicates inputs, fans the enqueue
// out to every rank's thread, waits with a deadline and hands outputs back.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/device_group.h"
#include "runtime/rank_program.h"

namespace mdtrt {

// How an input that every rank needs gets from one place to every GPU.
enum class Replication {
  kAuto,       // the fastest measured on the machines we have (see choose_replication)
  kHost,       // every rank copies from host memory itself
  kPeer,       // one host copy to the first rank, then peer copies over NVLink/PCIe, pipelined in chunks
  kBroadcast,  // one host copy to the first rank, then ncclBroadcast
};
Replication replication_from_name(const std::string& name);
const char* replication_name(Replication r);

// Chunk of the pipelined host -> first GPU -> peers copy.
constexpr size_t kPeerReplicationChunkBytes = 4 << 20;

struct InputArg {
  const void* data = nullptr;
  int device = -1;  // CUDA device holding `data`; -1 for host memory
  DType dtype = DType::kFloat32;
  Shape shape;
  // The producer's stream on `device` (0: none to order with): the rank reads `data` only after
  // the work already queued there. (Nothing is needed after the call: it returns once every rank
  // has finished.)
  uintptr_t stream = 0;
  size_t nbytes() const { return static_cast<size_t>(element_count(shape)) * dtype_size(dtype); }
};

// A caller-provided output buffer on the rank's GPU (outputs without an allocation per call).
struct OutputArg {
  std::string name;
  void* data = nullptr;
  size_t nbytes = 0;
  int device = -1;
  uintptr_t stream = 0;  // the caller's stream on `device`: earlier work there is done before the rank writes
};

struct InferOptions {
  Replication replication = Replication::kAuto;
  bool poison_outputs = false;     // fill outputs with 0xFF bytes first (NaN for floats, -1 for ints)
  std::vector<int> fetch_ranks;    // local ranks whose outputs are copied to host memory
  bool device_outputs = false;     // hand every rank's output device buffers to the caller
  double timeout_seconds = 0;      // 0: the group's timeout
  // outputs[i]: where local rank i writes the outputs named there; others are allocated by the runner.
  std::vector<std::vector<OutputArg>> outputs;
};

struct RankResult {
  std::vector<TensorSpec> outputs;
  std::vector<std::vector<uint8_t>> host;              // per output, when fetched
  std::vector<std::shared_ptr<DeviceBuffer>> device;   // per output, when device_outputs
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
  // Per local rank: graphs captured so far (tests and benchmarks check that replays happen).
  std::vector<int> graph_captures() const;
  // Why CUDA graphs were switched off for this runner ("" while they were not): a capture failed on
  // a rank, and every local rank then ran that call, and runs every later one, without graphs.
  std::string graph_fallback() const;
  ~ProgramRunner();

  // inputs[i] are local rank i's inputs, in the program's input order. The same host pointer on
  // every rank means "replicate"; a device pointer on another GPU is copied peer-to-peer.
  std::vector<RankResult> infer(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options);

  Replication last_replication() const { return last_replication_; }
  std::vector<TensorSpec> input_specs(int local_index);
  RankProgram& program(int local_index) { return *programs_.at(local_index); }
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
  void enqueue_program(RankContext& ctx, RankBuffers& bufs, const std::vector<TensorView>& inputs,
                       const std::vector<TensorView>& outputs, GraphRendezvous* rendezvous);

  std::shared_ptr<DeviceGroup> group_;
  std::vector<std::shared_ptr<RankProgram>> programs_;
  std::vector<std::vector<TensorSpec>> input_specs_;  // per local rank, read after bind
  std::vector<RankBuffers> buffers_;
  // One event per caller stream seen (device, stream), reused across calls.
  struct CallerStream {
    int device;
    uintptr_t stream;
    CudaEvent ready;
    bool pending;  // this call: the stream had unfinished work, recorded in `ready`
  };
  std::vector<CallerStream> caller_streams_;
  std::mutex infer_mutex_;  // one call at a time: calls share the staging buffers
  int abort_hook_ = -1;
  bool cuda_graphs_ = false;
  std::string graph_fallback_;
  Replication last_replication_ = Replication::kHost;
};

Replication choose_replication(Replication requested);

}  // namespace mdtrt
