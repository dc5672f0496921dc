// sample_dist_collective: NVIDIA's sampleDistCollective on mdtrt's C++ core. Builds (or, for the
// nccl backend, emulates) the network input -> transpose -> DistCollective -> transpose -> output on
// every rank, checks each rank's output against a host reference, and optionally times it.
#include <glob.h>
#include <limits.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <cuda.h>

#include "backend.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "host_reference.h"
#include "nccl/communicator.h"
#include "nccl/nccl_library.h"
#include "nccl/unique_id_file.h"
#include "options.h"
#include "runtime/cuda_handles.h"
#include "runtime/device_group.h"
#include "runtime/devices.h"
#include "runtime/program_runner.h"

namespace sample_dc {
namespace {

using mdtrt::CollectiveOp;
using mdtrt::DType;

// The launcher's processes write to one terminal: each line goes out in one write, so lines of
// different ranks never interleave mid-line.
void log_line(const char* level, const std::string& text) {
  std::string line = std::string("[") + level + "] " + text + "\n";
  std::fwrite(line.data(), 1, line.size(), level[0] == 'E' ? stderr : stdout);
  std::fflush(level[0] == 'E' ? stderr : stdout);
}
void info(const std::string& text) { log_line("I", text); }
void error(const std::string& text) { log_line("E", text); }

// TensorRT's own log (errors, warnings, info), as NVIDIA's sample prints it: after each step, and
// before an error is reported, so that TensorRT's reason precedes mdtrt's message.
void print_tensorrt_log() {
  for (const auto& [level, text] : drain_tensorrt_log()) {
    const char tag[2] = {level, '\0'};
    log_line(tag, "[TRT] " + text);
  }
}

// Under a launcher every rank runs the plan rank 0 built; it waits this long for it at most (a
// build takes longer than a collective step, so --timeout alone would be too short). The bind's own
// deadline (--timeout) starts once the plan is here.
constexpr double kPlanWaitSeconds = 900;

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (int x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

// Transposes a row-major [rows, cols] matrix of `esize`-byte elements, bytes untouched.
std::vector<uint8_t> transpose_bytes(const std::vector<uint8_t>& in, int64_t rows, int64_t cols, size_t esize) {
  std::vector<uint8_t> out(in.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      std::memcpy(out.data() + (c * rows + r) * esize, in.data() + (r * cols + c) * esize, esize);
  return out;
}

// nccl-tests' convention: the bytes an op's "size" counts, and the bus factor that turns algorithm
// bandwidth into the per-link traffic a ring would carry.
double op_bytes(CollectiveOp op, double input_bytes, int n) {
  return (op == CollectiveOp::kAllGather || op == CollectiveOp::kGather) ? input_bytes * n : input_bytes;
}
double bus_factor(CollectiveOp op, int n) {
  switch (op) {
    case CollectiveOp::kAllReduce: return 2.0 * (n - 1) / n;
    case CollectiveOp::kBroadcast:
    case CollectiveOp::kReduce: return 1.0;
    default: return static_cast<double>(n - 1) / n;  // all_gather, reduce_scatter, all_to_all, gather, scatter
  }
}

struct OpSummary {
  CollectiveOp op{};
  int checked = 0;
  int failed = 0;
  int not_checked = 0;
  std::string output_shape;
  double median_ms = -1;  // < 0: not timed
  double algbw = 0, busbw = 0;
};

// Holds a stream until release(), so that a batch of timed runs is queued before the GPU starts on
// it: the CUDA events then time the GPU, not the host's launch rate (an idle stream records the
// start event at once and the collective only when the host gets to it). Uses cuStreamWaitValue32
// on a mapped host word; without it (old driver) timing goes on ungated and says so.
class StreamGate {
 public:
  explicit StreamGate(cudaStream_t stream) : stream_(stream) {
    cudaDriverEntryPointQueryResult found{};
    void* fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess || fn == nullptr) {
      cudaGetLastError();
      return;
    }
    wait_value_ = reinterpret_cast<WaitValue>(fn);
    MDTRT_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&word_), sizeof(uint32_t), cudaHostAllocMapped));
    *word_ = 0;
    MDTRT_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_word_), word_, 0));
  }
  ~StreamGate() {
    if (word_ == nullptr) return;
    open_all();  // never leave a stream waiting for a release that will not come
    // The GPU may still read the word: free it only once the stream drained; a stream stuck past the
    // deadline (a dead peer) keeps it, a few bytes leaked rather than a wait without end.
    try {
      if (mdtrt::wait_stream(stream_, mdtrt::Deadline::after_seconds(kDrainSeconds))) cudaFreeHost(word_);
    } catch (const std::exception&) {
    }
  }
  StreamGate(const StreamGate&) = delete;
  StreamGate& operator=(const StreamGate&) = delete;

  bool available() const { return word_ != nullptr; }
  void hold() {
    if (!available()) return;
    ++target_;
    if (wait_value_(reinterpret_cast<CUstream>(stream_), static_cast<CUdeviceptr>(device_word_), target_,
                    CU_STREAM_WAIT_VALUE_GEQ) != CUDA_SUCCESS)
      throw mdtrt::Error(mdtrt::ErrorKind::kCuda, "cuStreamWaitValue32 failed", -1, "timing gate");
  }
  void release() {
    if (available()) __atomic_store_n(word_, target_, __ATOMIC_SEQ_CST);
  }

 private:
  using WaitValue = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
  void open_all() { __atomic_store_n(word_, 0xFFFFFFFFu, __ATOMIC_SEQ_CST); }
  cudaStream_t stream_;
  WaitValue wait_value_ = nullptr;
  uint32_t* word_ = nullptr;
  uintptr_t device_word_ = 0;
  uint32_t target_ = 0;
  static constexpr double kDrainSeconds = 30;
};

