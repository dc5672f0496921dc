#include "trt/network_builder.h"

#include <NvOnnxParser.h>


#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#include <sstream>

#include "common/atomic_file.h"
#include "common/error.h"
#include "runtime/cuda_handles.h"
#include "runtime/device_group.h"
#include "trt/factory.h"
#include "trt/logger.h"
#include "trt/trt_library.h"
#include "trt/trt_types.h"

namespace mdtrt::trt {
namespace {

using nvinfer1::CollectiveOperation;
using nvinfer1::ReduceOperation;

CollectiveOperation to_trt(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kAllReduce: return CollectiveOperation::kALL_REDUCE;
    case CollectiveOp::kAllGather: return CollectiveOperation::kALL_GATHER;
    case CollectiveOp::kBroadcast: return CollectiveOperation::kBROADCAST;
    case CollectiveOp::kReduce: return CollectiveOperation::kREDUCE;
    case CollectiveOp::kReduceScatter: return CollectiveOperation::kREDUCE_SCATTER;
    case CollectiveOp::kAllToAll: return CollectiveOperation::kALL_TO_ALL;
    case CollectiveOp::kGather: return CollectiveOperation::kGATHER;
    case CollectiveOp::kScatter: return CollectiveOperation::kSCATTER;
  }
  throw_invalid_argument("unknown collective operation");
}

ReduceOperation to_trt(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ReduceOperation::kSUM;
    case ReduceOp::kProd: return ReduceOperation::kPROD;
    case ReduceOp::kMax: return ReduceOperation::kMAX;
    case ReduceOp::kMin: return ReduceOperation::kMIN;
    case ReduceOp::kAvg: return ReduceOperation::kAVG;
    case ReduceOp::kNone: return ReduceOperation::kNONE;
  }
  throw_invalid_argument("unknown reduce operation");
}

// Forwards TensorRT's build phases to a ProgressCallback. Its entry points are noexcept, so a
// throwing callback is kept and rethrown after the build. Which threads TensorRT calls them from is
// not documented: the cancel flag is atomic and the kept exception guarded, so calls from several
// builder threads at once stay safe.
class ProgressForwarder : public nvinfer1::IProgressMonitor {
 public:
  explicit ProgressForwarder(ProgressCallback callback) : callback_(std::move(callback)) {}

  void phaseStart(const char* phase, const char* parent, int32_t nb_steps) noexcept override {
    call(ProgressEvent::kPhaseStart, phase, parent, 0, nb_steps);
  }
  bool stepComplete(const char* phase, int32_t step) noexcept override {
    return call(ProgressEvent::kStep, phase, nullptr, step, 0);
  }
  void phaseFinish(const char* phase) noexcept override { call(ProgressEvent::kPhaseFinish, phase, nullptr, 0, 0); }

  bool cancelled() const { return cancelled_.load(); }
  void rethrow_if_failed() const {
    std::exception_ptr failure;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      failure = failure_;
    }
    if (failure) std::rethrow_exception(failure);
  }

 private:
  bool call(ProgressEvent event, const char* phase, const char* parent, int step, int nb_steps) noexcept {
    if (cancelled_.load()) return false;
    try {
      // One callback at a time: user callbacks (and Python's) need not be reentrant.
      std::lock_guard<std::mutex> lock(call_mutex_);
      if (!callback_(event, phase ? phase : "", parent ? parent : "", step, nb_steps)) cancelled_.store(true);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!failure_) failure_ = std::current_exception();
      cancelled_.store(true);
    }
    return !cancelled_.load();
  }

  ProgressCallback callback_;
  std::atomic<bool> cancelled_{false};
  std::mutex call_mutex_;
  mutable std::mutex mutex_;  // guards failure_
  std::exception_ptr failure_;
};

void warn(const std::string& text) { logger().log(nvinfer1::ILogger::Severity::kWARNING, ("[mdtrt] " + text).c_str()); }

Owned<nvinfer1::INetworkDefinition> make_network(nvinfer1::IBuilder& builder) {
  ErrorScope scope;
  // No creation flags: TensorRT 11 networks are strongly typed without asking (the flag is deprecated).
  Owned<nvinfer1::INetworkDefinition> network(builder.createNetworkV2(0));
  if (!network) throw Error(ErrorKind::kTensorRT, with_trt_error("could not create a network"), -1, "createNetworkV2");
  return network;
}

