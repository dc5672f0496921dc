// The TensorRT backend of the sample: NVIDIA's network, built once per op (by rank 0 alone under a
// launcher) on this process's GPU, and deserialized on every local rank. Compiled only when
// mdtrt's TensorRT backend is.
#ifdef MDTRT_HAVE_TENSORRT

#include "backend.h"
#include "common/error.h"
#include "trt/engine_program.h"
#include "trt/logger.h"
#include "trt/network_builder.h"
#include "trt/trt_library.h"

namespace sample_dc {

TrtAvailability trt_availability() {
  TrtAvailability out;
  try {
    const auto& info = mdtrt::trt::load_library(site_packages_beside_program("tensorrt_libs"),
                                                site_packages_beside_program("tensorrt_lean_libs"));
    out.loads = true;
    out.lean = info.lean;
    out.path = info.path;
  } catch (const std::exception& e) {
    out.why_not = e.what();
  }
  return out;
}

std::vector<std::pair<char, std::string>> drain_trt_log() {
  using S = nvinfer1::ILogger::Severity;
  std::vector<std::pair<char, std::string>> out;
  for (auto& m : mdtrt::trt::logger().drain()) {
    const char level = m.severity <= S::kERROR ? 'E' : m.severity == S::kWARNING ? 'W' : m.severity == S::kINFO ? 'I' : 'V';
    out.emplace_back(level, std::move(m.text));
  }
  return out;
}

std::vector<std::shared_ptr<mdtrt::RankProgram>> make_trt_programs(const mdtrt::CollectiveSpec& spec,
                                                                  mdtrt::DType dtype, int64_t rows, int64_t cols,
                                                                  int world_size, int num_local_ranks,
                                                                  const EngineSource& source) {
  // As NVIDIA's sample: the network transposes [rows, cols] so the collective runs along cols; the
  // layer's rank count is the world's, except that a grouped all_gather / reduce_scatter gets the
  // group's (it sets their output shape: see collective_layer_ranks). One serialized engine, shared
  // by every local rank (each deserializes its own copy).
  std::vector<uint8_t> plan;
  if (source.builds) {
    mdtrt::trt::BuildOptions options;
    options.device = source.build_device;  // this process's GPU, not whichever is current
    plan = mdtrt::trt::build_dist_collective_engine(spec, dtype, mdtrt::Shape{rows, cols}, world_size,
                                                    /*transpose_2d=*/true, options);
  }
  if (source.share) plan = source.share(source.builds ? &plan : nullptr);
  auto engine = std::make_shared<const std::vector<uint8_t>>(std::move(plan));
  auto program = std::make_shared<mdtrt::trt::EngineProgram>(
      std::vector<mdtrt::trt::EngineBytes>(num_local_ranks, engine), /*multi_device=*/true);
  return std::vector<std::shared_ptr<mdtrt::RankProgram>>(num_local_ranks, program);
}

}  // namespace sample_dc

#endif  // MDTRT_HAVE_TENSORRT