// Runs per batch: small enough that NCCL never runs out of queue space while the stream is held.
constexpr int kTimedBatch = 16;

// Runs warmup + iters back to back on every local rank (after the first iteration the ranks are in
// lockstep: each collective ends together everywhere) and returns the median over iterations of the
// slowest member rank's CUDA-event time, in milliseconds; < 0 when no local rank is a member.
double time_op(mdtrt::DeviceGroup& group, mdtrt::ProgramRunner& runner, const std::vector<std::vector<uint8_t>>& inputs,
               const mdtrt::Shape& input_shape, DType dtype, const std::vector<bool>& member, const Options& options) {
  mdtrt::RankRuntime& runtime = group.runtime();
  const int n = runtime.num_local_ranks();
  std::vector<std::vector<float>> elapsed(n);
  std::vector<char> gated(n, 1);  // char: rank threads write their own entries at once
  runtime.run_on_all(
      [&](mdtrt::RankContext& ctx) {
        const int i = ctx.local_index;
        if (!member[i]) return;
        mdtrt::RankProgram& program = runner.program(i);
        mdtrt::DeviceBuffer in(ctx.device, inputs[i].size());
        MDTRT_CUDA_CHECK(
            cudaMemcpyAsync(in.get(), inputs[i].data(), inputs[i].size(), cudaMemcpyHostToDevice, ctx.stream));
        std::vector<mdtrt::TensorView> in_views{mdtrt::TensorView{in.get(), dtype, input_shape}};
        const auto specs = program.resolve_outputs(ctx, in_views);
        std::vector<mdtrt::DeviceBuffer> outs;
        std::vector<mdtrt::TensorView> out_views;
        for (const auto& s : specs) {
          mdtrt::TensorView v{nullptr, s.dtype, s.shape};
          outs.emplace_back(ctx.device, v.nbytes());
          v.data = outs.back().get();
          out_views.push_back(v);
        }
        for (int w = 0; w < options.warmup; ++w) program.enqueue(ctx, in_views, out_views);
        std::vector<mdtrt::CudaEvent> starts, stops;
        for (int it = 0; it < options.iters; ++it) {
          starts.emplace_back(ctx.device, true);
          stops.emplace_back(ctx.device, true);
        }
        StreamGate gate(ctx.stream);
        gated[i] = gate.available();
        for (int first = 0; first < options.iters; first += kTimedBatch) {
          gate.hold();
          for (int it = first; it < std::min(options.iters, first + kTimedBatch); ++it) {
            MDTRT_CUDA_CHECK(cudaEventRecord(starts[it].get(), ctx.stream));
            program.enqueue(ctx, in_views, out_views);
            MDTRT_CUDA_CHECK(cudaEventRecord(stops[it].get(), ctx.stream));
          }
          gate.release();
        }
        if (!mdtrt::wait_stream(ctx.stream, ctx.deadline))
          throw mdtrt::Error(mdtrt::ErrorKind::kTimeout,
                             "the timed runs did not finish within --timeout " +
                                 std::to_string(static_cast<int>(options.timeout_seconds)) +
                                 " s; raise --timeout or lower --iters",
                             ctx.rank, "timing");
        elapsed[i].resize(options.iters);
        for (int it = 0; it < options.iters; ++it)
          MDTRT_CUDA_CHECK(cudaEventElapsedTime(&elapsed[i][it], starts[it].get(), stops[it].get()));
      },
      options.timeout_seconds, "timing");

  if (std::find(gated.begin(), gated.end(), 0) != gated.end())
    info("timing without a stream gate (cuStreamWaitValue32 unavailable): latencies include host launch time");
  std::vector<double> per_iter;
  for (int it = 0; it < options.iters; ++it) {
    double slowest = -1;
    for (int i = 0; i < n; ++i)
      if (member[i]) slowest = std::max(slowest, static_cast<double>(elapsed[i][it]));
    if (slowest >= 0) per_iter.push_back(slowest);
  }
  if (per_iter.empty()) return -1;
  std::sort(per_iter.begin(), per_iter.end());
  const size_t m = per_iter.size();
  return m % 2 ? per_iter[m / 2] : 0.5 * (per_iter[m / 2 - 1] + per_iter[m / 2]);
}