bool read_file(const std::string& path, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

// Atomically (common/atomic_file.h): a crash mid-write never leaves a truncated cache that a later
// build would load, and processes building at once never write into one another's temporary file;
// the last rename wins, whole. A cache that cannot be written costs only a warning.
void write_timing_cache(const std::string& path, const void* data, size_t size) {
  const std::string failed = write_file_atomically(path, data, size);
  if (!failed.empty()) warn("could not write the timing cache " + path + ": " + failed);
}

Owned<nvinfer1::ITimingCache> attach_timing_cache(nvinfer1::IBuilderConfig& config, const std::string& path) {
  ErrorScope scope;
  std::string blob;
  Owned<nvinfer1::ITimingCache> cache;
  if (read_file(path, blob) && !blob.empty()) {
    cache.reset(config.createTimingCache(blob.data(), blob.size()));
    if (!cache) warn("the timing cache " + path + " could not be read; starting an empty one: " + Logger::last_error());
  }
  if (!cache) cache.reset(config.createTimingCache(nullptr, 0));
  if (!cache) throw Error(ErrorKind::kTensorRT, with_trt_error("could not create a timing cache"), -1, "createTimingCache");
  if (!config.setTimingCache(*cache, /*ignoreMismatch=*/false)) {
    // A cache from another GPU or TensorRT version: its timings would mislead the tactic choice.
    warn("the timing cache " + path + " does not match this GPU or TensorRT; starting an empty one");
    cache.reset(config.createTimingCache(nullptr, 0));
    if (!cache || !config.setTimingCache(*cache, false))
      throw Error(ErrorKind::kTensorRT, with_trt_error("could not attach a timing cache"), -1, "setTimingCache");
  }
  return cache;
}

Owned<nvinfer1::IBuilderConfig> make_config(nvinfer1::IBuilder& builder, const BuildOptions& options) {
  if (options.exclude_lean_runtime && !options.version_compatible)
    throw_invalid_argument("exclude_lean_runtime applies to version-compatible plans only (TensorRT ignores it "
                           "otherwise): set version_compatible too");
  ErrorScope scope;
  Owned<nvinfer1::IBuilderConfig> config(builder.createBuilderConfig());
  if (!config) throw Error(ErrorKind::kTensorRT, with_trt_error("could not create a builder config"), -1, "createBuilderConfig");
  if (options.workspace_bytes > 0) config->setMemoryPoolLimit(nvinfer1::MemoryPoolType::kWORKSPACE, options.workspace_bytes);
  // The lean runtime loads only version-compatible plans; kEXCLUDE_LEAN_RUNTIME leaves out the
  // lean runtime such a plan otherwise embeds (for a lean runtime shipped beside the plan).
  if (options.version_compatible) config->setFlag(nvinfer1::BuilderFlag::kVERSION_COMPATIBLE);
  if (options.exclude_lean_runtime) config->setFlag(nvinfer1::BuilderFlag::kEXCLUDE_LEAN_RUNTIME);
  return config;
}

int checked_build_device(int device) {
  if (device >= 0) validate_devices({device});
  return device;
}

// Everything one build uses. Members go in reverse order: the config, network and builder first,
// then what TensorRT was given pointers to without copying (the timing cache, the progress monitor,
// the group arrays of addDistCollective), and the previously current GPU is restored last.
struct BuildSession {
  explicit BuildSession(const BuildOptions& options)
      : device(checked_build_device(options.device)),
        builder(make_builder()),
        network(make_network(*builder)),
        config(make_config(*builder, options)) {}

  ScopedDevice device;  // the build's GPU (options.device), current on this thread while building
  std::unique_ptr<ProgressForwarder> progress;
  Owned<nvinfer1::ITimingCache> cache;
  GroupStorage groups;
  Owned<nvinfer1::IBuilder> builder;
  Owned<nvinfer1::INetworkDefinition> network;
  Owned<nvinfer1::IBuilderConfig> config;
};

std::vector<uint8_t> build_serialized(BuildSession& session, const BuildOptions& options) {
  nvinfer1::IBuilderConfig& config = *session.config;
  if (!options.timing_cache_path.empty()) session.cache = attach_timing_cache(config, options.timing_cache_path);
  if (options.show_progress) {
    session.progress = std::make_unique<ProgressForwarder>(options.progress ? options.progress : line_progress());
    config.setProgressMonitor(session.progress.get());
  }
  ErrorScope scope;
  Owned<nvinfer1::IHostMemory> plan(session.builder->buildSerializedNetwork(*session.network, config));
  config.setProgressMonitor(nullptr);
  ProgressForwarder* progress = session.progress.get();
  if (progress) progress->rethrow_if_failed();
  if (!plan || plan->size() == 0) {
    if (progress && progress->cancelled())
      throw Error(ErrorKind::kTensorRT, "the build was cancelled by the progress callback", -1, "buildSerializedNetwork");
    throw Error(ErrorKind::kTensorRT,
                with_trt_error("TensorRT could not build the network") +
                    ". The TensorRT log (logger 'mdtrt.tensorrt' in Python) has the details.",
                -1, "buildSerializedNetwork");
  }
  if (session.cache) {
    Owned<nvinfer1::IHostMemory> serialized(config.getTimingCache()->serialize());
    if (serialized) write_timing_cache(options.timing_cache_path, serialized->data(), serialized->size());
  }
  const auto* begin = static_cast<const uint8_t*>(plan->data());
  return std::vector<uint8_t>(begin, begin + plan->size());
}

std::string parser_errors(const nvonnxparser::IParser& parser) {
  std::ostringstream out;
  for (int i = 0; i < parser.getNbErrors(); ++i) {
    const nvonnxparser::IParserError* e = parser.getError(i);
    out << "\n  - ";
    if (e->node() >= 0) {
      out << "node " << e->node();
      if (e->nodeName() && *e->nodeName()) out << " '" << e->nodeName() << "'";
      if (e->nodeOperator() && *e->nodeOperator()) out << " (" << e->nodeOperator() << ")";
      out << ": ";
    }
    out << e->desc();
  }
  return out.str();
}

bool is_dynamic(const nvinfer1::Dims& dims) {
  for (int32_t i = 0; i < dims.nbDims; ++i)
    if (dims.d[i] < 0) return true;
  return false;
}

void add_profiles(nvinfer1::IBuilder& builder, nvinfer1::INetworkDefinition& network, nvinfer1::IBuilderConfig& config,
                  const std::map<std::string, ProfileShapes>& profiles) {
  std::map<std::string, nvinfer1::Dims> inputs;
  std::string names;
  for (int32_t i = 0; i < network.getNbInputs(); ++i) {
    nvinfer1::ITensor* t = network.getInput(i);
    inputs[t->getName()] = t->getDimensions();
    names += (names.empty() ? "" : ", ") + std::string(t->getName()) + " " + shape_string(from_dims(t->getDimensions()));
  }
  for (const auto& [name, shapes] : profiles) {
    if (inputs.count(name) == 0) throw_invalid_argument("profile for '" + name + "', which is not an input of the model (inputs: " + names + ")");
  }
  for (const auto& [name, dims] : inputs) {
    if (is_dynamic(dims) && profiles.count(name) == 0) {
      throw_invalid_argument("input '" + name + "' has dynamic shape " + shape_string(from_dims(dims)) +
                             ": give its (min, opt, max) shapes in profiles");
    }
  }
  if (profiles.empty()) return;
  nvinfer1::IOptimizationProfile* profile = builder.createOptimizationProfile();  // owned by the builder
  if (profile == nullptr) throw Error(ErrorKind::kTensorRT, with_trt_error("could not create an optimization profile"));
  using Sel = nvinfer1::OptProfileSelector;
  for (const auto& [name, shapes] : profiles) {
    const auto& [min, opt, max] = shapes;
    ErrorScope scope;
    if (!profile->setDimensions(name.c_str(), Sel::kMIN, to_dims(min)) ||
        !profile->setDimensions(name.c_str(), Sel::kOPT, to_dims(opt)) ||
        !profile->setDimensions(name.c_str(), Sel::kMAX, to_dims(max))) {
      throw Error(ErrorKind::kInvalidArgument,
                  with_trt_error("profile of '" + name + "' (min " + shape_string(min) + ", opt " + shape_string(opt) +
                                 ", max " + shape_string(max) + ") was refused") +
                      ". min <= opt <= max must hold per dimension, with the input's rank " +
                      shape_string(from_dims(inputs[name])) + ".",
                  -1, "IOptimizationProfile::setDimensions");
    }
  }
  ErrorScope scope;
  if (config.addOptimizationProfile(profile) < 0)
    throw Error(ErrorKind::kInvalidArgument, with_trt_error("the optimization profile is incomplete or invalid"), -1,
                "addOptimizationProfile");
}

}  // namespace

