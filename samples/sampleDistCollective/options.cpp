#include "options.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <sstream>

#include "common/error.h"
#include "nccl/unique_id_file.h"

namespace sample_dc {
namespace {

constexpr const char* kOpList =
    "all_reduce, all_gather, broadcast, reduce, reduce_scatter, all_to_all, gather, scatter, or all";
constexpr mdtrt::CollectiveOp kAllOps[] = {
    mdtrt::CollectiveOp::kAllReduce,     mdtrt::CollectiveOp::kAllGather, mdtrt::CollectiveOp::kBroadcast,
    mdtrt::CollectiveOp::kReduce,        mdtrt::CollectiveOp::kReduceScatter, mdtrt::CollectiveOp::kAllToAll,
    mdtrt::CollectiveOp::kGather,        mdtrt::CollectiveOp::kScatter};

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

int64_t parse_integer(const std::string& what, const std::string& text) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size())
    throw UsageError(what + " takes a whole number, got '" + text + "'");
  return value;
}

std::vector<int> parse_int_list(const std::string& what, const std::string& text) {
  std::vector<int> values;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item.empty()) throw UsageError(what + " takes a comma-separated list of numbers like 0,1; got '" + text + "'");
    int64_t v = parse_integer(what, item);
    if (v < 0 || v > 1 << 20) throw UsageError(what + " lists " + item + "; ids are numbers from 0 up");
    values.push_back(static_cast<int>(v));
  }
  if (values.empty() || text.back() == ',')
    throw UsageError(what + " takes a comma-separated list of numbers like 0,1; got '" + text + "'");
  return values;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (int x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

bool splits_first_dim(mdtrt::CollectiveOp op) {
  return op == mdtrt::CollectiveOp::kReduceScatter || op == mdtrt::CollectiveOp::kAllToAll ||
         op == mdtrt::CollectiveOp::kScatter;
}

std::optional<std::string> env_value(const std::map<std::string, std::string>& env, const char* name) {
  auto it = env.find(name);
  if (it == env.end()) return std::nullopt;
  return it->second;
}

// What --groups and --root get wrong whatever the world size: refused while parsing, so that a run
// without --gpus (world size = visible GPUs, known only once CUDA is asked) still exits 2, not 3.
void check_groups_alone(const Options& o) {
  std::set<int> seen;
  for (int r : o.groups)
    if (!seen.insert(r).second) throw UsageError("--groups lists rank " + std::to_string(r) + " twice; list each rank once");
  if (!o.groups.empty() && o.groups.size() < 2)
    throw UsageError("--groups " + join(o.groups) + " has one rank; a collective group needs at least 2");
  bool any_root = false;
  for (auto op : o.ops) any_root = any_root || mdtrt::op_has_root(op);
  if (any_root && o.root_given && !o.groups.empty() && !seen.count(o.root))
    throw UsageError("--root " + std::to_string(o.root) + " is not in the group [" + join(o.groups) +
                     "]; --root is a world rank that takes part in the collective");
}

}  // namespace

std::vector<int> Options::members() const {
  if (!groups.empty()) return groups;
  std::vector<int> all(world_size);
  for (int i = 0; i < world_size; ++i) all[i] = i;
  return all;
}

mdtrt::CollectiveSpec Options::spec(mdtrt::CollectiveOp op) const {
  mdtrt::CollectiveSpec s;
  s.op = op;
  s.reduce = mdtrt::op_reduces(op) ? reduce : mdtrt::ReduceOp::kNone;
  s.root = mdtrt::op_has_root(op) ? root : 0;
  s.groups = groups;
  return s;
}