std::string summary_table(const Options& o, Backend backend, const std::vector<int>& local_ranks,
                          const std::vector<OpSummary>& rows) {
  std::ostringstream t;
  t << "\nSummary: backend " << backend_name(backend) << ", " << mdtrt::dtype_name(o.dtype) << ", input ["
    << o.rows << ", " << o.cols << "] per rank, world " << o.world_size << " ranks";
  if (!o.groups.empty()) t << ", group [" << join(o.groups) << "]";
  t << ", " << (o.original_vectors ? "NVIDIA's original vectors" : "random inputs (seed " + std::to_string(o.seed) + ")")
    << "; ranks in this process: " << join(local_ranks) << "\n";
  t << std::left << std::setw(16) << "op" << std::setw(8) << "result" << std::setw(9) << "checked" << std::setw(14)
    << "output" << std::right << std::setw(13) << "median(us)" << std::setw(14) << "algbw(GB/s)" << std::setw(14)
    << "busbw(GB/s)" << "\n";
  for (const auto& r : rows) {
    const std::string result = r.failed ? "FAILED" : (r.checked ? "PASSED" : "SKIPPED");
    t << std::left << std::setw(16) << mdtrt::collective_op_name(r.op) << std::setw(8) << result << std::setw(9)
      << (std::to_string(r.checked - r.failed) + "/" + std::to_string(r.checked)) << std::setw(14) << r.output_shape
      << std::right << std::fixed;
    if (r.median_ms >= 0)
      t << std::setw(13) << std::setprecision(2) << r.median_ms * 1e3 << std::setw(14) << std::setprecision(3)
        << r.algbw << std::setw(14) << r.busbw;
    else
      t << std::setw(13) << "-" << std::setw(14) << "-" << std::setw(14) << "-";
    t << "\n";
    t.unsetf(std::ios::fixed);
  }
  return t.str();
}