ProgressCallback line_progress() {
  return [](ProgressEvent event, const std::string& phase, const std::string& parent, int step, int nb_steps) {
    // Steps of nested phases are not printed: a build has thousands of them.
    static thread_local std::map<std::string, int> totals;
    if (event == ProgressEvent::kPhaseStart) {
      totals[phase] = nb_steps;
      if (parent.empty()) std::cerr << "[mdtrt] building: phase " << phase << " (" << nb_steps << " steps)\n";
    } else if (event == ProgressEvent::kStep) {
      auto it = totals.find(phase);
      if (it != totals.end() && it->second > 0 && parent.empty())
        std::cerr << "[mdtrt] building: phase " << phase << " step " << (step + 1) << "/" << it->second << "\n";
    } else {
      totals.erase(phase);
    }
    return true;
  };
}

int collective_layer_ranks(const CollectiveSpec& spec, int nb_ranks) {
  const bool shape_follows_ranks = spec.op == CollectiveOp::kAllGather || spec.op == CollectiveOp::kReduceScatter;
  return shape_follows_ranks && !spec.groups.empty() ? static_cast<int>(spec.groups.size()) : nb_ranks;
}

nvinfer1::ITensor* add_collective(nvinfer1::INetworkDefinition& network, nvinfer1::ITensor& input,
                                  const CollectiveSpec& spec, int nb_ranks, GroupStorage& groups_storage) {
  if (nb_ranks < 1) throw_invalid_argument("nb_ranks must be at least 1, got " + std::to_string(nb_ranks));
  spec.validate(nb_ranks);
  const bool reduces = op_reduces(spec.op);
  if (reduces && spec.reduce == ReduceOp::kNone)
    throw_invalid_argument(std::string(collective_op_name(spec.op)) + " needs a reduce operation (sum, prod, max, min, avg)");
  // addDistCollective keeps the pointer, not a copy (NvInfer.h does not say it copies): the array
  // lives in the caller's storage until the build returns.
  std::vector<int64_t>& groups = groups_storage.emplace_back(spec.groups.begin(), spec.groups.end());
  const int64_t root = op_has_root(spec.op) ? spec.root : -1;
  const ReduceOperation reduce = reduces ? to_trt(spec.reduce) : ReduceOperation::kNONE;

  ErrorScope scope;
  nvinfer1::IDistCollectiveLayer* layer =
      network.addDistCollective(input, to_trt(spec.op), reduce, root, groups.empty() ? nullptr : groups.data(),
                                static_cast<int64_t>(groups.size()));
  if (layer == nullptr)
    throw Error(ErrorKind::kTensorRT, with_trt_error("TensorRT refused the DistCollective layer " + spec.describe()), -1,
                "addDistCollective");
  const int layer_ranks = collective_layer_ranks(spec, nb_ranks);
  if (!layer->setNbRanks(layer_ranks))
    throw Error(ErrorKind::kTensorRT,
                with_trt_error("TensorRT refused " + std::to_string(layer_ranks) + " ranks for " + spec.describe()), -1,
                "IDistCollectiveLayer::setNbRanks");
  nvinfer1::ITensor* output = layer->getOutput(0);
  // The shape TensorRT gives the layer must be the one mdtrt's reference (and the caller) expects:
  // a mismatch would hand out wrong-sized outputs, so it is refused here, with both shapes.
  const Shape input_shape = from_dims(input.getDimensions());
  const int group_size = spec.groups.empty() ? nb_ranks : static_cast<int>(spec.groups.size());
  const Shape expected = collective_output_shape(spec, input_shape, group_size);
  const Shape got = from_dims(output->getDimensions());
  const bool known = !got.empty() && std::none_of(got.begin(), got.end(), [](int64_t d) { return d < 0; }) &&
                     std::none_of(input_shape.begin(), input_shape.end(), [](int64_t d) { return d < 0; });
  if (known && got != expected) {
    throw Error(ErrorKind::kTensorRT,
                "TensorRT gives " + spec.describe() + " the output shape " + shape_string(got) + " for input " +
                    shape_string(input_shape) + " (setNbRanks(" + std::to_string(layer_ranks) +
                    ")), mdtrt expects " + shape_string(expected) + " for a group of " +
                    std::to_string(group_size) + " ranks; the engine would return outputs of the wrong size",
                -1, "IDistCollectiveLayer::getOutput");
  }
  return output;
}

