// The two ways the sample runs a collective, behind one interface: a RankProgram per local rank,
// driven by mdtrt's ProgramRunner either way, so checking and timing are one code path.
//   trt:  a TensorRT engine of NVIDIA's network (input, transpose, IDistCollectiveLayer, transpose).
//   nccl: mdtrt's native CollectiveProgram; the host does the two transposes the network would, so
//         both backends must produce the same [rows, cols'] outputs.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "options.h"
#include "runtime/collective_program.h"
#include "runtime/rank_program.h"

namespace sample_dc {

enum class Backend { kNccl, kTrt };
const char* backend_name(Backend backend);

// Whether this build has the TensorRT backend (TensorRT headers were found at configure time).
bool trt_backend_compiled();

// Picks the backend. An explicit `trt` in a build without it is a UsageError (checked before CUDA);
// an explicit `trt` whose library does not load throws mdtrt::Error (kLibraryNotFound). `auto` falls
// back to nccl and says why in `note`.
Backend choose_backend(BackendChoice choice, std::string* note);

// True when the program takes the input transposed ([cols, rows]) and returns the output transposed,
// i.e. the host does the network's transposes.
bool host_transposes(Backend backend);

std::vector<std::shared_ptr<mdtrt::RankProgram>> make_programs(Backend backend, const mdtrt::CollectiveSpec& spec,
                                                              mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                              int world_size, int num_local_ranks);

#ifdef MDTRT_HAVE_TENSORRT
// trt_backend.cpp: the only file that touches csrc/trt.
bool trt_library_loads(std::string* why_not);
std::vector<std::shared_ptr<mdtrt::RankProgram>> make_trt_programs(const mdtrt::CollectiveSpec& spec,
                                                                  mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                                  int world_size, int num_local_ranks);
#endif

}  // namespace sample_dc
