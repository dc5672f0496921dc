#include "trt/engine_program.h"

#include <algorithm>
#include <sstream>

#include "common/error.h"
#include "nccl/communicator.h"
#include "runtime/cuda_handles.h"
#include "trt/logger.h"
#include "trt/trt_library.h"

namespace mdtrt::trt {
namespace {

bool has_unknown_dim(const Shape& shape) {
  return std::any_of(shape.begin(), shape.end(), [](int64_t d) { return d < 0; });
}

}  // namespace

Owned<nvinfer1::ICudaEngine> deserialize_engine(nvinfer1::IRuntime& runtime, const void* data, size_t size,
                                                int rank) {
  if (data == nullptr || size == 0) throw Error(ErrorKind::kInvalidArgument, "the engine is empty (0 bytes)", rank);
  ErrorScope scope;
  Owned<nvinfer1::ICudaEngine> engine(runtime.deserializeCudaEngine(data, size));
  if (!engine) {
    throw Error(ErrorKind::kTensorRT,
                with_trt_error("could not deserialize the " + std::to_string(size) + "-byte engine") +
                    ". Is this a TensorRT " + std::to_string(header_major()) +
                    " plan built for this GPU? Plans only load with the TensorRT version and GPU architecture they "
                    "were built for; the lean runtime only loads plans built version-compatible "
                    "(version_compatible=True), and a version-compatible plan that embeds the lean runtime only "
                    "with allow_host_code=True.",
                rank, "deserializeCudaEngine");
  }
  return engine;
}

std::vector<EngineTensor> engine_tensors(const nvinfer1::ICudaEngine& engine) {
  std::vector<EngineTensor> out;
  const int32_t count = engine.getNbIOTensors();
  for (int32_t i = 0; i < count; ++i) {
    const char* name = engine.getIOTensorName(i);
    EngineTensor t;
    t.name = name;
    t.is_input = engine.getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
    t.dtype = from_trt(engine.getTensorDataType(name), t.name);
    t.shape = from_dims(engine.getTensorShape(name));
    if (t.is_input && engine.isShapeInferenceIO(name)) {
      throw Error(ErrorKind::kTensorRT,
                  "input '" + t.name +
                      "' is a shape tensor (its values, read on the host, set shapes), which mdtrt does not feed; "
                      "export the model with that input as a constant or a data input",
                  -1, "engine IO");
    }
    if (t.is_input && engine.getNbOptimizationProfiles() > 0) {
      t.profile_min = from_dims(engine.getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMIN));
      t.profile_max = from_dims(engine.getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMAX));
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<EngineTensor> inspect_engine(const void* data, size_t size, int device, bool allow_host_code) {
  ScopedDevice on(device);
  auto runtime = make_runtime(-1, allow_host_code);
  auto engine = deserialize_engine(*runtime, data, size);
  return engine_tensors(*engine);
}

struct EngineProgram::RankState {
  int device = -1;
  // The communicator given to setCommunicator, which "must outlive the execution contexts it is
  // attached to" (NvInferRuntime.h): shared with the DeviceGroup, so that a program kept after its
  // group was closed still holds it, and released only after the context (see the destructor).
  std::shared_ptr<Communicator> communicator;
  Owned<nvinfer1::IRuntime> runtime;
  Owned<nvinfer1::ICudaEngine> engine;
  Owned<nvinfer1::IExecutionContext> context;
  std::vector<EngineTensor> inputs;
  std::vector<EngineTensor> outputs;
  // The input shapes last set on the context and the output specs they gave: set again only when
  // they change (setInputShape and getTensorShape cost host time on every call otherwise, and a
  // CUDA graph replays on shapes that did not change).
  std::vector<Shape> input_shapes;
  std::vector<TensorSpec> output_specs;
  bool shapes_set = false;
  int shape_changes = 0;

  ~RankState() {
    if (communicator && communicator->aborted()) {
      // The communicator was aborted under the context (a deadline passed, or the group was
      // aborted): TensorRT's contract is broken already, and what destroying a context does with
      // an aborted communicator (and the ones TensorRT derived from it) is not documented. The
      // context, engine and runtime are deliberately leaked: device memory of a group that can no
      // longer be used, instead of a possible crash.
      (void)context.release();
      (void)engine.release();
      (void)runtime.release();
      return;
    }
    // The context holds device memory of this rank's GPU: release it there, context first, the
    // runtime last (TensorRT requires objects to go before the runtime that made them), and the
    // communicator after all of them.
    ScopedDevice on(device, std::nothrow);
    context.reset();
    engine.reset();
    runtime.reset();
  }
};

EngineProgram::EngineProgram(std::vector<EngineBytes> engines, bool multi_device, bool allow_host_code)
    : engines_(std::move(engines)), multi_device_(multi_device), allow_host_code_(allow_host_code) {
  if (engines_.empty()) throw_invalid_argument("EngineProgram needs one engine per local rank, got none");
  for (size_t i = 0; i < engines_.size(); ++i) {
    if (!engines_[i] || engines_[i]->empty())
      throw_invalid_argument("the engine for local rank " + std::to_string(i) + " is empty");
  }
  states_.resize(engines_.size());
}

EngineProgram::~EngineProgram() = default;

std::vector<int> EngineProgram::shape_changes() const {
  std::vector<int> out;
  for (const auto& st : states_) out.push_back(st ? st->shape_changes : 0);
  return out;
}

std::string EngineProgram::describe() const {
  bool shared = std::all_of(engines_.begin(), engines_.end(), [&](const EngineBytes& e) { return e == engines_[0]; });
  std::ostringstream out;
  out << "TensorRT engine (" << (shared ? "one plan shared by " : "one plan per rank, ") << engines_.size()
      << " ranks, " << (multi_device_ ? "multi-device" : "single-device, no communicator")
      << ")";
  return out.str();
}

EngineProgram::RankState& EngineProgram::state(const RankContext& ctx) const {
  if (ctx.local_index < 0 || static_cast<size_t>(ctx.local_index) >= states_.size() || !states_[ctx.local_index]) {
    throw Error(ErrorKind::kInvalidArgument, "the engine is not bound on local rank " + std::to_string(ctx.local_index),
                ctx.rank, "EngineProgram");
  }
  return *states_[ctx.local_index];
}

void EngineProgram::bind(RankContext& ctx) {
  if (ctx.local_index < 0 || static_cast<size_t>(ctx.local_index) >= engines_.size()) {
    throw Error(ErrorKind::kInvalidArgument,
                "EngineProgram has " + std::to_string(engines_.size()) + " engines but is bound on local rank " +
                    std::to_string(ctx.local_index) + ": give one engine per local rank",
                ctx.rank, "bind");
  }
  if (states_[ctx.local_index]) {
    // Its context is attached to the first group's communicator (setCommunicator is once per
    // context) and its first runner uses it: a second bind would swap the context under that runner.
    throw Error(ErrorKind::kInvalidArgument,
                "this EngineProgram is already bound (to a runner on a device group); an EngineProgram runs in "
                "one runner only: create a new one (mdtrt.tensorrt.engine_program, or EngineRunner(engine=...)) "
                "for each runner",
                ctx.rank, "bind");
  }
  if (multi_device_ && ctx.world == nullptr) {
    throw Error(ErrorKind::kInvalidArgument,
                "a multi-device engine needs the group's communicator, and this runtime has none", ctx.rank, "bind");
  }
  auto st = std::make_unique<RankState>();
  st->device = ctx.device;
  if (multi_device_) st->communicator = ctx.world;
  st->runtime = make_runtime(ctx.rank, allow_host_code_);
  const auto& bytes = *engines_[ctx.local_index];
  st->engine = deserialize_engine(*st->runtime, bytes.data(), bytes.size(), ctx.rank);
  for (auto& t : engine_tensors(*st->engine)) (t.is_input ? st->inputs : st->outputs).push_back(std::move(t));

  ErrorScope scope;
  st->context.reset(st->engine->createExecutionContext());
  if (!st->context) {
    throw Error(ErrorKind::kTensorRT,
                with_trt_error("could not create an execution context") +
                    ". The GPU may be out of memory for the engine's activations.",
                ctx.rank, "createExecutionContext");
  }
  if (multi_device_) {
    Logger::clear_last_error();
    if (!st->context->setCommunicator(static_cast<void*>(ctx.world->handle()))) {
      // TensorRT's engine does not report the rank count it was built for, so both documented
      // causes are named, with the one number known here.
      const std::string w = std::to_string(ctx.world_size);
      throw Error(ErrorKind::kTensorRT,
                  with_trt_error("TensorRT refused the world communicator of " + w + " ranks") +
                      ". TensorRT refuses it when (1) the engine has no multi-device layer (DistCollective, "
                      "multi-device attention): run such an engine with multi_device=False; or (2) the plan was "
                      "built for another number of ranks than this group's world size " + w +
                      " (setNbRanks / nb_ranks at build time): build it for " + w +
                      " ranks or run it on a group of the size it was built for.",
                  ctx.rank, "setCommunicator");
    }
  }
  states_[ctx.local_index] = std::move(st);
}

std::vector<TensorSpec> EngineProgram::input_specs(const RankContext& ctx) const {
  std::vector<TensorSpec> out;
  for (const auto& t : state(ctx).inputs) out.push_back(TensorSpec{t.name, t.dtype, t.shape});
  return out;
}

std::vector<TensorSpec> EngineProgram::resolve_outputs(RankContext& ctx, const std::vector<TensorView>& inputs) {
  RankState& st = state(ctx);
  if (st.shapes_set && inputs.size() == st.input_shapes.size()) {
    bool same = true;
    for (size_t i = 0; i < inputs.size() && same; ++i)
      same = inputs[i].shape == st.input_shapes[i] && inputs[i].dtype == st.inputs[i].dtype;
    if (same) return st.output_specs;
  }
  st.shapes_set = false;  // until every shape below is set: a failure midway leaves the context changed
  st.input_shapes.clear();
  if (inputs.size() != st.inputs.size()) {
    throw Error(ErrorKind::kInvalidArgument,
                "the engine takes " + std::to_string(st.inputs.size()) + " inputs, got " +
                    std::to_string(inputs.size()),
                ctx.rank, "setInputShape");
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const EngineTensor& spec = st.inputs[i];
    if (inputs[i].dtype != spec.dtype) {
      throw Error(ErrorKind::kInvalidArgument,
                  "input '" + spec.name + "' is " + dtype_name(inputs[i].dtype) + "; the engine takes " +
                      dtype_name(spec.dtype) + ": convert it to " + dtype_name(spec.dtype) + " first",
                  ctx.rank, "setInputShape");
    }
    ErrorScope scope;
    if (!st.context->setInputShape(spec.name.c_str(), to_dims(inputs[i].shape))) {
      std::string allowed = "shape " + shape_string(spec.shape);
      if (!spec.profile_min.empty() || !spec.profile_max.empty())
        allowed += ", from " + shape_string(spec.profile_min) + " to " + shape_string(spec.profile_max) +
                   " (optimization profile 0)";
      throw Error(ErrorKind::kInvalidArgument,
                  with_trt_error("input '" + spec.name + "' cannot take shape " + shape_string(inputs[i].shape)) +
                      ". The engine accepts " + allowed + ".",
                  ctx.rank, "setInputShape");
    }
  }
  std::vector<TensorSpec> out;
  for (const auto& t : st.outputs) {
    Shape shape = from_dims(st.context->getTensorShape(t.name.c_str()));
    if (has_unknown_dim(shape)) {
      throw Error(ErrorKind::kTensorRT,
                  "output '" + t.name + "' has shape " + shape_string(shape) +
                      " after setting the input shapes: a data-dependent output shape, which mdtrt does not "
                      "support (it allocates outputs before running)",
                  ctx.rank, "getTensorShape");
    }
    out.push_back(TensorSpec{t.name, t.dtype, std::move(shape)});
  }
  for (const auto& v : inputs) st.input_shapes.push_back(v.shape);
  st.shapes_set = true;
  st.output_specs = out;
  st.shape_changes += 1;
  return out;
}

void EngineProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                            const std::vector<TensorView>& outputs) {
  RankState& st = state(ctx);
  if (inputs.size() != st.inputs.size() || outputs.size() != st.outputs.size()) {
    throw Error(ErrorKind::kInvalidArgument,
                "the engine has " + std::to_string(st.inputs.size()) + " inputs and " +
                    std::to_string(st.outputs.size()) + " outputs, got " + std::to_string(inputs.size()) + " and " +
                    std::to_string(outputs.size()),
                ctx.rank, "enqueueV3");
  }
  ErrorScope scope;
  auto set_address = [&](const EngineTensor& t, void* data) {
    if (!st.context->setTensorAddress(t.name.c_str(), data))
      throw Error(ErrorKind::kTensorRT, with_trt_error("could not set the address of '" + t.name + "'"), ctx.rank,
                  "setTensorAddress");
  };
  for (size_t i = 0; i < inputs.size(); ++i) set_address(st.inputs[i], inputs[i].data);
  for (size_t i = 0; i < outputs.size(); ++i) set_address(st.outputs[i], outputs[i].data);
  if (!st.context->enqueueV3(ctx.stream)) {
    throw Error(ErrorKind::kTensorRT, with_trt_error("TensorRT could not enqueue the engine"), ctx.rank, "enqueueV3");
  }
}

}  // namespace mdtrt::trt