std::vector<uint8_t> build_dist_collective_engine(const CollectiveSpec& spec, DType dtype, const Shape& input_shape,
                                                  int nb_ranks, bool transpose_2d, const BuildOptions& options) {
  for (int64_t d : input_shape)
    if (d <= 0) throw_invalid_argument("the input shape must be static and positive, got " + shape_string(input_shape));
  if (input_shape.empty()) throw_invalid_argument("the collective needs an input of at least one dimension");
  if (transpose_2d && input_shape.size() != 2)
    throw_invalid_argument("transpose needs a 2-D input, got " + shape_string(input_shape));
  spec.validate(nb_ranks);
  Shape collective_input = input_shape;
  if (transpose_2d) std::swap(collective_input[0], collective_input[1]);
  const int group_size = spec.groups.empty() ? nb_ranks : static_cast<int>(spec.groups.size());
  (void)collective_output_shape(spec, collective_input, group_size);  // an uneven split is named here, not by TensorRT

  require_builder();
  BuildSession session(options);
  nvinfer1::INetworkDefinition* network = session.network.get();
  ErrorScope scope;
  nvinfer1::ITensor* tensor = network->addInput("input", to_trt(dtype), to_dims(input_shape));
  if (tensor == nullptr) throw Error(ErrorKind::kTensorRT, with_trt_error("could not add the input"), -1, "addInput");
  const nvinfer1::Permutation swap_2d{{1, 0}};
  if (transpose_2d) {
    nvinfer1::IShuffleLayer* t = network->addShuffle(*tensor);
    if (t == nullptr) throw Error(ErrorKind::kTensorRT, with_trt_error("could not add a transpose"), -1, "addShuffle");
    t->setFirstTranspose(swap_2d);
    tensor = t->getOutput(0);
  }
  tensor = add_collective(*network, *tensor, spec, nb_ranks, session.groups);
  if (transpose_2d) {
    nvinfer1::IShuffleLayer* t = network->addShuffle(*tensor);
    if (t == nullptr) throw Error(ErrorKind::kTensorRT, with_trt_error("could not add a transpose"), -1, "addShuffle");
    t->setFirstTranspose(swap_2d);
    tensor = t->getOutput(0);
  }
  tensor->setName("output");
  network->markOutput(*tensor);
  return build_serialized(session, options);
}