Options parse_options(const std::vector<std::string>& args, const std::map<std::string, std::string>& env) {
  Options o;
  bool gpus_given = false, rows_given = false, dtype_given = false, reduce_given = false;
  std::string op_text;

  for (size_t i = 0; i < args.size(); ++i) {
    std::string name = args[i];
    std::optional<std::string> inline_value;
    if (auto eq = name.find('='); name.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    auto value = [&]() -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= args.size() || args[i + 1].rfind("--", 0) == 0)
        throw UsageError(name + " needs a value (see --help)");
      return args[++i];
    };
    auto flag = [&] {
      if (inline_value) throw UsageError(name + " takes no value");
    };

    if (name == "--help" || name == "-h") {
      o.help = true;
      return o;  // --help wins over anything else on the line
    } else if (name == "--op") {
      op_text = lower(value());
      if (op_text == "all") {
        o.ops.assign(std::begin(kAllOps), std::end(kAllOps));
      } else {
        try {
          o.ops = {mdtrt::collective_op_from_name(op_text)};
        } catch (const mdtrt::Error&) {
          throw UsageError("unknown --op '" + op_text + "': use one of " + kOpList);
        }
      }
    } else if (name == "--backend") {
      std::string b = lower(value());
      if (b == "nccl") o.backend = BackendChoice::kNccl;
      else if (b == "trt" || b == "tensorrt") o.backend = BackendChoice::kTrt;
      else if (b == "auto") o.backend = BackendChoice::kAuto;
      else throw UsageError("unknown --backend '" + b + "': use trt, nccl or auto");
    } else if (name == "--gpus") {
      o.gpus = parse_int_list("--gpus", value());
      gpus_given = true;
    } else if (name == "--rows") {
      o.rows = parse_integer("--rows", value());
      rows_given = true;
    } else if (name == "--cols") {
      o.cols = parse_integer("--cols", value());
      o.cols_given = true;
    } else if (name == "--dtype") {
      std::string d = lower(value());
      if (d == "float32" || d == "fp32" || d == "float") o.dtype = mdtrt::DType::kFloat32;
      else if (d == "float16" || d == "fp16" || d == "half") o.dtype = mdtrt::DType::kFloat16;
      else if (d == "bfloat16" || d == "bf16") o.dtype = mdtrt::DType::kBFloat16;
      else if (d == "int32") o.dtype = mdtrt::DType::kInt32;
      else throw UsageError("unknown --dtype '" + d + "': use float32, float16, bfloat16 or int32");
      dtype_given = true;
    } else if (name == "--reduce") {
      std::string r = lower(value());
      if (r == "sum") o.reduce = mdtrt::ReduceOp::kSum;
      else if (r == "prod") o.reduce = mdtrt::ReduceOp::kProd;
      else if (r == "max") o.reduce = mdtrt::ReduceOp::kMax;
      else if (r == "min") o.reduce = mdtrt::ReduceOp::kMin;
      else if (r == "avg") o.reduce = mdtrt::ReduceOp::kAvg;
      else throw UsageError("unknown --reduce '" + r + "': use sum, prod, max, min or avg");
      reduce_given = true;
    } else if (name == "--root") {
      int64_t r = parse_integer("--root", value());
      if (r < 0) throw UsageError("--root is a world rank, 0 or more; got " + std::to_string(r));
      o.root = static_cast<int>(r);
      o.root_given = true;
    } else if (name == "--groups") {
      o.groups = parse_int_list("--groups", value());
    } else if (name == "--iters") {
      int64_t n = parse_integer("--iters", value());
      if (n < 0 || n > 100000) throw UsageError("--iters takes 0 (no timing) to 100000; got " + std::to_string(n));
      o.iters = static_cast<int>(n);
    } else if (name == "--warmup") {
      int64_t n = parse_integer("--warmup", value());
      if (n < 0 || n > 100000) throw UsageError("--warmup takes 0 to 100000; got " + std::to_string(n));
      o.warmup = static_cast<int>(n);
    } else if (name == "--seed") {
      o.seed = static_cast<uint64_t>(parse_integer("--seed", value()));
    } else if (name == "--timeout") {
      int64_t t = parse_integer("--timeout", value());
      if (t <= 0) throw UsageError("--timeout takes a positive number of seconds; got " + std::to_string(t));
      o.timeout_seconds = static_cast<double>(t);
    } else if (name == "--original-vectors") {
      flag();
      o.original_vectors = true;
    } else if (name == "--inject-mismatch") {
      flag();
      o.inject_mismatch = true;
    } else {
      throw UsageError("unknown argument '" + args[i] + "' (see --help)");
    }
  }

  if (o.ops.empty()) throw UsageError(std::string("--op is required: one of ") + kOpList);
  if (o.rows < 1 || o.rows > (1 << 28))
    throw UsageError("--rows must be from 1 to 268435456 (2^28); got " + std::to_string(o.rows));
  if (o.cols < 1 || o.cols > (1 << 28))
    throw UsageError("--cols must be from 1 to 268435456 (2^28); got " + std::to_string(o.cols));
  if (o.rows * o.cols > (int64_t{1} << 30))
    throw UsageError("--rows x --cols is " + std::to_string(o.rows * o.cols) +
                     " elements per rank; keep it at most 2^30");

  // Launch style: any of the launcher variables means one process per rank, and then all three
  // are needed, as in NVIDIA's sample.
  auto my_rank = env_value(env, "TRT_MY_RANK");
  auto world = env_value(env, "TRT_WORLD_SIZE");
  auto id_file = env_value(env, "TRT_NCCL_ID_FILE");
  if (my_rank || world || id_file) {
    o.launch = LaunchStyle::kProcessPerRank;
    std::string missing;
    if (!my_rank) missing += " TRT_MY_RANK";
    if (!world) missing += " TRT_WORLD_SIZE";
    if (!id_file) missing += " TRT_NCCL_ID_FILE";
    if (!missing.empty())
      throw UsageError("one process per rank needs TRT_MY_RANK, TRT_WORLD_SIZE and TRT_NCCL_ID_FILE; not set:" +
                       missing + " (see --help for mpirun/srun lines; unset all three to run one thread per GPU)");
    int64_t ws = parse_integer("TRT_WORLD_SIZE", *world);
    int64_t rank = parse_integer("TRT_MY_RANK", *my_rank);
    if (ws < 2) throw UsageError("TRT_WORLD_SIZE is " + *world + "; a collective needs at least 2 ranks");
    if (rank < 0 || rank >= ws)
      throw UsageError("TRT_MY_RANK is " + *my_rank + " but must be 0.." + std::to_string(ws - 1) +
                       " for TRT_WORLD_SIZE=" + *world);
    if (id_file->empty())
      throw UsageError("TRT_NCCL_ID_FILE is empty; set it to a path every rank can read, e.g. /tmp/nccl_id.txt");
    try {
      mdtrt::check_unique_id_file_path(*id_file);
    } catch (const mdtrt::Error& e) {
      throw UsageError(e.detail());
    }
    o.world_size = static_cast<int>(ws);
    o.my_rank = static_cast<int>(rank);
    o.nccl_id_file = *id_file;
    if (gpus_given && o.gpus.size() != 1 && static_cast<int>(o.gpus.size()) != o.world_size)
      throw UsageError("with one process per rank, --gpus names this process's GPU (one id) or one GPU per rank (" +
                       std::to_string(o.world_size) + " ids); got " + std::to_string(o.gpus.size()) + " ids");
  } else if (gpus_given) {
    std::set<int> seen;
    for (int g : o.gpus)
      if (!seen.insert(g).second)
        throw UsageError("--gpus lists GPU " + std::to_string(g) +
                         " twice; each rank needs its own GPU (NCCL cannot run two ranks of one communicator on one "
                         "GPU)");
    if (o.gpus.size() < 2)
      throw UsageError("--gpus " + join(o.gpus) +
                       " gives a world of 1 rank; a collective needs at least 2 GPUs, e.g. --gpus 0,1");
    o.world_size = static_cast<int>(o.gpus.size());
  }

  if (o.original_vectors) {
    std::string clash;
    if (rows_given && o.rows != 3) clash += " --rows";
    if (o.cols_given && o.cols != 4) clash += " --cols";
    if (dtype_given && o.dtype != mdtrt::DType::kFloat32) clash += " --dtype";
    if (reduce_given && o.reduce != mdtrt::ReduceOp::kSum) clash += " --reduce";
    if (o.root_given && o.root != 0) clash += " --root";
    if (!o.groups.empty()) clash += " --groups";
    if (!clash.empty())
      throw UsageError("--original-vectors replays NVIDIA's fixed test (2 ranks, 3x4 float32, sum, root 0); drop" +
                       clash);
  }
  check_groups_alone(o);
  if (!o.root_given && !o.groups.empty()) o.root = o.groups.front();
  if (o.world_size > 0) finish_with_world_size(o, o.world_size);
  return o;
}

