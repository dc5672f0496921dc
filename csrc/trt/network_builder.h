// Building TensorRT engines: a DistCollective test network (the shape of NVIDIA's
// sampleDistCollective), any network from ONNX, and the pieces shared by both (builder config,
// timing cache, build progress).
#pragma once

#include <NvInfer.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "runtime/collective_program.h"
#include "runtime/dtype.h"

namespace mdtrt::trt {

enum class ProgressEvent { kPhaseStart, kStep, kPhaseFinish };

// One progress report from TensorRT's builder: `step` of `nb_steps` (both 0 for start and finish).
// Return false to cancel the build (it then fails with a "cancelled" error).
using ProgressCallback = std::function<bool(ProgressEvent event, const std::string& phase,
                                            const std::string& parent_phase, int step, int nb_steps)>;

// A callback that prints "[mdtrt] building: <phase> step i/n" lines to stderr (top-level phases
// only, so nested phases do not drown the log).
ProgressCallback line_progress();

struct BuildOptions {
  // No fp16/bf16 switches: TensorRT 11 networks are always strongly typed, so each tensor's type
  // comes from the network (for ONNX, the model's own types); the builder has no precision flags.
  size_t workspace_bytes = 0;     // limit of the workspace memory pool; 0 keeps TensorRT's default
  std::string timing_cache_path;  // loaded if the file exists, written back after the build; "" = none
  ProgressCallback progress;      // empty: line_progress()
  bool show_progress = true;      // false: no progress at all
  int device = -1;                // the GPU to build on (made current for the build); -1: the current one
  // BuilderFlag::kVERSION_COMPATIBLE: a plan the lean runtime (and later TensorRT 11 releases) can load.
  bool version_compatible = false;
  // BuilderFlag::kEXCLUDE_LEAN_RUNTIME: a version-compatible plan without the lean runtime embedded in
  // it, for a lean runtime shipped beside the plan (needs version_compatible).
  bool exclude_lean_runtime = false;
};

// Storage for the group arrays given to addDistCollective, which keeps the pointer: it must
// outlive the build of the network.
using GroupStorage = std::deque<std::vector<int64_t>>;

// The layer rank count (setNbRanks) mdtrt gives a DistCollective over `nb_ranks` world ranks.
// TensorRT documents that nbRanks "determines [the] output shape for kALL_GATHER and
// kREDUCE_SCATTER" (ILayer::setNbRanks): their output's first dimension is the input's times
// (divided by) nbRanks. With a group only the group's ranks take part, so for those two ops it is
// the group's size; the other ops' shapes do not depend on it and keep the world's count.
int collective_layer_ranks(const CollectiveSpec& spec, int nb_ranks);

// Adds an IDistCollectiveLayer for `spec` over `nb_ranks` ranks (root = -1 and ReduceOperation::kNONE
// for the operations that take none) and returns its output. Throws kInvalidArgument for a spec
// that does not fit nb_ranks, kTensorRT when TensorRT refuses the layer or gives it another output
// shape than collective_output_shape (both shapes in the message). `groups` keeps the layer's group
// array until the build returns.
nvinfer1::ITensor* add_collective(nvinfer1::INetworkDefinition& network, nvinfer1::ITensor& input,
                                  const CollectiveSpec& spec, int nb_ranks, GroupStorage& groups);

// A strongly typed network: input "input" (dtype, input_shape) -> [transpose, when transpose_2d
// and the input is 2-D: the collective then runs along the second dimension] -> DistCollective ->
// [transpose back] -> output "output"; built and serialized.
std::vector<uint8_t> build_dist_collective_engine(const CollectiveSpec& spec, DType dtype, const Shape& input_shape,
                                                  int nb_ranks, bool transpose_2d, const BuildOptions& options);

// min, opt, max shapes of one input.
using ProfileShapes = std::tuple<Shape, Shape, Shape>;

// Parses an ONNX model with TensorRT's parser and builds it. `model_path`, when given, is where
// the model lives (external weights are read relative to it); with empty `model_bytes` the model is
// read from that file. Parser errors are listed, with node names, in the exception. Every input
// with dynamic dimensions needs a profile.
std::vector<uint8_t> build_engine_from_onnx(const std::string& model_bytes, const std::string& model_path,
                                            const std::map<std::string, ProfileShapes>& profiles,
                                            const BuildOptions& options,
                                            const std::vector<std::string>& parser_extra_dirs = {});

}  // namespace mdtrt::trt
