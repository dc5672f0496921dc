// The two ways the sample runs a collective, behind one interface: a RankProgram per local rank,
// driven by mdtrt's ProgramRunner either way, so checking and timing are one code path.
//   trt:  a TensorRT engine of NVIDIA's network (input, transpose, IDistCollectiveLayer, transpose).
//   nccl: mdtrt's native CollectiveProgram; the host does the two transposes the network would, so
//         both backends must produce the same [rows, cols'] outputs.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "options.h"
#include "runtime/collective_program.h"
#include "runtime/rank_program.h"

namespace sample_dc {

// Folders `relative` under the site-packages of the virtual environment this program is installed
// in (pip puts console programs in its bin/): ../lib/python3*/site-packages/<relative>, where
// the nvidia-nccl-cu13 and TensorRT wheels keep their libraries.
std::vector<std::string> site_packages_beside_program(const std::string& relative);

enum class Backend { kNccl, kTrt };
const char* backend_name(Backend backend);

// Whether this build has the TensorRT backend (TensorRT headers were found at configure time).
bool trt_backend_compiled();

// Picks the backend. An explicit `trt` in a build without it is a UsageError (checked before CUDA);
// an explicit `trt` whose library does not load, or is only the lean runtime (which cannot build
// the sample's engines), throws mdtrt::Error (kLibraryNotFound). `auto` falls back to nccl in those
// cases and says why in `note`.
Backend choose_backend(BackendChoice choice, std::string* note);

// TensorRT's log since the last call, oldest first, as (level letter E/W/I/V, text); empty without
// the TensorRT backend. The sample prints it, as NVIDIA's does.
std::vector<std::pair<char, std::string>> drain_tensorrt_log();

// How the programs of one op get their engine (trt backend): `build_device` is the GPU the engine is
// built on (this process's first rank's). `share`, when set, is called with the plan on rank 0
// (nullptr elsewhere) and returns the plan every rank runs: under a launcher only rank 0 builds.
struct EngineSource {
  int build_device = -1;
  bool builds = true;  // false: this process only receives the plan
  std::function<std::vector<uint8_t>(const std::vector<uint8_t>*)> share;
};

// True when the program takes the input transposed ([cols, rows]) and returns the output transposed,
// i.e. the host does the network's transposes.
bool host_transposes(Backend backend);

std::vector<std::shared_ptr<mdtrt::RankProgram>> make_programs(Backend backend, const mdtrt::CollectiveSpec& spec,
                                                              mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                              int world_size, int num_local_ranks,
                                                              const EngineSource& source);

#ifdef MDTRT_HAVE_TENSORRT
// trt_backend.cpp: the only file that touches csrc/trt.
struct TrtAvailability {
  bool loads = false;
  bool lean = false;  // only the lean runtime: runs engines, cannot build them
  std::string path;
  std::string why_not;  // when it does not load
};
TrtAvailability trt_availability();
std::vector<std::pair<char, std::string>> drain_trt_log();
std::vector<std::shared_ptr<mdtrt::RankProgram>> make_trt_programs(const mdtrt::CollectiveSpec& spec,
                                                                  mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                                  int world_size, int num_local_ranks,
                                                                  const EngineSource& source);
#endif

}  // namespace sample_dc