std::vector<uint8_t> build_engine_from_onnx(const std::string& model_bytes, const std::string& model_path,
                                            const std::map<std::string, ProfileShapes>& profiles,
                                            const BuildOptions& options,
                                            const std::vector<std::string>& parser_extra_dirs) {
  if (model_bytes.empty() && model_path.empty()) throw_invalid_argument("give the ONNX model as bytes or a path");
  require_builder();
  const ParserInfo& parser_info = load_onnx_parser(parser_extra_dirs);
  if (!parser_info.note.empty()) warn(parser_info.note);
  BuildSession session(options);
  nvinfer1::INetworkDefinition* network = session.network.get();
  ErrorScope scope;
  Owned<nvonnxparser::IParser> parser(static_cast<nvonnxparser::IParser*>(
      create_onnx_parser(network, static_cast<nvinfer1::ILogger*>(&logger()), NV_ONNX_PARSER_VERSION)));
  if (!parser) throw Error(ErrorKind::kTensorRT, with_trt_error("TensorRT's ONNX parser could not be created"), -1, "createNvOnnxParser");
  bool parsed = model_bytes.empty()
                    ? parser->parseFromFile(model_path.c_str(), static_cast<int>(nvinfer1::ILogger::Severity::kWARNING))
                    : parser->parse(model_bytes.data(), model_bytes.size(), model_path.empty() ? nullptr : model_path.c_str());
  if (!parsed) {
    std::string where = model_path.empty() ? "the ONNX model" : "the ONNX model " + model_path;
    throw Error(ErrorKind::kTensorRT,
                "TensorRT's ONNX parser rejected " + where + ":" + parser_errors(*parser) +
                    "\nCheck the model with onnx.checker, and that TensorRT " + std::to_string(header_major()) +
                    " supports every operator (and opset) it uses.",
                -1, "IParser::parse");
  }
  add_profiles(*session.builder, *network, *session.config, profiles);
  return build_serialized(session, options);
}

}  // namespace mdtrt::trt
