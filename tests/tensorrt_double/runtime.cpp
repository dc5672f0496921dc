// The runtime half of the TensorRT test double: IRuntime, ICudaEngine, IExecutionContext.
// Deserializing and inspecting a plan needs no GPU; an execution context runs the plan's layers on
// the caller's stream: shuffles as device copies, DistCollective layers through NCCL on
// communicators split from the one given to setCommunicator.
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>

#include "nccl/nccl_api.h"  // mdtrt's declaration of NCCL's stable C ABI (no NCCL header needed)
#include "objects.h"

namespace trt_double {
namespace {

namespace nccl = mdtrt::nccl;
using nvinfer1::CollectiveOperation;
using nvinfer1::Dims;

Shape to_shape(const Dims& dims) { return dims.nbDims < 0 ? Shape{} : Shape(dims.d, dims.d + dims.nbDims); }

Dims to_dims(const Shape& shape) {
  Dims dims{};
  dims.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size() && i < static_cast<size_t>(Dims::MAX_DIMS); ++i) dims.d[i] = shape[i];
  return dims;
}

int64_t volume(const Shape& s) {
  int64_t v = 1;
  for (int64_t d : s) v *= d;
  return v;
}

bool dynamic(const Shape& s) {
  return std::any_of(s.begin(), s.end(), [](int64_t d) { return d < 0; });
}

// ---------------------------------------------------------------------------------------------
// NCCL: the copy already in the process, found as TensorRT finds it (by soname, loaded first by
// whoever created the communicators), else whatever the loader gives for libnccl.so.2.
struct Nccl {
  nccl::Result (*CommSplit)(nccl::Comm, int, int, nccl::Comm*, nccl::Config*) = nullptr;
  nccl::Result (*CommFinalize)(nccl::Comm) = nullptr;
  nccl::Result (*CommDestroy)(nccl::Comm) = nullptr;
  nccl::Result (*CommAbort)(nccl::Comm) = nullptr;
  nccl::Result (*CommCount)(const nccl::Comm, int*) = nullptr;
  nccl::Result (*CommUserRank)(const nccl::Comm, int*) = nullptr;
  const char* (*GetErrorString)(nccl::Result) = nullptr;
  nccl::Result (*GroupStart)() = nullptr;
  nccl::Result (*GroupEnd)() = nullptr;
  nccl::Result (*AllReduce)(const void*, void*, size_t, nccl::DataType, nccl::RedOp, nccl::Comm, cudaStream_t) = nullptr;
  nccl::Result (*AllGather)(const void*, void*, size_t, nccl::DataType, nccl::Comm, cudaStream_t) = nullptr;
  nccl::Result (*Broadcast)(const void*, void*, size_t, nccl::DataType, int, nccl::Comm, cudaStream_t) = nullptr;
  nccl::Result (*Reduce)(const void*, void*, size_t, nccl::DataType, nccl::RedOp, int, nccl::Comm, cudaStream_t) = nullptr;
  nccl::Result (*ReduceScatter)(const void*, void*, size_t, nccl::DataType, nccl::RedOp, nccl::Comm, cudaStream_t) = nullptr;
  nccl::Result (*Send)(const void*, size_t, nccl::DataType, int, nccl::Comm, cudaStream_t) = nullptr;
  nccl::Result (*Recv)(void*, size_t, nccl::DataType, int, nccl::Comm, cudaStream_t) = nullptr;
  std::string error;  // why NCCL is unusable ("" when it is)
};

template <typename F>
bool resolve(void* handle, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  if (fn == nullptr && error.empty()) error = std::string("libnccl.so.2 has no symbol ") + name;
  return fn != nullptr;
}

const Nccl& nccl_api() {
  static Nccl api;
  static std::once_flag once;
  std::call_once(once, [] {
    void* handle = dlopen("libnccl.so.2", RTLD_NOLOAD | RTLD_NOW);
    if (handle == nullptr) handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      api.error = std::string("NCCL (libnccl.so.2) could not be loaded: ") + (why ? why : "not found");
      return;
    }
    std::string& e = api.error;
    resolve(handle, "ncclCommSplit", api.CommSplit, e);
    resolve(handle, "ncclCommFinalize", api.CommFinalize, e);
    resolve(handle, "ncclCommDestroy", api.CommDestroy, e);
    resolve(handle, "ncclCommAbort", api.CommAbort, e);
    resolve(handle, "ncclCommCount", api.CommCount, e);
    resolve(handle, "ncclCommUserRank", api.CommUserRank, e);
    resolve(handle, "ncclGetErrorString", api.GetErrorString, e);
    resolve(handle, "ncclGroupStart", api.GroupStart, e);
    resolve(handle, "ncclGroupEnd", api.GroupEnd, e);
    resolve(handle, "ncclAllReduce", api.AllReduce, e);
    resolve(handle, "ncclAllGather", api.AllGather, e);
    resolve(handle, "ncclBroadcast", api.Broadcast, e);
    resolve(handle, "ncclReduce", api.Reduce, e);
    resolve(handle, "ncclReduceScatter", api.ReduceScatter, e);
    resolve(handle, "ncclSend", api.Send, e);
    resolve(handle, "ncclRecv", api.Recv, e);
  });
  return api;
}