void finish_with_world_size(Options& o, int world_size) {
  o.world_size = world_size;
  for (int r : o.groups)
    if (r >= world_size)
      throw UsageError("--groups lists rank " + std::to_string(r) + ", outside the world of " +
                       std::to_string(world_size) + " ranks (0.." + std::to_string(world_size - 1) + ")");
  const std::vector<int> members = o.members();
  const int n = static_cast<int>(members.size());
  bool any_root = false;
  for (auto op : o.ops) any_root = any_root || mdtrt::op_has_root(op);
  if (any_root && std::find(members.begin(), members.end(), o.root) == members.end())
    throw UsageError("--root " + std::to_string(o.root) + " is not in the group [" + join(members) +
                     "]; --root is a world rank that takes part in the collective");
  if (o.original_vectors && world_size != 2)
    throw UsageError("--original-vectors replays NVIDIA's 2-rank test; the world has " + std::to_string(world_size) +
                     " ranks (use --gpus with two ids, or TRT_WORLD_SIZE=2)");

  // The collective runs along the first dimension of the transposed input, i.e. along --cols.
  std::vector<std::string> splitting;
  for (auto op : o.ops)
    if (splits_first_dim(op)) splitting.push_back(mdtrt::collective_op_name(op));
  if (!splitting.empty() && o.cols % n != 0) {
    if (!o.cols_given) {
      o.cols = 2 * static_cast<int64_t>(n);  // the default 4 does not split evenly across n ranks
    } else {
      std::string names;
      for (auto& s : splitting) names += (names.empty() ? "" : ", ") + s;
      throw UsageError(names + " split the " + std::to_string(o.cols) + " columns across a group of " +
                       std::to_string(n) + " ranks: make --cols a multiple of " + std::to_string(n));
    }
  }
  for (auto op : o.ops) {
    try {
      o.spec(op).validate(world_size);
    } catch (const mdtrt::Error& e) {
      throw UsageError(e.detail());
    }
  }
}

