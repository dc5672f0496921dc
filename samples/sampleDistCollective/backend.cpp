#include "backend.h"

#include <glob.h>
#include <limits.h>
#include <unistd.h>

#include <cstdlib>

#include "common/error.h"
#include "trt/trt_library.h"

namespace sample_dc {

std::vector<std::string> site_packages_beside_program(const std::string& relative) {
  char exe[PATH_MAX] = {0};
  const ssize_t len = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len <= 0) return {};
  std::string dir(exe, static_cast<size_t>(len));
  dir = dir.substr(0, dir.find_last_of('/'));
  const std::string pattern = dir + "/../lib/python3*/site-packages/" + relative;
  std::vector<std::string> dirs;
  glob_t found{};
  if (::glob(pattern.c_str(), GLOB_ONLYDIR, nullptr, &found) == 0)
    for (size_t i = 0; i < found.gl_pathc; ++i) dirs.emplace_back(found.gl_pathv[i]);
  ::globfree(&found);
  return dirs;
}

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
  const TrtAvailability trt = trt_availability();
  if (trt.loads && !trt.lean) return Backend::kTrt;
  if (trt.loads) {
    // The sample builds its engines, and the lean runtime has no builder.
    const std::string why = "only the TensorRT lean runtime was found (" + trt.path +
                            "): it runs engines but cannot build the sample's";
    if (choice == BackendChoice::kTrt)
      throw mdtrt::Error(mdtrt::ErrorKind::kLibraryNotFound,
                         "--backend trt: " + why +
                             " (install the full TensorRT 11, e.g. " + mdtrt::trt::kInstallFull +
                             ", set MDTRT_TENSORRT_LIBRARY to a full libnvinfer.so.11, or use --backend nccl)");
    if (note) *note = why + "; using --backend nccl";
    return Backend::kNccl;
  }
  const char* chosen_library = std::getenv("MDTRT_TENSORRT_LIBRARY");
  if (choice == BackendChoice::kTrt || (chosen_library != nullptr && *chosen_library != '\0'))
    // A library the user named is not silently replaced by the other backend.
    throw mdtrt::Error(mdtrt::ErrorKind::kLibraryNotFound,
                       std::string(choice == BackendChoice::kTrt ? "--backend trt" : "MDTRT_TENSORRT_LIBRARY") +
                           ": TensorRT could not be loaded: " + trt.why_not +
                           " (install TensorRT 11, e.g. " + mdtrt::trt::kInstallFull +
                           ", fix or unset MDTRT_TENSORRT_LIBRARY, or use --backend nccl)");
  if (note) *note = "TensorRT is not loadable (" + trt.why_not + "); using --backend nccl";
  return Backend::kNccl;
#else
  if (choice == BackendChoice::kTrt)
    throw UsageError(std::string("--backend trt: this build has no TensorRT backend (") + MDTRT_TENSORRT_REASON +
                     "); rebuild with TensorRT 11 headers or use --backend nccl");
  if (note) *note = "this build has no TensorRT backend; using --backend nccl";
  return Backend::kNccl;
#endif
}

std::vector<std::pair<char, std::string>> drain_tensorrt_log() {
#ifdef MDTRT_HAVE_TENSORRT
  return drain_trt_log();
#else
  return {};
#endif
}

bool host_transposes(Backend backend) { return backend == Backend::kNccl; }

std::vector<std::shared_ptr<mdtrt::RankProgram>> make_programs(Backend backend, const mdtrt::CollectiveSpec& spec,
                                                              mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                              int world_size, int num_local_ranks,
                                                              const EngineSource& source) {
  if (backend == Backend::kTrt) {
#ifdef MDTRT_HAVE_TENSORRT
    return make_trt_programs(spec, dtype, rows, cols, world_size, num_local_ranks, source);
#else
    (void)rows;
    (void)cols;
    (void)source;
    throw UsageError("--backend trt: this build has no TensorRT backend");
#endif
  }
  // One program object serves every local rank: it keeps per-rank state by local index.
  auto program = std::make_shared<mdtrt::CollectiveProgram>(spec, dtype, world_size, num_local_ranks);
  return std::vector<std::shared_ptr<mdtrt::RankProgram>>(num_local_ranks, program);
}

}  // namespace sample_dc