nccl::DataType nccl_type(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return nccl::kFloat32;
    case nvinfer1::DataType::kHALF: return nccl::kFloat16;
    case nvinfer1::DataType::kBF16: return nccl::kBfloat16;
    case nvinfer1::DataType::kINT32: return nccl::kInt32;
    case nvinfer1::DataType::kINT64: return nccl::kInt64;
    case nvinfer1::DataType::kINT8: return nccl::kInt8;
    default: return nccl::kUint8;  // UINT8, BOOL, FP8: moved as bytes (never reduced: refused at build)
  }
}

nccl::RedOp nccl_reduce(nvinfer1::ReduceOperation op) {
  switch (op) {
    case nvinfer1::ReduceOperation::kPROD: return nccl::kProd;
    case nvinfer1::ReduceOperation::kMAX: return nccl::kMax;
    case nvinfer1::ReduceOperation::kMIN: return nccl::kMin;
    case nvinfer1::ReduceOperation::kAVG: return nccl::kAvg;
    default: return nccl::kSum;
  }
}

// A communicator split off for one layer: released (finalize, destroy) with the context.
struct ChildComm {
  nccl::Comm comm = nullptr;
  int rank = -1;  // group-local rank; -1: this rank is not in the layer's group
  int size = 0;
  ChildComm() = default;
  ChildComm(const ChildComm&) = delete;
  ChildComm& operator=(const ChildComm&) = delete;
  ~ChildComm() {
    if (comm == nullptr) return;
    const Nccl& api = nccl_api();
    if (api.CommFinalize(comm) == nccl::kSuccess) {
      api.CommDestroy(comm);
    } else {
      api.CommAbort(comm);
    }
  }
};

// Device memory of the context (intermediate tensors), freed on the device it came from.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  int device = -1;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }
  void release() {
    if (ptr == nullptr) return;
    int previous = -1;
    cudaGetDevice(&previous);
    cudaSetDevice(device);
    cudaFree(ptr);
    if (previous >= 0) cudaSetDevice(previous);
    ptr = nullptr;
    bytes = 0;
  }
};

class Engine;

// ---------------------------------------------------------------------------------------------
class Context : public nvinfer1::IExecutionContext, public DefaultVExecutionContext {
 public:
  Context(nvinfer1::ILogger* logger, Engine& engine);

  nvinfer1::ICudaEngine const& getEngine() const noexcept override;
  void setName(char const* name) noexcept override { name_ = name ? name : ""; }
  char const* getName() const noexcept override { return name_.c_str(); }
  void setDebugSync(bool sync) noexcept override { debug_sync_ = sync; }
  bool getDebugSync() const noexcept override { return debug_sync_; }
  int32_t getOptimizationProfile() const noexcept override { return 0; }
  bool setOptimizationProfileAsync(int32_t index, cudaStream_t) noexcept override {
    if (index == 0) return true;
    error(logger_, "setOptimizationProfileAsync(" + std::to_string(index) + "): the plan has one optimization profile (0)");
    return false;
  }
  bool allInputDimensionsSpecified() const noexcept override;
  bool setInputShape(char const* name, Dims const& dims) noexcept override;
  Dims getTensorShape(char const* name) const noexcept override;
  bool setTensorAddress(char const* name, void* data) noexcept override;
  void const* getTensorAddress(char const* name) const noexcept override;
  bool setInputTensorAddress(char const* name, void const* data) noexcept override;
  bool setOutputTensorAddress(char const* name, void* data) noexcept override;
  void* getOutputTensorAddress(char const* name) const noexcept override;
  int32_t inferShapes(int32_t, char const**) noexcept override;
  bool enqueueV3(cudaStream_t stream) noexcept override;
  bool setCommunicator(void* communicator) noexcept override;
  void setEnqueueEmitsProfile(bool) noexcept override {}
  bool getEnqueueEmitsProfile() const noexcept override { return false; }
  void setPersistentCacheLimit(size_t size) noexcept override { cache_limit_ = size; }
  size_t getPersistentCacheLimit() const noexcept override { return cache_limit_; }
  bool setNvtxVerbosity(nvinfer1::ProfilingVerbosity) noexcept override { return true; }
  nvinfer1::ProfilingVerbosity getNvtxVerbosity() const noexcept override { return nvinfer1::ProfilingVerbosity::kLAYER_NAMES_ONLY; }
  cudaEvent_t getInputConsumedEvent() const noexcept override { return nullptr; }
  size_t updateDeviceMemorySizeForShapes() noexcept override { return 0; }

