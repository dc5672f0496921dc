// Command line and launcher environment of sample_dist_collective. Everything here is checked
// without touching CUDA, NCCL or TensorRT, so that a wrong argument is reported the same way on a
// machine with GPUs and on one without.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/collective_program.h"
#include "runtime/dtype.h"

namespace sample_dc {

// A mistake in the arguments or the launcher's environment; main prints it and exits with kExitUsage.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum ExitCode : int {
  kExitPassed = 0,
  kExitMismatch = 1,  // an output differed from the host reference
  kExitUsage = 2,     // bad arguments or launcher environment
  kExitSetup = 3,     // no GPU, no NCCL, no TensorRT, a timeout: the machine, not the data
};

enum class BackendChoice { kAuto, kNccl, kTrt };
enum class LaunchStyle {
  kThreadPerGpu,    // this process runs every rank, one thread per GPU
  kProcessPerRank,  // TRT_MY_RANK / TRT_WORLD_SIZE / TRT_NCCL_ID_FILE: this process is one rank
};

struct Options {
  std::vector<mdtrt::CollectiveOp> ops;
  BackendChoice backend = BackendChoice::kAuto;
  LaunchStyle launch = LaunchStyle::kThreadPerGpu;

  // Thread-per-GPU: rank i on gpus[i]; empty means every visible GPU (decided once CUDA is up).
  // Process-per-rank: empty, one id (this process's GPU) or one per world rank.
  std::vector<int> gpus;
  int world_size = 0;  // 0 until known (thread-per-GPU without --gpus)
  int my_rank = -1;    // process-per-rank only
  std::string nccl_id_file;

  int64_t rows = 3;
  int64_t cols = 4;
  bool cols_given = false;
  mdtrt::DType dtype = mdtrt::DType::kFloat32;
  mdtrt::ReduceOp reduce = mdtrt::ReduceOp::kSum;
  int root = 0;
  bool root_given = false;
  std::vector<int> groups;  // ordered world ranks; empty: the whole world

  int iters = 0;
  int warmup = 5;
  uint64_t seed = 20260101;
  double timeout_seconds = 120;
  bool original_vectors = false;
  bool inject_mismatch = false;  // test-only: proves the output check can fail
  bool help = false;

  // Ranks taking part in the collective, in group order.
  std::vector<int> members() const;
  mdtrt::CollectiveSpec spec(mdtrt::CollectiveOp op) const;
};

// Parses argv and the launcher variables in `env` (TRT_MY_RANK, TRT_WORLD_SIZE, TRT_NCCL_ID_FILE).
// Throws UsageError naming the problem and the fix. When the world size is not known yet
// (thread-per-GPU without --gpus) the checks that need it wait for finish_with_world_size().
Options parse_options(const std::vector<std::string>& args, const std::map<std::string, std::string>& env);

// The checks that need the world size: groups, root, divisibility of --cols, --original-vectors.
void finish_with_world_size(Options& options, int world_size);

std::string help_text(const std::string& program_name);

}  // namespace sample_dc