int run(Options& o) {
  // The backend first (it needs no GPU), so that why it was chosen is said on any machine.
  std::string note;
  const Backend backend = choose_backend(o.backend, &note);
  if (!note.empty()) info(note);

  // Then GPUs: on a machine without them that is the message that helps, not a missing NCCL.
  const int visible = mdtrt::visible_gpu_count();
  const int wanted = o.world_size > 0 ? (o.launch == LaunchStyle::kThreadPerGpu ? o.world_size : 1) : 2;
  if (visible == 0) {
    const mdtrt::CudaInfo cuda = mdtrt::query_cuda();
    throw mdtrt::Error(mdtrt::ErrorKind::kInvalidArgument,
                       "no CUDA GPU is visible on this machine; this run needs " + std::to_string(wanted) + ": " +
                           mdtrt::describe_no_gpu(cuda.error, cuda.driver_version, cuda.runtime_version));
  }
  std::vector<int> devices;
  std::vector<int> ranks;
  if (o.launch == LaunchStyle::kThreadPerGpu) {
    if (o.gpus.empty()) {
      if (visible < 2)
        throw mdtrt::Error(mdtrt::ErrorKind::kInvalidArgument,
                           "only " + std::to_string(visible) +
                               " GPU is visible; a collective needs at least 2 (pass --gpus, or launch one process "
                               "per rank on several machines' GPUs)");
      for (int d = 0; d < visible; ++d) o.gpus.push_back(d);
      finish_with_world_size(o, visible);
    }
    devices = o.gpus;
    for (int r = 0; r < o.world_size; ++r) ranks.push_back(r);
  } else {
    int device;
    if (o.gpus.size() == 1) device = o.gpus[0];
    else if (!o.gpus.empty()) device = o.gpus[o.my_rank];
    else if (o.my_rank < visible) device = o.my_rank;  // NVIDIA's sample: rank r on GPU r
    else if (visible == 1) device = 0;                 // the launcher gave each process its own GPU
    else
      throw mdtrt::Error(mdtrt::ErrorKind::kInvalidArgument,
                         "TRT_MY_RANK=" + std::to_string(o.my_rank) + " would run on GPU " +
                             std::to_string(o.my_rank) + " but only " + std::to_string(visible) +
                             " are visible; pass --gpus <id> for this process");
    devices = {device};
    ranks = {o.my_rank};
  }
  mdtrt::validate_devices(devices);

  const auto& nccl = mdtrt::nccl::load_library(site_packages_beside_program("nvidia/nccl/lib"));
  info("NCCL " + mdtrt::version_string(nccl.version) + " from " + nccl.path + " (found by " + nccl.found_by +
       ")");

  std::shared_ptr<mdtrt::DeviceGroup> group;
  mdtrt::nccl::UniqueId id{};
  if (o.launch == LaunchStyle::kThreadPerGpu) {
    group = mdtrt::DeviceGroup::create_local(devices, o.timeout_seconds);
  } else {
    id = mdtrt::exchange_unique_id_via_file(o.nccl_id_file, o.my_rank, mdtrt::Deadline::after_seconds(o.timeout_seconds));
    if (o.my_rank == 0) info("Rank 0 - Generated NCCL ID and wrote to file: " + o.nccl_id_file);
    else info("Rank " + std::to_string(o.my_rank) + " - Read NCCL ID from file: " + o.nccl_id_file);
    try {
      group = mdtrt::DeviceGroup::create_member(devices, ranks, o.world_size, id, o.timeout_seconds);
    } catch (...) {
      // A failed rank 0 leaves no id behind for the next run to trip over.
      if (o.my_rank == 0) mdtrt::remove_unique_id_file(o.nccl_id_file, id);
      throw;
    }
    // Every rank joined the communicator, so every rank has read the id: the file has done its job.
    if (o.my_rank == 0) mdtrt::remove_unique_id_file(o.nccl_id_file, id);
  }
  const int n_local = group->num_local_ranks();
  {
    std::string where;
    for (int i = 0; i < n_local; ++i)
      where += (i ? ", " : "") + std::string("rank ") + std::to_string(ranks[i]) + " on GPU " +
               std::to_string(devices[i]);
    info(std::string("backend ") + backend_name(backend) + ", world of " + std::to_string(o.world_size) +
         " ranks; in this process: " + where);
  }

  const std::vector<int> members = o.members();
  const int group_size = static_cast<int>(members.size());
  const size_t esize = mdtrt::dtype_size(o.dtype);
  std::vector<OpSummary> summaries;
  bool all_passed = true;

  for (CollectiveOp op : o.ops) {
    const mdtrt::CollectiveSpec spec = o.spec(op);
    const std::string op_upper = upper(mdtrt::collective_op_name(op));

    // Every world rank's input: each process computes all of them, to know what it must receive.
    std::vector<HostTensor> world_inputs;
    OriginalVectors original;
    if (o.original_vectors) {
      original = original_vectors(op);
      world_inputs = {original.input[0], original.input[1]};
    } else {
      for (int r = 0; r < o.world_size; ++r)
        world_inputs.push_back(random_input(o.seed, r, o.rows, o.cols, o.dtype, o.reduce, group_size));
    }

    const bool transposed = host_transposes(backend);
    const mdtrt::Shape input_shape = transposed ? mdtrt::Shape{o.cols, o.rows} : mdtrt::Shape{o.rows, o.cols};
    std::vector<std::vector<uint8_t>> local_inputs(n_local);
    std::vector<std::vector<mdtrt::InputArg>> args(n_local);
    for (int i = 0; i < n_local; ++i) {
      const HostTensor& x = world_inputs[ranks[i]];
      local_inputs[i] = encode(transposed ? transpose(x).values : x.values, o.dtype);
      args[i] = {mdtrt::InputArg{local_inputs[i].data(), -1, o.dtype, input_shape}};
    }

    // The engine is built on this process's GPU; under a launcher rank 0 alone builds it and the
    // other ranks read it from a file beside the id file, tagged with this run's NCCL id.
    EngineSource source;
    source.build_device = devices[0];
    const std::string plan_file = o.nccl_id_file + "." + mdtrt::collective_op_name(op) + ".plan";
    if (o.launch == LaunchStyle::kProcessPerRank) {
      source.builds = o.my_rank == 0;
      source.share = [&](const std::vector<uint8_t>* built) -> std::vector<uint8_t> {
        if (built != nullptr) {
          mdtrt::publish_shared_bytes(plan_file, id, *built);
          info("Rank 0 - built the " + op_upper + " engine and shared it in " + plan_file);
          return *built;
        }
        info("Rank " + std::to_string(o.my_rank) + " - waiting for rank 0's " + op_upper + " engine in " + plan_file);
        const auto deadline = mdtrt::Deadline::after_seconds(std::max(kPlanWaitSeconds, o.timeout_seconds));
        for (;;) {
          if (auto plan = mdtrt::try_read_shared_bytes(plan_file, id)) return std::move(*plan);
          if (deadline.passed())
            throw mdtrt::Error(mdtrt::ErrorKind::kTimeout,
                               "rank 0 did not share the " + op_upper + " engine in " + plan_file + " within " +
                                   std::to_string(static_cast<int>(std::max(kPlanWaitSeconds, o.timeout_seconds))) +
                                   " s (did it fail to build? see its output)",
                               o.my_rank, "read engine plan");
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      };
    }
    auto programs = make_programs(backend, spec, o.dtype, o.rows, o.cols, o.world_size, n_local, source);
    print_tensorrt_log();
    mdtrt::ProgramRunner runner(group, programs);
    // The bind is collective: once it returned here, every rank has read the shared plan.
    if (source.share && o.my_rank == 0) std::remove(plan_file.c_str());
    mdtrt::InferOptions infer;
    infer.poison_outputs = true;  // an output NCCL never wrote must not pass by luck
    for (int i = 0; i < n_local; ++i) infer.fetch_ranks.push_back(i);
    infer.timeout_seconds = o.timeout_seconds;
    std::vector<mdtrt::RankResult> results = runner.infer(args, infer);
    print_tensorrt_log();

    OpSummary summary;
    summary.op = op;
    std::vector<bool> member(n_local, false);
    for (int i = 0; i < n_local; ++i) {
      const int rank = ranks[i];
      const std::string who = "Rank " + std::to_string(rank) + " - " + op_upper;
      member[i] = std::find(members.begin(), members.end(), rank) != members.end();
      const Expectation expected = expected_output(spec, world_inputs, o.world_size, rank, o.dtype);
      if (!expected.defined) {
        info(who + " not checked: " + expected.why_undefined);
        ++summary.not_checked;
        continue;
      }
      const mdtrt::Shape out_shape = results[i].outputs.at(0).shape;
      std::vector<uint8_t> got = results[i].host.at(0);
      if (transposed && out_shape.size() == 2) got = transpose_bytes(got, out_shape[0], out_shape[1], esize);
      summary.output_shape =
          "[" + std::to_string(expected.values.rows) + ", " + std::to_string(expected.values.cols) + "]";
      if (o.inject_mismatch) corrupt_first_element(got, o.dtype);

      CheckResult check = check_output(expected, got, o.dtype);
      if (check.passed && o.original_vectors) {
        // NVIDIA's own expected vectors, with its tolerance: proves the host reference and the
        // result agree with the original sample, not only with each other.
        const std::vector<double>& nvidia = original.expected[rank];
        const std::vector<double> got_values = decode(got, o.dtype);
        if (nvidia.empty()) {
          check.passed = false;
          check.first_mismatch = "NVIDIA's sample leaves this rank's output undefined, the reference does not";
        } else if (nvidia.size() != got_values.size()) {
          check.passed = false;
          check.first_mismatch = "NVIDIA's sample expects " + std::to_string(nvidia.size()) + " elements, got " +
                                 std::to_string(got_values.size());
        } else {
          for (size_t k = 0; k < nvidia.size() && check.passed; ++k)
            if (std::abs(got_values[k] - nvidia[k]) > 1e-5) {
              check.passed = false;
              check.first_mismatch = "element " + std::to_string(k) + " differs from NVIDIA's expected output: " +
                                     std::to_string(nvidia[k]) + " expected, got " + std::to_string(got_values[k]);
            }
        }
      }
      ++summary.checked;
      if (check.passed) {
        info(who + " PASSED" + (o.original_vectors ? " (matches NVIDIA's expected output)" : ""));
      } else {
        ++summary.failed;
        all_passed = false;
        error(who + " FAILED: " + check.first_mismatch +
              (check.mismatches > 1 ? " (" + std::to_string(check.mismatches) + " elements differ)" : ""));
      }
    }
    if (summary.output_shape.empty() && !results.empty() && !results[0].outputs.empty()) {
      mdtrt::Shape s = results[0].outputs[0].shape;
      if (transposed && s.size() == 2) std::swap(s[0], s[1]);
      summary.output_shape = mdtrt::shape_string(s);
    }

    if (o.iters > 0) {
      summary.median_ms = time_op(*group, runner, local_inputs, input_shape, o.dtype, member, o);
      if (summary.median_ms > 0) {
        const double bytes = op_bytes(op, static_cast<double>(o.rows * o.cols) * esize, group_size);
        summary.algbw = bytes / (summary.median_ms * 1e-3) / 1e9;
        summary.busbw = summary.algbw * bus_factor(op, group_size);
      }
    }
    for (int i = 0; i < n_local; ++i) {
      // Same closing line as NVIDIA's sample, for logs that look for it.
      if (member[i] && summary.failed == 0)
        info("Rank " + std::to_string(ranks[i]) + " - " + op_upper + " test completed successfully!");
    }
    summaries.push_back(summary);
  }

  const std::string table = summary_table(o, backend, ranks, summaries);
  std::fwrite(table.data(), 1, table.size(), stdout);
  std::fflush(stdout);
  if (!all_passed) {
    error(o.inject_mismatch ? "outputs did not match the host reference (--inject-mismatch corrupted them on purpose)"
                            : "outputs did not match the host reference");
    return kExitMismatch;
  }
  return kExitPassed;
}

std::map<std::string, std::string> launcher_env() {
  std::map<std::string, std::string> env;
  for (const char* name : {"TRT_MY_RANK", "TRT_WORLD_SIZE", "TRT_NCCL_ID_FILE"})
    if (const char* v = std::getenv(name)) env[name] = v;
  return env;
}

// Ctrl-C / kill: the handler only records the signal; every wait of the core polls it (through
// mdtrt::set_interrupt_check), aborts what it waited for and throws kInterrupted.
std::atomic<int> g_signal{0};

extern "C" void on_stop_signal(int signal_number) { g_signal.store(signal_number); }

void handle_stop_signals() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  for (int s : {SIGINT, SIGTERM}) sigaction(s, &action, nullptr);
  mdtrt::set_interrupt_check([] { return g_signal.load() != 0; });
}

}  // namespace
}  // namespace sample_dc