 private:
  const Plan& plan() const;
  int io_tensor(const char* name, const char* call) const;
  std::vector<Shape> input_shapes() const;
  bool fail(const std::string& text) const {
    error(logger_, text);
    return false;
  }
  bool cuda_ok(cudaError_t status, const std::string& what) const {
    if (status == cudaSuccess) return true;
    cudaGetLastError();
    return fail("enqueueV3: " + what + " failed: " + cudaGetErrorString(status));
  }
  bool nccl_ok(nccl::Result status, const std::string& what) const {
    if (status == nccl::kSuccess || status == nccl::kInProgress) return true;
    return fail("enqueueV3: " + what + " failed: " + nccl_api().GetErrorString(status));
  }
  bool ensure(DeviceBuffer& buffer, size_t bytes, bool capturing, const std::string& what);
  bool transpose_2d(const void* src, void* dst, int64_t rows, int64_t cols, size_t esize, cudaStream_t stream);
  bool run_collective(const LayerInfo& layer, const ChildComm& comm, const void* in, void* out, const Shape& shape,
                      nvinfer1::DataType type, cudaStream_t stream);

  Engine& engine_;
  std::string name_;
  bool debug_sync_ = false;
  size_t cache_limit_ = 0;
  int device_ = 0;
  std::vector<Shape> set_shapes_;  // per plan input; empty = not set
  std::map<int, void*> addresses_;  // IO tensor index -> address
  std::vector<std::unique_ptr<ChildComm>> comms_;  // per layer (null for non-collective layers)
  bool has_communicator_ = false;
  std::vector<DeviceBuffer> buffers_;  // per tensor (intermediates only)
  std::vector<DeviceBuffer> scratch_;  // per layer (shuffles with two transposes)
};

class Engine : public nvinfer1::ICudaEngine, public DefaultVCudaEngine {
 public:
  Engine(nvinfer1::ILogger* logger, Plan plan) : DefaultVCudaEngine(logger), plan_(std::move(plan)) {
    mImpl = this;
    for (const auto& in : plan_.inputs) io_.push_back(in.tensor);
    for (int o : plan_.outputs)
      if (!plan_.is_input(o)) io_.push_back(o);
  }
  const Plan& plan() const { return plan_; }
  nvinfer1::ILogger* logger() const { return logger_; }

  // IO tensor index of `name`, or -1 (logged when `call` is given).
  int io_tensor(const char* name, const char* call) const {
    if (name != nullptr)
      for (int t : io_)
        if (plan_.tensors[t].name == name) return t;
    if (call != nullptr) error(logger_, std::string(call) + ": '" + (name ? name : "(null)") + "' is not an input or output of the engine");
    return -1;
  }
  int input_slot(int tensor) const {
    for (size_t i = 0; i < plan_.inputs.size(); ++i)
      if (plan_.inputs[i].tensor == tensor) return static_cast<int>(i);
    return -1;
  }