std::string help_text(const std::string& program) {
  std::ostringstream h;
  h << "Usage: " << program << " --op <operation> [options]\n"
    << "\n"
    << "Runs one DistCollective operation (or all eight) on several GPUs through mdtrt's C++ core and\n"
    << "checks every rank's output against a reference computed on the host. A port of NVIDIA's\n"
    << "sampleDistCollective: same network (input [rows, cols] -> transpose -> collective along the first\n"
    << "dimension -> transpose back -> output), any number of ranks, four dtypes, timing.\n"
    << "\n"
    << "Options:\n"
    << "  --op <operation>     Required. all_reduce, all_gather, broadcast, reduce, reduce_scatter,\n"
    << "                       all_to_all, gather, scatter, or all (the eight in turn).\n"
    << "  --gpus <ids>         GPUs, comma-separated, e.g. 0,1,2,3: rank i runs on the i-th id, one thread\n"
    << "                       per GPU (at least 2, each once). Default: every visible GPU. With one process\n"
    << "                       per rank: this process's GPU, or one id per rank (default: GPU TRT_MY_RANK,\n"
    << "                       or GPU 0 when the launcher shows each process a single GPU).\n"
    << "  --backend <name>     trt: a TensorRT engine with IDistCollectiveLayer, as NVIDIA's sample.\n"
    << "                       nccl: mdtrt's native collective (NCCL), host-side transposes.\n"
    << "                       Default: trt when this build has the TensorRT backend and libnvinfer loads,\n"
    << "                       else nccl.";
#ifdef MDTRT_HAVE_TENSORRT
  h << " (This build has the TensorRT backend.)\n";
#else
  h << " (This build has no TensorRT backend: " << MDTRT_TENSORRT_REASON << ".)\n";
#endif
  h << "  --rows <n>           Input rows per rank. Default 3.\n"
    << "  --cols <n>           Input columns per rank; the collective splits and gathers along the columns.\n"
    << "                       Default 4 (or 2 x group size when 4 does not split evenly for reduce_scatter,\n"
    << "                       all_to_all or scatter). Must be a multiple of the group size for those ops.\n"
    << "  --dtype <type>       float32 (default), float16, bfloat16 or int32.\n"
    << "  --reduce <op>        sum (default), prod, max, min or avg: for all_reduce, reduce, reduce_scatter.\n"
    << "  --root <rank>        World rank of the root of broadcast, reduce, gather, scatter. Default 0, or\n"
    << "                       the first rank of --groups. Must be a member of the group.\n"
    << "  --groups <ranks>     Ordered world ranks that take part, e.g. 0,2 (at least 2); the order gives\n"
    << "                       the rank within the group. Other ranks do nothing. Default: every rank.\n"
    << "  --iters <n>          Time n runs of each op with CUDA events after --warmup runs; prints the\n"
    << "                       median latency, algorithm and bus bandwidth (nccl-tests' definitions: busbw =\n"
    << "                       algbw x 2(n-1)/n for all_reduce, (n-1)/n for all_gather, reduce_scatter,\n"
    << "                       all_to_all, gather, scatter, 1 for broadcast and reduce; n = group size).\n"
    << "                       Default 0: check only.\n"
    << "  --warmup <n>         Untimed runs before timing. Default 5.\n"
    << "  --seed <n>           Seed of the random inputs (every process derives each rank's input from it).\n"
    << "  --original-vectors   Use NVIDIA's fixed 2-rank inputs (3x4 float32, sum, root 0) and also check\n"
    << "                       NVIDIA's expected outputs. Default: random inputs (small integers, values\n"
    << "                       near 1 for prod, so nothing overflows).\n"
    << "  --timeout <seconds>  Deadline of every wait (NCCL set-up, the id file, each run). Default 120.\n"
    << "  --inject-mismatch    Test only: corrupts one received element per op, to prove the check fails.\n"
    << "  -h, --help           Show this help.\n"
    << "\n"
    << "Launch styles:\n"
    << "  1. One process, one thread per GPU:\n"
    << "       " << program << " --op all_gather --gpus 0,1,2,3\n"
    << "  2. One process per rank, compatible with NVIDIA's sample. Set in every process:\n"
    << "       TRT_MY_RANK       this process's rank, 0..TRT_WORLD_SIZE-1\n"
    << "       TRT_WORLD_SIZE    number of processes (at least 2)\n"
    << "       TRT_NCCL_ID_FILE  a file every rank can read: rank 0 writes the NCCL id there, the others\n"
    << "                         wait for this run's id: a file left by an earlier run is replaced by\n"
    << "                         rank 0 and never read by the others; rank 0 removes it once all joined.\n"
    << "     SLURM:\n"
    << "       srun --ntasks=2 bash -lc 'export TRT_MY_RANK=$SLURM_PROCID; \\\n"
    << "           export TRT_WORLD_SIZE=$SLURM_NTASKS; \\\n"
    << "           export TRT_NCCL_ID_FILE=/tmp/nccl_id.txt; \\\n"
    << "           " << program << " --op all_reduce'\n"
    << "     Open MPI:\n"
    << "       mpirun -np 2 bash -lc 'export TRT_MY_RANK=$OMPI_COMM_WORLD_RANK; \\\n"
    << "           export TRT_WORLD_SIZE=$OMPI_COMM_WORLD_SIZE; \\\n"
    << "           export TRT_NCCL_ID_FILE=/tmp/nccl_id.txt; \\\n"
    << "           " << program << " --op all_reduce'\n"
    << "     Plain background processes:\n"
    << "       rm -f /tmp/nccl_id.txt\n"
    << "       for r in 0 1; do TRT_MY_RANK=$r TRT_WORLD_SIZE=2 TRT_NCCL_ID_FILE=/tmp/nccl_id.txt \\\n"
    << "           " << program << " --op all --backend nccl & done; wait\n"
    << "\n"
    << "How NCCL is found (first that loads wins): MDTRT_NCCL_LIBRARY (a file path); libnccl.so.2 and\n"
    << "libnccl.so through the dynamic loader (LD_LIBRARY_PATH, ldconfig); the nvidia-nccl-cu13 wheel next to\n"
    << "this program when it is installed in a virtual environment's bin/\n"
    << "(../lib/python3*/site-packages/nvidia/nccl/lib). NCCL_NVLS_ENABLE is set to 0 unless already set.\n"
    << "How TensorRT is found: MDTRT_TENSORRT_LIBRARY (a file path; if it does not load, that is an error,\n"
    << "also without --backend trt); libnvinfer.so.11 through the dynamic loader, then in the tensorrt_libs\n"
    << "wheel next to this program (../lib/python3*/site-packages/tensorrt_libs); the lean runtime\n"
    << "(libnvinfer_lean.so.11, the tensorrt_lean_libs wheel) runs engines but cannot build the sample's.\n"
    << "\n"
    << "Output: '[I] Rank 0 - ALL_REDUCE PASSED' per rank and op, then a summary table.\n"
    << "Exit status: 0 all passed; 1 an output did not match; 2 bad arguments or launcher variables;\n"
    << "3 the machine could not run it (no GPU, NCCL or TensorRT missing, a deadline passed);\n"
    << "130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM: every wait gives up within 0.1 s.\n";
  return h.str();
}

}  // namespace sample_dc