int main(int argc, char** argv) {
  using namespace sample_dc;
  // NVLink multicast can take shared GPUs out of service; keep it off unless the user decided.
  ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  handle_stop_signals();

  const std::string program = argc > 0 ? argv[0] : "sample_dist_collective";
  Options options;
  try {
    options = parse_options(std::vector<std::string>(argv + 1, argv + argc), launcher_env());
    if (options.help) {
      std::cout << help_text(program);
      return kExitPassed;
    }
    if (options.backend == BackendChoice::kTrt && !trt_backend_compiled()) choose_backend(options.backend, nullptr);
  } catch (const UsageError& e) {
    error(e.what());
    error("run " + program + " --help for every option and both launch styles");
    return kExitUsage;
  }

  const std::string who = options.launch == LaunchStyle::kProcessPerRank
                              ? "Rank " + std::to_string(options.my_rank) + " - "
                              : std::string();
  try {
    return run(options);
  } catch (const UsageError& e) {
    print_tensorrt_log();
    error(who + e.what());
    error("run " + program + " --help for every option and both launch styles");
    return kExitUsage;
  } catch (const mdtrt::Error& e) {
    print_tensorrt_log();
    if (e.kind() == mdtrt::ErrorKind::kInterrupted || g_signal.load() != 0) {
      const int s = g_signal.load() != 0 ? g_signal.load() : SIGINT;
      error(who + "stopped by " + (s == SIGTERM ? "SIGTERM" : "SIGINT") + ": " + e.what());
      return 128 + s;  // the shell's convention for a process ended by a signal
    }
    error(who + e.what());
    return kExitSetup;
  } catch (const std::exception& e) {
    print_tensorrt_log();
    error(who + "unexpected error: " + e.what());
    return kExitSetup;
  }
}