  nvinfer1::ICudaEngine* getPImpl() noexcept override { return this; }
  int32_t getNbLayers() const noexcept override { return static_cast<int32_t>(plan_.layers.size()); }
  nvinfer1::IHostMemory* serialize() const noexcept override { return new HostMemory(logger_, trt_double::serialize(plan_)); }
  nvinfer1::IExecutionContext* createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy) noexcept override {
    return new Context(logger_, *this);
  }
  bool isRefittable() const noexcept override { return false; }
  char const* getName() const noexcept override { return plan_.name.c_str(); }
  int32_t getNbOptimizationProfiles() const noexcept override { return 1; }
  nvinfer1::EngineCapability getEngineCapability() const noexcept override { return nvinfer1::EngineCapability::kSTANDARD; }
  nvinfer1::TacticSources getTacticSources() const noexcept override { return 0; }
  nvinfer1::ProfilingVerbosity getProfilingVerbosity() const noexcept override { return nvinfer1::ProfilingVerbosity::kLAYER_NAMES_ONLY; }
  Dims getTensorShape(char const* name) const noexcept override {
    int t = io_tensor(name, "getTensorShape");
    if (t < 0) return neutral<Dims>();
    std::vector<Shape> shapes;
    std::string why;
    if (!infer_shapes(plan_, {}, shapes, why)) return neutral<Dims>();
    return to_dims(shapes[t]);
  }
  nvinfer1::DataType getTensorDataType(char const* name) const noexcept override {
    int t = io_tensor(name, "getTensorDataType");
    return t < 0 ? nvinfer1::DataType::kFLOAT : plan_.tensors[t].type;
  }
  nvinfer1::TensorLocation getTensorLocation(char const*) const noexcept override { return nvinfer1::TensorLocation::kDEVICE; }
  bool isShapeInferenceIO(char const*) const noexcept override { return false; }
  nvinfer1::TensorIOMode getTensorIOMode(char const* name) const noexcept override {
    int t = io_tensor(name, nullptr);
    if (t < 0) return nvinfer1::TensorIOMode::kNONE;
    return plan_.is_input(t) ? nvinfer1::TensorIOMode::kINPUT : nvinfer1::TensorIOMode::kOUTPUT;
  }
  int32_t getTensorBytesPerComponent(char const* name) const noexcept override {
    int t = io_tensor(name, "getTensorBytesPerComponent");
    return t < 0 ? -1 : static_cast<int32_t>(dtype_size(plan_.tensors[t].type));
  }
  int32_t getTensorComponentsPerElement(char const*) const noexcept override { return 1; }
  nvinfer1::TensorFormat getTensorFormat(char const*) const noexcept override { return nvinfer1::TensorFormat::kLINEAR; }
  int32_t getTensorVectorizedDim(char const*) const noexcept override { return -1; }
  Dims getProfileShape(char const* name, int32_t profile, nvinfer1::OptProfileSelector select) const noexcept override {
    int t = io_tensor(name, "getProfileShape");
    int slot = t < 0 ? -1 : input_slot(t);
    if (slot < 0 || profile != 0) {
      if (t >= 0) error(logger_, std::string("getProfileShape: '") + name + "' is not an input or profile " + std::to_string(profile) + " does not exist");
      return neutral<Dims>();
    }
    const InputInfo& in = plan_.inputs[slot];
    switch (select) {
      case nvinfer1::OptProfileSelector::kMIN: return to_dims(in.min);
      case nvinfer1::OptProfileSelector::kOPT: return to_dims(in.opt);
      default: return to_dims(in.max);
    }
  }
  int32_t getNbIOTensors() const noexcept override { return static_cast<int32_t>(io_.size()); }
  char const* getIOTensorName(int32_t index) const noexcept override {
    return index >= 0 && index < getNbIOTensors() ? plan_.tensors[io_[index]].name.c_str() : nullptr;
  }
  nvinfer1::HardwareCompatibilityLevel getHardwareCompatibilityLevel() const noexcept override {
    return nvinfer1::HardwareCompatibilityLevel::kNONE;
  }
  int32_t getNbAuxStreams() const noexcept override { return 0; }
  int64_t getStreamableWeightsSize() const noexcept override { return 0; }
  bool isDebugTensor(char const*) const noexcept override { return false; }
  int64_t getDeviceMemorySizeV2() const noexcept override { return 0; }
  int64_t getDeviceMemorySizeForProfileV2(int32_t) const noexcept override { return 0; }
  char const* getAliasedInputTensor(char const*) const noexcept override { return nullptr; }

 private:
  Plan plan_;
  std::vector<int> io_;  // inputs, then outputs
};

Context::Context(nvinfer1::ILogger* logger, Engine& engine)
    : DefaultVExecutionContext(logger), engine_(engine), set_shapes_(engine.plan().inputs.size()),
      buffers_(engine.plan().tensors.size()), scratch_(engine.plan().layers.size()) {
  mImpl = this;
  // The context belongs to the device current at its creation, as in TensorRT.
  if (cudaGetDevice(&device_) != cudaSuccess) {
    cudaGetLastError();
    device_ = 0;
  }
  comms_.resize(plan().layers.size());
}

const Plan& Context::plan() const { return engine_.plan(); }
nvinfer1::ICudaEngine const& Context::getEngine() const noexcept { return engine_; }
int Context::io_tensor(const char* name, const char* call) const { return engine_.io_tensor(name, call); }

std::vector<Shape> Context::input_shapes() const {
  std::vector<Shape> out;
  for (size_t i = 0; i < plan().inputs.size(); ++i)
    out.push_back(set_shapes_[i].empty() ? plan().tensors[plan().inputs[i].tensor].dims : set_shapes_[i]);
  return out;
}

bool Context::allInputDimensionsSpecified() const noexcept {
  for (const auto& s : input_shapes())
    if (dynamic(s)) return false;
  return true;
}

