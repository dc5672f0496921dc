#include "runtime/program_runner.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>

#include "common/error.h"
#include "nccl/nccl_library.h"

namespace mdtrt {
namespace {

constexpr const char* kReplicationNames[] = {"auto", "host", "peer", "broadcast"};

// Progress of the first rank's host-to-device copy of one replicated input, for the other ranks'
// threads: a rank may only wait on a chunk's CUDA event after the event was recorded, or the wait
// is a no-op and the peer copy reads stale memory (the bug class that made others give up peer
// copies of IO buffers).
struct StagingProgress {
  std::mutex mutex;
  std::condition_variable changed;
  int chunks_recorded = 0;
  bool source_failed = false;

  void publish(int chunks) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      chunks_recorded = chunks;
    }
    changed.notify_all();
  }
  void fail() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      source_failed = true;
    }
    changed.notify_all();
  }
  // Waits until chunk `c` was recorded; false on the deadline.
  void wait_for_chunk(int c, const Deadline& deadline, int rank) {
    std::unique_lock<std::mutex> lock(mutex);
    bool ok = changed.wait_until(lock, deadline.at(), [&] { return source_failed || chunks_recorded > c; });
    if (source_failed)
      throw Error(ErrorKind::kGeneric, "the first rank failed while staging a replicated input", rank, "infer");
    if (!ok)
      throw Error(ErrorKind::kTimeout, "waited past the deadline for the first rank to stage a replicated input",
                  rank, "infer");
  }
};

}  // namespace

Replication replication_from_name(const std::string& name) {
  for (int i = 0; i < 4; ++i)
    if (name == kReplicationNames[i]) return static_cast<Replication>(i);
  throw_invalid_argument("unknown replication '" + name + "' (known: auto, host, peer, broadcast)");
}

const char* replication_name(Replication r) { return kReplicationNames[static_cast<int>(r)]; }

Replication choose_replication(Replication requested) {
  // On 2x H200 (NVLink, a PCIe link per GPU) every GPU copying from host memory itself was the
  // fastest of the three at every size from 1 KiB to 1 GiB, pinned or pageable, or within 2% of
  // the peer path (BENCHMARKS.md, section 3): the host links work in parallel and the peer path
  // adds a hop. Peer copies stay available for machines whose GPUs share host links.
  return requested == Replication::kAuto ? Replication::kHost : requested;
}

void bind_programs(RankRuntime& runtime, const std::vector<std::shared_ptr<RankProgram>>& programs,
                   double timeout_seconds, bool sequential) {
  if (static_cast<int>(programs.size()) != runtime.num_local_ranks())
    throw_invalid_argument("one program per local rank is needed: got " + std::to_string(programs.size()) +
                           " for " + std::to_string(runtime.num_local_ranks()) + " ranks");
  int hook = runtime.add_abort_hook([programs] {
    for (auto& p : programs) p->abort();
  });
  try {
    runtime.run_on_all([&programs](RankContext& ctx) { programs[ctx.local_index]->bind(ctx); }, timeout_seconds,
                       "bind", sequential);
  } catch (...) {
    runtime.remove_abort_hook(hook);
    throw;
  }
  runtime.remove_abort_hook(hook);
}

ProgramRunner::ProgramRunner(std::shared_ptr<DeviceGroup> group, std::vector<std::shared_ptr<RankProgram>> programs,
                             bool sequential_bind)
    : group_(std::move(group)), programs_(std::move(programs)), buffers_(group_->num_local_ranks()) {
  bind_programs(group_->runtime(), programs_, group_->timeout(), sequential_bind);
  // Inputs are fixed once bound (an engine's IO does not change): read them once, not per call.
  for (int i = 0; i < group_->num_local_ranks(); ++i)
    input_specs_.push_back(programs_[i]->input_specs(group_->runtime().context(i)));
  auto programs_copy = programs_;
  abort_hook_ = group_->runtime().add_abort_hook([programs_copy] {
    for (auto& p : programs_copy) p->abort();
  });
}

ProgramRunner::~ProgramRunner() {
  if (abort_hook_ >= 0) group_->runtime().remove_abort_hook(abort_hook_);
}

std::vector<TensorSpec> ProgramRunner::input_specs(int local_index) { return input_specs_.at(local_index); }

void ProgramRunner::set_cuda_graphs(bool on) {
  std::lock_guard<std::mutex> call_lock(infer_mutex_);
  cuda_graphs_ = on;
  if (on) graph_fallback_.clear();
  for (auto& b : buffers_) b.graph = RankGraph{};
}

std::string ProgramRunner::graph_fallback() const { return graph_fallback_; }

