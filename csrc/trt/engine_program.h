// A serialized TensorRT engine as a RankProgram: every rank deserializes its engine on its own
// thread and GPU, and multi-device engines get the world communicator through setCommunicator on
// all ranks at once (TensorRT's communicator set-up is collective).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/rank_program.h"
#include "trt/factory.h"
#include "trt/trt_types.h"

namespace mdtrt::trt {

using EngineBytes = std::shared_ptr<const std::vector<uint8_t>>;

// Deserializes `size` bytes on the current CUDA device. Throws kInvalidArgument for empty input and
// kTensorRT with TensorRT's message when the bytes are not a plan this TensorRT and GPU can load.
Owned<nvinfer1::ICudaEngine> deserialize_engine(nvinfer1::IRuntime& runtime, const void* data, size_t size,
                                                int rank = -1);

struct EngineTensor {
  std::string name;
  bool is_input = false;
  DType dtype = DType::kFloat32;
  Shape shape;        // -1 for dimensions fixed only when inputs are given
  Shape profile_min;  // inputs: the range profile 0 accepts (empty for outputs)
  Shape profile_max;
};

// IO tensors in the engine's order. Throws kTensorRT for IO mdtrt cannot serve (shape-tensor
// inputs, FP8/INT4/FP4 tensors).
std::vector<EngineTensor> engine_tensors(const nvinfer1::ICudaEngine& engine);

// Deserializes a plan on `device` without a DeviceGroup and lists its IO: "does this plan load
// here?" for tools and tests.
std::vector<EngineTensor> inspect_engine(const void* data, size_t size, int device, bool allow_host_code = false);

class EngineProgram : public RankProgram {
 public:
  // engines[i] is local rank i's plan; the same pointer on every rank for a shared engine.
  // multi_device = false runs a single-device engine without a communicator. An EngineProgram is
  // bound once, to one group (its contexts hold that group's communicator): binding it again is
  // refused.
  explicit EngineProgram(std::vector<EngineBytes> engines, bool multi_device = true, bool allow_host_code = false);
  ~EngineProgram() override;

  std::string describe() const override;
  void bind(RankContext& ctx) override;
  std::vector<TensorSpec> input_specs(const RankContext& ctx) const override;
  std::vector<TensorSpec> resolve_outputs(RankContext& ctx, const std::vector<TensorView>& inputs) override;
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;
  // IExecutionContext::setTensorAddress takes 256-byte aligned addresses only.
  size_t required_alignment() const override { return 256; }

  bool multi_device() const { return multi_device_; }
  bool allow_host_code() const { return allow_host_code_; }
  size_t num_engines() const { return engines_.size(); }
  // Per local rank: how many times the input shapes were set on the context (only when they change).
  std::vector<int> shape_changes() const;

 private:
  struct RankState;
  RankState& state(const RankContext& ctx) const;

  std::vector<EngineBytes> engines_;
  bool multi_device_;
  bool allow_host_code_;
  std::vector<std::unique_ptr<RankState>> states_;  // by local index, filled by bind
};

}  // namespace mdtrt::trt
