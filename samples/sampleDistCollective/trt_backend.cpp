// The TensorRT backend of the sample: NVIDIA's network, built once per op in this process and
// deserialized on every local rank. Compiled only when mdtrt's TensorRT backend is.
#ifdef MDTRT_HAVE_TENSORRT

#include "backend.h"
#include "common/error.h"
#include "trt/engine_program.h"
#include "trt/network_builder.h"
#include "trt/trt_library.h"

namespace sample_dc {

bool trt_library_loads(std::string* why_not) {
  try {
    mdtrt::trt::load_library();
    return true;
  } catch (const std::exception& e) {
    if (why_not) *why_not = e.what();
    return false;
  }
}

std::vector<std::shared_ptr<mdtrt::RankProgram>> make_trt_programs(const mdtrt::CollectiveSpec& spec,
                                                                  mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                                  int world_size, int num_local_ranks) {
  // As NVIDIA's sample: the layer's rank count is the communicator's (the world), the group, if
  // any, is part of the spec; the network transposes [rows, cols] so the collective runs along cols.
  // One serialized engine, shared by every local rank (each deserializes its own copy).
  auto engine = std::make_shared<const std::vector<uint8_t>>(mdtrt::trt::build_dist_collective_engine(
      spec, dtype, mdtrt::Shape{rows, cols}, world_size, /*transpose_2d=*/true, mdtrt::trt::BuildOptions{}));
  auto program = std::make_shared<mdtrt::trt::EngineProgram>(
      std::vector<mdtrt::trt::EngineBytes>(num_local_ranks, engine), /*multi_device=*/true);
  return std::vector<std::shared_ptr<mdtrt::RankProgram>>(num_local_ranks, program);
}

}  // namespace sample_dc

#endif  // MDTRT_HAVE_TENSORRT
