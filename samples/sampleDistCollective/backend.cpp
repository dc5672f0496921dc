#include "backend.h"

#include "common/error.h"

namespace sample_dc {

const char* backend_name(Backend backend) { return backend == Backend::kTrt ? "trt" : "nccl"; }

bool trt_backend_compiled() {
#ifdef MDTRT_HAVE_TENSORRT
  return true;
#else
  return false;
#endif
}

Backend choose_backend(BackendChoice choice, std::string* note) {
  if (choice == BackendChoice::kNccl) return Backend::kNccl;
#ifdef MDTRT_HAVE_TENSORRT
  std::string why_not;
  if (trt_library_loads(&why_not)) return Backend::kTrt;
  if (choice == BackendChoice::kTrt)
    throw mdtrt::Error(mdtrt::ErrorKind::kLibraryNotFound,
                       "--backend trt: TensorRT could not be loaded: " + why_not +
                           " (install TensorRT 11, e.g. pip install 'mdtrt[tensorrt]', or use --backend nccl)");
  if (note) *note = "TensorRT is not loadable (" + why_not + "); using --backend nccl";
  return Backend::kNccl;
#else
  if (choice == BackendChoice::kTrt)
    throw UsageError(std::string("--backend trt: this build has no TensorRT backend (") + MDTRT_TENSORRT_REASON +
                     "); rebuild with TensorRT 11 headers or use --backend nccl");
  if (note) *note = "this build has no TensorRT backend; using --backend nccl";
  return Backend::kNccl;
#endif
}

bool host_transposes(Backend backend) { return backend == Backend::kNccl; }

std::vector<std::shared_ptr<mdtrt::RankProgram>> make_programs(Backend backend, const mdtrt::CollectiveSpec& spec,
                                                              mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                              int world_size, int num_local_ranks) {
  if (backend == Backend::kTrt) {
#ifdef MDTRT_HAVE_TENSORRT
    return make_trt_programs(spec, dtype, rows, cols, world_size, num_local_ranks);
#else
    (void)rows;
    (void)cols;
    throw UsageError("--backend trt: this build has no TensorRT backend");
#endif
  }
  // One program object serves every local rank: it keeps per-rank state by local index.
  auto program = std::make_shared<mdtrt::CollectiveProgram>(spec, dtype, world_size, num_local_ranks);
  return std::vector<std::shared_ptr<mdtrt::RankProgram>>(num_local_ranks, program);
}

}  // namespace sample_dc