bool Context::setInputShape(char const* name, Dims const& dims) noexcept {
  int t = io_tensor(name, "setInputShape");
  if (t < 0) return false;
  int slot = engine_.input_slot(t);
  if (slot < 0) return fail(std::string("setInputShape: '") + name + "' is an output, not an input");
  const InputInfo& in = plan().inputs[slot];
  Shape shape = to_shape(dims);
  bool fits = dims.nbDims >= 0 && shape.size() == in.min.size();
  for (size_t i = 0; fits && i < shape.size(); ++i) fits = in.min[i] <= shape[i] && shape[i] <= in.max[i];
  if (!fits) {
    return fail(std::string("setInputShape: ") + shape_string(shape) + " is outside the range of input '" + name +
                "' in optimization profile 0: from " + shape_string(in.min) + " to " + shape_string(in.max));
  }
  set_shapes_[slot] = shape;
  return true;
}

Dims Context::getTensorShape(char const* name) const noexcept {
  int t = io_tensor(name, "getTensorShape");
  if (t < 0) return neutral<Dims>();
  std::vector<Shape> shapes;
  std::string why;
  if (!infer_shapes(plan(), input_shapes(), shapes, why)) {
    error(logger_, "getTensorShape('" + std::string(name) + "'): " + why);
    return neutral<Dims>();
  }
  return to_dims(shapes[t]);
}

bool Context::setTensorAddress(char const* name, void* data) noexcept {
  int t = io_tensor(name, "setTensorAddress");
  if (t < 0) return false;
  addresses_[t] = data;
  return true;
}

void const* Context::getTensorAddress(char const* name) const noexcept {
  int t = io_tensor(name, "getTensorAddress");
  auto it = addresses_.find(t);
  return it == addresses_.end() ? nullptr : it->second;
}

bool Context::setInputTensorAddress(char const* name, void const* data) noexcept {
  int t = io_tensor(name, "setInputTensorAddress");
  if (t < 0) return false;
  if (!plan().is_input(t)) return fail(std::string("setInputTensorAddress: '") + name + "' is not an input");
  addresses_[t] = const_cast<void*>(data);
  return true;
}

bool Context::setOutputTensorAddress(char const* name, void* data) noexcept {
  int t = io_tensor(name, "setOutputTensorAddress");
  if (t < 0) return false;
  if (plan().is_input(t)) return fail(std::string("setOutputTensorAddress: '") + name + "' is not an output");
  addresses_[t] = data;
  return true;
}

void* Context::getOutputTensorAddress(char const* name) const noexcept {
  int t = io_tensor(name, "getOutputTensorAddress");
  auto it = addresses_.find(t);
  return it == addresses_.end() || plan().is_input(t) ? nullptr : it->second;
}

int32_t Context::inferShapes(int32_t nbMaxNames, char const** names) noexcept {
  int32_t missing = 0;
  for (size_t i = 0; i < plan().inputs.size(); ++i) {
    if (!dynamic(input_shapes()[i])) continue;
    if (names != nullptr && missing < nbMaxNames) names[missing] = plan().tensors[plan().inputs[i].tensor].name.c_str();
    ++missing;
  }
  if (missing > 0) return missing;
  std::vector<Shape> shapes;
  std::string why;
  if (!infer_shapes(plan(), input_shapes(), shapes, why)) {
    error(logger_, "inferShapes: " + why);
    return -1;
  }
  return 0;
}

// setCommunicator is collective, as in TensorRT: each multi-device layer gets a communicator
// split off the given one (ncclCommSplit, which returns only once every rank of the given
// communicator has called it). Ranks outside a layer's group take part in the split without a
// color and get no communicator (the layer leaves their output untouched).
bool Context::setCommunicator(void* communicator) noexcept {
  const Plan& p = plan();
  if (!p.multi_device())
    return fail("setCommunicator: the engine has no multi-device layers (IDistCollectiveLayer), so a communicator has no use");
  if (has_communicator_) return fail("setCommunicator: this execution context already has a communicator (it is set once)");
  if (communicator == nullptr) return fail("setCommunicator: the communicator is null");
  const Nccl& api = nccl_api();
  if (!api.error.empty()) return fail("setCommunicator: " + api.error);
  auto world = static_cast<nccl::Comm>(communicator);
  int size = 0, rank = -1;
  if (api.CommCount(world, &size) != nccl::kSuccess || api.CommUserRank(world, &rank) != nccl::kSuccess)
    return fail("setCommunicator: the communicator is not a usable ncclComm_t (ncclCommCount/ncclCommUserRank failed)");
  if (p.ranks_exact ? size != p.ranks : size < p.ranks) {
    return fail("setCommunicator: the engine was built for " + std::to_string(p.ranks) + " ranks (setNbRanks" +
                (p.ranks_exact ? "" : " and the groups' ranks") + ") and the communicator has " + std::to_string(size) +
                (p.ranks_exact ? "" : ": it needs at least " + std::to_string(p.ranks)));
  }
  std::vector<std::unique_ptr<ChildComm>> comms(p.layers.size());
  for (size_t i = 0; i < p.layers.size(); ++i) {
    const LayerInfo& l = p.layers[i];
    if (l.kind != LayerKind::kDistCollective) continue;
    auto child = std::make_unique<ChildComm>();
    int position = rank;  // ungrouped: every rank, in rank order
    if (!l.groups.empty()) {
      auto it = std::find(l.groups.begin(), l.groups.end(), rank);
      position = it == l.groups.end() ? -1 : static_cast<int>(it - l.groups.begin());
    }
    nccl::Result r = api.CommSplit(world, position >= 0 ? 0 : nccl::kSplitNoColor, std::max(position, 0), &child->comm, nullptr);
    if (r != nccl::kSuccess)
      return fail("setCommunicator: ncclCommSplit for layer '" + l.name + "' failed: " + api.GetErrorString(r));
    if (position >= 0) {
      child->rank = position;
      api.CommCount(child->comm, &child->size);
    } else {
      child->comm = nullptr;
    }
    comms[i] = std::move(child);
  }
  comms_ = std::move(comms);
  has_communicator_ = true;
  log(logger_, Severity::kVERBOSE, "setCommunicator: rank " + std::to_string(rank) + " of " + std::to_string(size) + " ready");
  return true;
}