std::vector<int> ProgramRunner::graph_captures() const {
  std::vector<int> out;
  for (const auto& b : buffers_) out.push_back(b.graph.captures);
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

void ProgramRunner::enqueue_program(RankContext& ctx, RankBuffers& bufs, const std::vector<TensorView>& inputs,
                                    const std::vector<TensorView>& outputs, GraphRendezvous* rendezvous) {
  RankProgram& program = *programs_[ctx.local_index];
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

std::vector<RankResult> ProgramRunner::infer(const std::vector<std::vector<InputArg>>& inputs,
                                             const InferOptions& options) {
  std::lock_guard<std::mutex> call_lock(infer_mutex_);
  RankRuntime& runtime = group_->runtime();
  const int n = runtime.num_local_ranks();
  if (static_cast<int>(inputs.size()) != n)
    throw_invalid_argument("inputs for " + std::to_string(inputs.size()) + " ranks given, this group has " +
                           std::to_string(n) + " local ranks");
  const size_t num_inputs = inputs[0].size();
  for (int i = 0; i < n; ++i) {
    const auto& specs = input_specs_[i];
    if (inputs[i].size() != specs.size()) {
      std::string names;
      for (auto& s : specs) names += (names.empty() ? "" : ", ") + s.name;
      throw_invalid_argument("rank " + std::to_string(runtime.ranks()[i]) + " got " + std::to_string(inputs[i].size()) +
                             " inputs; the program takes " + std::to_string(specs.size()) + " (" + names + ")");
    }
    for (size_t k = 0; k < specs.size(); ++k) {
      if (inputs[i][k].dtype != specs[k].dtype)
        throw_invalid_argument("input '" + specs[k].name + "' has dtype " + dtype_name(inputs[i][k].dtype) +
                               " but the program expects " + dtype_name(specs[k].dtype));
    }
  }
  for (int f : options.fetch_ranks)
    if (f < 0 || f >= n) throw_invalid_argument("fetch rank " + std::to_string(f) + " is not a local rank");

  // Which inputs are one host tensor for every rank, and how each travels.
  std::vector<Replication> modes(num_inputs, Replication::kHost);
  for (size_t k = 0; k < num_inputs; ++k) {
    bool replicated = n > 1 && inputs[0][k].device < 0;
    for (int i = 1; i < n && replicated; ++i)
      replicated = inputs[i][k].data == inputs[0][k].data && inputs[i][k].device < 0 &&
                   inputs[i][k].shape == inputs[0][k].shape;
    if (!replicated) continue;
    modes[k] = choose_replication(options.replication);
    if (modes[k] == Replication::kPeer && !group_->all_peer_access())
      throw_invalid_argument("replication='peer' needs peer access between every pair of GPUs in the group, "
                             "which this machine does not give (see `python -m mdtrt doctor`); use 'host' or 'auto'");
    if (modes[k] == Replication::kBroadcast && n != group_->world_size())
      throw_invalid_argument("replication='broadcast' needs every rank in this process; use 'host'");
    last_replication_ = modes[k];
  }

  // The caller's arrays are stream-ordered: each rank reads (and writes) them only after the work
  // already queued on their streams; a producer's pending kernel is otherwise raced by the rank
  // streams, which are non-blocking. A stream found idle needs no event (the common case in a loop
  // of calls, each of which returns only once the ranks are done, so nothing needs ordering after).
  if (caller_streams_.size() > 64) caller_streams_.clear();  // streams come and go; keep the list short
  std::vector<std::vector<int>> rank_waits(n);                // per rank: indices into caller_streams_
  std::vector<int> checked;
  auto order_after = [&](int rank, int device, uintptr_t stream) {
    if (stream == 0 || device < 0) return;
    int index = -1;
    for (size_t c = 0; c < caller_streams_.size() && index < 0; ++c)
      if (caller_streams_[c].device == device && caller_streams_[c].stream == stream) index = static_cast<int>(c);
    if (index < 0) {
      caller_streams_.push_back(CallerStream{device, stream, CudaEvent(device, false), false});
      index = static_cast<int>(caller_streams_.size()) - 1;
    }
    CallerStream& c = caller_streams_[index];
    if (std::find(checked.begin(), checked.end(), index) == checked.end()) {
      checked.push_back(index);
      ScopedDevice on(c.device);
      auto handle = reinterpret_cast<cudaStream_t>(c.stream);
      const cudaError_t status = cudaStreamQuery(handle);
      if (status != cudaSuccess && status != cudaErrorNotReady) throw_cuda_error(status, "cudaStreamQuery");
      c.pending = status == cudaErrorNotReady;
      if (c.pending) MDTRT_CUDA_CHECK(cudaEventRecord(c.ready.get(), handle));
    }
    if (c.pending && std::find(rank_waits[rank].begin(), rank_waits[rank].end(), index) == rank_waits[rank].end())
      rank_waits[rank].push_back(index);
  };
  for (int i = 0; i < n; ++i) {
    for (const InputArg& a : inputs[i]) order_after(i, a.device, a.stream);
    if (i < static_cast<int>(options.outputs.size()))
      for (const OutputArg& g : options.outputs[i]) order_after(i, g.device, g.stream);
  }

  std::vector<StagingProgress> progress(num_inputs);
  std::vector<RankResult> results(n);
  std::vector<bool> fetch(n, false);
  for (int f : options.fetch_ranks) fetch[f] = true;

  // Buffers shared across rank threads are sized here, before any thread can read them.
  int max_chunks = 0;
  for (size_t k = 0; k < num_inputs; ++k) {
    if (modes[k] == Replication::kPeer || modes[k] == Replication::kBroadcast)
      max_chunks = std::max<int>(max_chunks, std::max<int>(1, static_cast<int>((inputs[0][k].nbytes() +
                                                                                kPeerReplicationChunkBytes - 1) /
                                                                               kPeerReplicationChunkBytes)));
  }
  for (int i = 0; i < n; ++i)
    if (buffers_[i].inputs.size() < num_inputs) buffers_[i].inputs.resize(num_inputs);
  while (static_cast<int>(buffers_[0].chunk_events.size()) < max_chunks)
    buffers_[0].chunk_events.emplace_back(runtime.devices()[0], false);

  std::unique_ptr<GraphRendezvous> rendezvous;
  if (cuda_graphs_) rendezvous = std::make_unique<GraphRendezvous>(n);

  auto task = [&](RankContext& ctx) {
    const int i = ctx.local_index;
    RankBuffers& bufs = buffers_[i];
    RankProgram& program = *programs_[i];
    cudaStream_t stream = ctx.stream;
    for (int index : rank_waits[i])
      MDTRT_CUDA_CHECK(cudaStreamWaitEvent(stream, caller_streams_[index].ready.get(), 0));

    std::vector<TensorView> views(num_inputs);
    bool staging_source = false;
    try {
      for (size_t k = 0; k < num_inputs; ++k) {
        const InputArg& a = inputs[i][k];
        const size_t bytes = a.nbytes();
        views[k].dtype = a.dtype;
        views[k].shape = a.shape;
        if (a.device == ctx.device) {
          views[k].data = const_cast<void*>(a.data);  // zero copy: already on this GPU
          continue;
        }
        DeviceBuffer& buf = bufs.inputs[k];
        buf.set_device(ctx.device);
        buf.reserve(bytes);
        views[k].data = buf.get();
        if (a.device >= 0) {
          MDTRT_CUDA_CHECK(cudaMemcpyPeerAsync(buf.get(), ctx.device, a.data, a.device, bytes, stream));
          continue;
        }
        const Replication mode = modes[k];
        if (mode == Replication::kHost || (mode == Replication::kBroadcast && i != 0)) {
          if (mode == Replication::kHost)
            MDTRT_CUDA_CHECK(cudaMemcpyAsync(buf.get(), a.data, bytes, cudaMemcpyHostToDevice, stream));
          continue;
        }
        const int chunks = static_cast<int>(std::max<size_t>(1, (bytes + kPeerReplicationChunkBytes - 1) /
                                                                    kPeerReplicationChunkBytes));
        if (i == 0) {
          staging_source = true;
          for (int c = 0; c < chunks; ++c) {
            const size_t off = static_cast<size_t>(c) * kPeerReplicationChunkBytes;
            const size_t len = std::min(kPeerReplicationChunkBytes, bytes - off);
            MDTRT_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(buf.get()) + off,
                                             static_cast<const char*>(a.data) + off, len, cudaMemcpyHostToDevice,
                                             stream));
            MDTRT_CUDA_CHECK(cudaEventRecord(bufs.chunk_events[c].get(), stream));
            progress[k].publish(c + 1);
          }
        } else {  // peer copy chunk by chunk from the first rank, as soon as each chunk is staged
          RankBuffers& source = buffers_[0];
          for (int c = 0; c < chunks; ++c) {
            progress[k].wait_for_chunk(c, ctx.deadline, ctx.rank);
            const size_t off = static_cast<size_t>(c) * kPeerReplicationChunkBytes;
            const size_t len = std::min(kPeerReplicationChunkBytes, bytes - off);
            MDTRT_CUDA_CHECK(cudaStreamWaitEvent(stream, source.chunk_events[c].get(), 0));
            MDTRT_CUDA_CHECK(cudaMemcpyPeerAsync(static_cast<char*>(buf.get()) + off, ctx.device,
                                                 static_cast<const char*>(source.inputs[k].get()) + off,
                                                 source.inputs[k].device(), len, stream));
          }
        }
      }
    } catch (...) {
      if (staging_source || i == 0)
        for (auto& p : progress) p.fail();
      throw;
    }
    for (size_t k = 0; k < num_inputs; ++k) {
      if (modes[k] != Replication::kBroadcast) continue;
      const size_t count = inputs[i][k].nbytes();
      ctx.world->check(nccl::api().Broadcast(views[k].data, views[k].data, count, nccl::kUint8, runtime.ranks()[0],
                                             ctx.world->handle(), stream),
                       "ncclBroadcast", ctx.deadline);
    }

    RankResult& result = results[i];
    result.outputs = program.resolve_outputs(ctx, views);
    const size_t num_outputs = result.outputs.size();
    if (i < static_cast<int>(options.outputs.size())) {
      for (const OutputArg& g : options.outputs[i]) {
        bool known = false;
        for (const auto& spec : result.outputs) known = known || spec.name == g.name;
        if (!known) throw_invalid_argument("a buffer was given for output '" + g.name + "', which the program does not have");
      }
    }
    std::vector<TensorView> out_views(num_outputs);
    if (bufs.outputs.size() < num_outputs) bufs.outputs.resize(num_outputs);
    if (options.device_outputs) result.device.resize(num_outputs);
    for (size_t o = 0; o < num_outputs; ++o) {
      TensorView& v = out_views[o];
      v.dtype = result.outputs[o].dtype;
      v.shape = result.outputs[o].shape;
      for (int64_t d : v.shape)
        if (d < 0)
          throw Error(ErrorKind::kGeneric, "output '" + result.outputs[o].name + "' has an unresolved shape " +
                                               shape_string(v.shape), ctx.rank, "infer");
      const OutputArg* given = nullptr;
      if (i < static_cast<int>(options.outputs.size()))
        for (const OutputArg& g : options.outputs[i])
          if (g.name == result.outputs[o].name) given = &g;
      if (given != nullptr) {
        if (given->device != ctx.device || given->nbytes != v.nbytes())
          throw_invalid_argument("the buffer given for output '" + result.outputs[o].name + "' holds " +
                                 std::to_string(given->nbytes) + " bytes on GPU " + std::to_string(given->device) +
                                 "; this rank needs " + std::to_string(v.nbytes()) + " bytes " +
                                 shape_string(v.shape) + " " + dtype_name(v.dtype) + " on GPU " +
                                 std::to_string(ctx.device));
        v.data = given->data;
      } else if (options.device_outputs) {
        result.device[o] = std::make_shared<DeviceBuffer>(ctx.device, v.nbytes());
        v.data = result.device[o]->get();
      } else {
        bufs.outputs[o].set_device(ctx.device);
        bufs.outputs[o].reserve(v.nbytes());
        v.data = bufs.outputs[o].get();
      }
      if (options.poison_outputs) MDTRT_CUDA_CHECK(cudaMemsetAsync(v.data, 0xFF, v.nbytes(), stream));
    }

    enqueue_program(ctx, bufs, views, out_views, rendezvous.get());

    if (fetch[i]) {
      result.host.resize(num_outputs);
      for (size_t o = 0; o < num_outputs; ++o) {
        result.host[o].resize(out_views[o].nbytes());
        MDTRT_CUDA_CHECK(cudaMemcpyAsync(result.host[o].data(), out_views[o].data, out_views[o].nbytes(),
                                         cudaMemcpyDeviceToHost, stream));
      }
    }
    if (!wait_stream(stream, ctx.deadline))
      throw Error(ErrorKind::kTimeout, "the enqueued work did not finish before the deadline", ctx.rank, "infer");
  };

  const double timeout = options.timeout_seconds > 0 ? options.timeout_seconds : group_->timeout();
  runtime.run_on_all(
      [&](RankContext& ctx) {
        try {
          task(ctx);
        } catch (...) {
          if (rendezvous) rendezvous->fail(ctx);  // no-op once this rank reached its enqueue
          throw;
        }
      },
      timeout, "infer");
  if (rendezvous && !rendezvous->failure.empty()) {
    // Every rank ran this call without graphs; later calls do too (a program that failed to capture
    // once would fail again on every new buffer).
    cuda_graphs_ = false;
    graph_fallback_ = rendezvous->failure +
                      "; every rank ran without CUDA graphs instead, and this runner does from now on";
  }
  return results;
}

}  // namespace mdtrt