bool Context::ensure(DeviceBuffer& buffer, size_t bytes, bool capturing, const std::string& what) {
  if (buffer.ptr != nullptr && buffer.bytes >= bytes) return true;
  if (capturing) return fail("enqueueV3: " + what + " needs new device memory while the stream is being captured into a CUDA graph");
  buffer.release();
  buffer.device = device_;
  if (!cuda_ok(cudaMalloc(&buffer.ptr, std::max<size_t>(bytes, 256)), "cudaMalloc for " + what)) {
    buffer.ptr = nullptr;
    return false;
  }
  buffer.bytes = std::max<size_t>(bytes, 256);
  return true;
}

// [rows, cols] -> [cols, rows] with strided 2-D copies, one per row or column, whichever is fewer.
bool Context::transpose_2d(const void* src, void* dst, int64_t rows, int64_t cols, size_t esize, cudaStream_t stream) {
  const auto* s = static_cast<const char*>(src);
  auto* d = static_cast<char*>(dst);
  if (cols <= rows) {
    for (int64_t c = 0; c < cols; ++c) {  // column c of src -> row c of dst
      if (!cuda_ok(cudaMemcpy2DAsync(d + c * rows * esize, esize, s + c * esize, cols * esize, esize, rows,
                                     cudaMemcpyDeviceToDevice, stream),
                   "a transpose copy"))
        return false;
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {  // row r of src -> column r of dst
      if (!cuda_ok(cudaMemcpy2DAsync(d + r * esize, rows * esize, s + r * cols * esize, esize, esize, cols,
                                     cudaMemcpyDeviceToDevice, stream),
                   "a transpose copy"))
        return false;
    }
  }
  return true;
}

// addDistCollective's semantics on the layer's group communicator (group-local ranks, root
// remapped to its group position); gather, scatter and all_to_all as grouped send/recv.
bool Context::run_collective(const LayerInfo& l, const ChildComm& c, const void* in, void* out, const Shape& shape,
                             nvinfer1::DataType type, cudaStream_t stream) {
  const Nccl& api = nccl_api();
  const nccl::DataType t = nccl_type(type);
  const size_t count = static_cast<size_t>(volume(shape));
  const size_t esize = dtype_size(type);
  const int g = c.size;
  int root = 0;
  if (op_has_root(l.op)) {
    if (l.groups.empty()) {
      root = static_cast<int>(l.root);
    } else {
      root = static_cast<int>(std::find(l.groups.begin(), l.groups.end(), l.root) - l.groups.begin());
    }
  }
  const std::string what = std::string("NCCL ") + op_name(l.op) + " of layer '" + l.name + "'";
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  switch (l.op) {
    case CollectiveOperation::kALL_REDUCE: return nccl_ok(api.AllReduce(in, out, count, t, nccl_reduce(l.reduce), c.comm, stream), what);
    case CollectiveOperation::kALL_GATHER: return nccl_ok(api.AllGather(in, out, count, t, c.comm, stream), what);
    case CollectiveOperation::kBROADCAST: return nccl_ok(api.Broadcast(in, out, count, t, root, c.comm, stream), what);
    case CollectiveOperation::kREDUCE: return nccl_ok(api.Reduce(in, out, count, t, nccl_reduce(l.reduce), root, c.comm, stream), what);
    case CollectiveOperation::kREDUCE_SCATTER:
      return nccl_ok(api.ReduceScatter(in, out, count / g, t, nccl_reduce(l.reduce), c.comm, stream), what);
    default: break;
  }
  const size_t chunk = l.op == CollectiveOperation::kGATHER ? count : count / g;
  bool ok = nccl_ok(api.GroupStart(), what + " (ncclGroupStart)");
  if (!ok) return false;
  if (l.op == CollectiveOperation::kALL_TO_ALL) {
    for (int peer = 0; ok && peer < g; ++peer) {
      ok = nccl_ok(api.Send(src + peer * chunk * esize, chunk, t, peer, c.comm, stream), what) &&
           nccl_ok(api.Recv(dst + peer * chunk * esize, chunk, t, peer, c.comm, stream), what);
    }
  } else if (l.op == CollectiveOperation::kGATHER) {
    ok = nccl_ok(api.Send(src, chunk, t, root, c.comm, stream), what);
    if (c.rank == root)
      for (int peer = 0; ok && peer < g; ++peer) ok = nccl_ok(api.Recv(dst + peer * chunk * esize, chunk, t, peer, c.comm, stream), what);
  } else {  // scatter
    if (c.rank == root)
      for (int peer = 0; ok && peer < g; ++peer) ok = nccl_ok(api.Send(src + peer * chunk * esize, chunk, t, peer, c.comm, stream), what);
    ok = ok && nccl_ok(api.Recv(dst, chunk, t, root, c.comm, stream), what);
  }
  return nccl_ok(api.GroupEnd(), what + " (ncclGroupEnd)") && ok;
}

bool Context::enqueueV3(cudaStream_t stream) noexcept {
  const Plan& p = plan();
  if (p.multi_device() && !has_communicator_) {
    return fail("enqueueV3: the engine has multi-device layers (IDistCollectiveLayer) and the execution context has no "
                "communicator: call setCommunicator on every rank first");
  }
  for (size_t i = 0; i < p.inputs.size(); ++i) {
    const TensorInfo& t = p.tensors[p.inputs[i].tensor];
    if (dynamic(t.dims) && set_shapes_[i].empty())
      return fail("enqueueV3: the shape of input '" + t.name + "' " + shape_string(t.dims) + " is not set (setInputShape)");
  }
  std::vector<Shape> shapes;
  std::string why;
  if (!infer_shapes(p, input_shapes(), shapes, why)) return fail("enqueueV3: " + why);
  auto address = [&](int t) -> void* {
    auto it = addresses_.find(t);
    return it == addresses_.end() ? nullptr : it->second;
  };
  for (int t = 0; t < static_cast<int>(p.tensors.size()); ++t) {
    if (!p.is_input(t) && !p.is_output(t)) continue;
    void* a = address(t);
    if (a == nullptr) return fail("enqueueV3: the address of tensor '" + p.tensors[t].name + "' is not set (setTensorAddress)");
    if (reinterpret_cast<uintptr_t>(a) % 256 != 0)
      return fail("enqueueV3: the address of tensor '" + p.tensors[t].name + "' is not 256-byte aligned (TensorRT requires it)");
  }
  for (size_t i = 0; i < p.layers.size(); ++i) {
    const LayerInfo& l = p.layers[i];
    if (l.kind != LayerKind::kDistCollective || comms_[i] == nullptr || comms_[i]->comm == nullptr) continue;
    const bool shape_from_ranks = l.op == CollectiveOperation::kALL_GATHER || l.op == CollectiveOperation::kREDUCE_SCATTER;
    if (shape_from_ranks && comms_[i]->size != l.nb_ranks) {
      return fail("enqueueV3: layer '" + l.name + "' (" + op_name(l.op) + ") runs over a group of " + std::to_string(comms_[i]->size) +
                  " ranks but was built with setNbRanks(" + std::to_string(l.nb_ranks) +
                  "), which sets its output shape: nbRanks must be the number of ranks taking part");
    }
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (!cuda_ok(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing")) return false;
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  std::vector<void*> data(p.tensors.size(), nullptr);
  for (int t = 0; t < static_cast<int>(p.tensors.size()); ++t) {
    if (p.is_input(t) || p.is_output(t)) {
      data[t] = address(t);
    } else {
      const size_t bytes = static_cast<size_t>(volume(shapes[t])) * dtype_size(p.tensors[t].type);
      if (!ensure(buffers_[t], bytes, capturing, "tensor '" + p.tensors[t].name + "'")) return false;
      data[t] = buffers_[t].ptr;
    }
  }
  for (size_t i = 0; i < p.layers.size(); ++i) {
    const LayerInfo& l = p.layers[i];
    const Shape& in_shape = shapes[l.input];
    const size_t esize = dtype_size(p.tensors[l.input].type);
    const size_t bytes = static_cast<size_t>(volume(in_shape)) * esize;
    void* in = data[l.input];
    void* out = data[l.output];
    if (l.kind == LayerKind::kDistCollective) {
      const ChildComm* c = comms_[i].get();
      if (c == nullptr || c->comm == nullptr) continue;  // not in the group: the output stays as it was
      if (!run_collective(l, *c, in, out, in_shape, p.tensors[l.input].type, stream)) return false;
      continue;
    }
    auto swaps = [](const std::vector<int32_t>& perm) { return perm.size() == 2 && perm[0] == 1 && perm[1] == 0; };
    const bool first = swaps(l.first_transpose), second = swaps(l.second_transpose);
    const void* cur = in;
    if (first) {
      void* target = out;
      if (second) {
        if (!ensure(scratch_[i], bytes, capturing, "layer '" + l.name + "'")) return false;
        target = scratch_[i].ptr;
      }
      if (!transpose_2d(cur, target, in_shape[0], in_shape[1], esize, stream)) return false;
      cur = target;
    }
    if (second) {
      // A reshape moves no data: the second transpose reads the output's shape, untransposed.
      Shape before = shapes[l.output];
      std::swap(before[0], before[1]);
      if (!transpose_2d(cur, out, before[0], before[1], esize, stream)) return false;
      cur = out;
    }
    if (cur != out && bytes > 0 && !cuda_ok(cudaMemcpyAsync(out, cur, bytes, cudaMemcpyDeviceToDevice, stream), "a copy")) return false;
  }
  if (debug_sync_ && !capturing && !cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize (debug sync)")) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
class Runtime : public nvinfer1::IRuntime, public DefaultVRuntime {
 public:
  explicit Runtime(nvinfer1::ILogger* logger) : DefaultVRuntime(logger) { mImpl = this; }
  nvinfer1::IRuntime* getPImpl() noexcept override { return this; }
  nvinfer1::ICudaEngine* deserializeCudaEngine(void const* blob, std::size_t size) noexcept override {
    Plan plan;
    std::string why;
    if (!parse(blob, size, plan, why)) {
      error(logger_, "IRuntime::deserializeCudaEngine: " + why);
      return nullptr;
    }
    // Hand-written plans (trt_double.write_plan) are checked as the builder checks networks.
    std::vector<Shape> shapes;
    bool ok = infer_shapes(plan, {}, shapes, why);
    for (size_t i = 0; ok && i < plan.layers.size(); ++i)
      if (plan.layers[i].kind == LayerKind::kShuffle) ok = shuffle_supported(plan.layers[i], shapes[plan.layers[i].input].size(), why);
    if (!ok) {
      error(logger_, "IRuntime::deserializeCudaEngine: the plan cannot run: " + why);
      return nullptr;
    }
    // TensorRT's headers: a version-compatible plan includes the lean runtime unless built with
    // kEXCLUDE_LEAN_RUNTIME, and engines with host executable code load only after
    // setEngineHostCodeAllowed(true) (default false).
    auto flag = [&](nvinfer1::BuilderFlag f) { return ((plan.builder_flags >> static_cast<int32_t>(f)) & 1U) != 0; };
    if (flag(nvinfer1::BuilderFlag::kVERSION_COMPATIBLE) && !flag(nvinfer1::BuilderFlag::kEXCLUDE_LEAN_RUNTIME) &&
        !host_code_) {
      error(logger_, "IRuntime::deserializeCudaEngine: the plan embeds the lean runtime (built kVERSION_COMPATIBLE "
                     "without kEXCLUDE_LEAN_RUNTIME), which is host executable code: call "
                     "IRuntime::setEngineHostCodeAllowed(true) to load it");
      return nullptr;
    }
    return new Engine(logger_, std::move(plan));
  }
  nvinfer1::ILogger* getLogger() const noexcept override { return logger_; }
  int32_t getNbDLACores() const noexcept override { return 0; }
  int32_t getDLACore() const noexcept override { return 0; }
  bool setMaxThreads(int32_t n) noexcept override {
    threads_ = n;
    return n >= 1;
  }
  int32_t getMaxThreads() const noexcept override { return threads_; }
  void setEngineHostCodeAllowed(bool allowed) noexcept override { host_code_ = allowed; }
  bool getEngineHostCodeAllowed() const noexcept override { return host_code_; }

 private:
  int32_t threads_ = 1;
  bool host_code_ = false;
};

}  // namespace

nvinfer1::IRuntime* create_runtime(nvinfer1::ILogger* logger) { return new Runtime(logger); }

}  // namespace trt_double
