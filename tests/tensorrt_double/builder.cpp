// The builder half of the TensorRT test double: IBuilder, IBuilderConfig, INetworkDefinition,
// ITensor, IShuffleLayer, IDistCollectiveLayer, IOptimizationProfile, ITimingCache. It needs no
// GPU: building a plan is bookkeeping and serialization only (CI builds plans on CPU machines).
#include <algorithm>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "objects.h"

namespace trt_double {
namespace {

using nvinfer1::Dims;
using nvinfer1::ITensor;

constexpr const char* kCacheMagic = "MDTRT-TENSORRT-DOUBLE-TIMING-CACHE 1";

Shape to_shape(const Dims& dims) { return dims.nbDims < 0 ? Shape{} : Shape(dims.d, dims.d + dims.nbDims); }

Dims to_dims(const Shape& shape) {
  Dims dims{};
  dims.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size() && i < static_cast<size_t>(Dims::MAX_DIMS); ++i) dims.d[i] = shape[i];
  return dims;
}

Dims invalid_dims() { return neutral<Dims>(); }

bool dynamic(const Shape& s) {
  return std::any_of(s.begin(), s.end(), [](int64_t d) { return d < 0; });
}

class Network;

// ---------------------------------------------------------------------------------------------
class Tensor : public ITensor, public DefaultVTensor {
 public:
  Tensor(nvinfer1::ILogger* logger, Network& network, int index) : DefaultVTensor(logger), network_(network), index_(index) {
    mImpl = this;
  }
  int index() const { return index_; }

  void setName(char const* name) noexcept override;
  char const* getName() const noexcept override;
  void setDimensions(Dims const& dimensions) noexcept override;
  Dims getDimensions() const noexcept override;
  nvinfer1::DataType getType() const noexcept override;
  bool isNetworkInput() const noexcept override;
  bool isNetworkOutput() const noexcept override;
  nvinfer1::TensorLocation getLocation() const noexcept override { return nvinfer1::TensorLocation::kDEVICE; }
  bool isShapeTensor() const noexcept override { return false; }
  bool isExecutionTensor() const noexcept override { return true; }

 private:
  Network& network_;
  int index_;
};

// The VLayer half every layer shares; the layer's record lives in the network's plan.
class LayerCore : public DefaultVLayer {
 public:
  LayerCore(nvinfer1::ILogger* logger, Network& network, int index) : DefaultVLayer(logger), network_(network), index_(index) {}
  virtual nvinfer1::ILayer* public_layer() = 0;

  nvinfer1::LayerType getType() const noexcept override;
  void setName(char const* name) noexcept override;
  char const* getName() const noexcept override;
  int32_t getNbInputs() const noexcept override { return 1; }
  ITensor* getInput(int32_t index) const noexcept override;
  int32_t getNbOutputs() const noexcept override { return 1; }
  ITensor* getOutput(int32_t index) const noexcept override;
  void setInput(int32_t index, ITensor& tensor) noexcept override;
  nvinfer1::DataType getOutputType(int32_t index) const noexcept override;
  void setMetadata(char const* metadata) noexcept override { metadata_ = metadata ? metadata : ""; }
  char const* getMetadata() const noexcept override { return metadata_.c_str(); }
  bool setNbRanks(int32_t nbRanks) noexcept override;
  int32_t getNbRanks() const noexcept override;

 protected:
  LayerInfo& info() const;
  Network& network_;
  int index_;
  std::string metadata_;
};

class ShuffleLayer : public nvinfer1::IShuffleLayer, public LayerCore, public DefaultVShuffleLayer {
 public:
  ShuffleLayer(nvinfer1::ILogger* logger, Network& network, int index)
      : LayerCore(logger, network, index), DefaultVShuffleLayer(logger) {
    mLayer = static_cast<LayerCore*>(this);
    mImpl = static_cast<DefaultVShuffleLayer*>(this);
  }
  nvinfer1::ILayer* public_layer() override { return this; }

  void setFirstTranspose(nvinfer1::Permutation const& p) noexcept override { set(p, first_, info().first_transpose); }
  nvinfer1::Permutation const& getFirstTranspose() const noexcept override { return first_; }
  void setReshapeDimensions(Dims const& dims) noexcept override {
    info().has_reshape = dims.nbDims >= 0;
    info().reshape = to_shape(dims);
  }
  Dims getReshapeDimensions() const noexcept override {
    return info().has_reshape ? to_dims(info().reshape) : invalid_dims();
  }
  void setSecondTranspose(nvinfer1::Permutation const& p) noexcept override { set(p, second_, info().second_transpose); }
  nvinfer1::Permutation const& getSecondTranspose() const noexcept override { return second_; }
  void setZeroIsPlaceholder(bool zero) noexcept override { info().zero_is_placeholder = zero; }
  bool getZeroIsPlaceholder() const noexcept override { return info().zero_is_placeholder; }

 private:
  // The permutation's length is the rank it is applied to, known only at build time: the plan
  // keeps all MAX_DIMS entries here and trims them in Network::to_plan.
  void set(nvinfer1::Permutation const& p, nvinfer1::Permutation& mine, std::vector<int32_t>& record) {
    mine = p;
    record.assign(p.order, p.order + Dims::MAX_DIMS);
  }
  nvinfer1::Permutation first_ = identity(), second_ = identity();
  static nvinfer1::Permutation identity() {
    nvinfer1::Permutation p{};
    for (int32_t i = 0; i < Dims::MAX_DIMS; ++i) p.order[i] = i;
    return p;
  }
};

class DistCollectiveLayer : public nvinfer1::IDistCollectiveLayer, public LayerCore, public DefaultVDistCollectiveLayer {
 public:
  DistCollectiveLayer(nvinfer1::ILogger* logger, Network& network, int index)
      : LayerCore(logger, network, index), DefaultVDistCollectiveLayer(logger) {
    mLayer = static_cast<LayerCore*>(this);
    mImpl = static_cast<DefaultVDistCollectiveLayer*>(this);
  }
  nvinfer1::ILayer* public_layer() override { return this; }
};

// ---------------------------------------------------------------------------------------------
class Network : public nvinfer1::INetworkDefinition, public DefaultVNetworkDefinition {
 public:
  Network(nvinfer1::ILogger* logger, nvinfer1::IBuilder& builder, nvinfer1::NetworkDefinitionCreationFlags flags)
      : DefaultVNetworkDefinition(logger), builder_(builder), flags_(flags) {
    mImpl = this;
  }
  nvinfer1::ILogger* logger() const { return logger_; }
  Plan& plan() { return plan_; }
  const Plan& plan() const { return plan_; }
  ITensor* tensor(int index) const { return index >= 0 && index < static_cast<int>(tensors_.size()) ? tensors_[index].get() : nullptr; }

  // Which of this network's tensors `t` is, or -1 (a tensor of another network).
  int index_of(ITensor const& t) const {
    for (size_t i = 0; i < tensors_.size(); ++i)
      if (tensors_[i].get() == &t) return static_cast<int>(i);
    return -1;
  }

  // Shapes of every tensor from the declared input dimensions (-1 kept), or false.
  bool shapes(std::vector<Shape>& out, std::string& why) const { return infer_shapes(plan_, {}, out, why); }

  ITensor* addInput(char const* name, nvinfer1::DataType type, Dims const& dims) noexcept override {
    if (name == nullptr || *name == '\0') return fail<ITensor>("addInput: an input needs a name");
    for (const auto& in : plan_.inputs)
      if (plan_.tensors[in.tensor].name == name) return fail<ITensor>(std::string("addInput: there is already an input named '") + name + "'");
    if (dims.nbDims < 0 || dims.nbDims > Dims::MAX_DIMS)
      return fail<ITensor>(std::string("addInput '") + name + "': " + std::to_string(dims.nbDims) + " dimensions");
    for (int32_t i = 0; i < dims.nbDims; ++i)
      if (dims.d[i] < -1) return fail<ITensor>(std::string("addInput '") + name + "': dimension " + std::to_string(dims.d[i]));
    if (dtype_size(type) == 0)
      return fail<ITensor>(std::string("addInput '") + name + "': the TensorRT test double has no " + dtype_name(type) + " tensors");
    int t = new_tensor(name, type, to_shape(dims));
    InputInfo in;
    in.tensor = t;
    plan_.inputs.push_back(in);
    return tensors_[t].get();
  }

  void markOutput(ITensor& tensor) noexcept override {
    int t = index_of(tensor);
    if (t < 0) return (void)fail<ITensor>("markOutput: the tensor is not from this network");
    if (!plan_.is_output(t)) plan_.outputs.push_back(t);
  }

  void unmarkOutput(ITensor& tensor) noexcept override {
    int t = index_of(tensor);
    plan_.outputs.erase(std::remove(plan_.outputs.begin(), plan_.outputs.end(), t), plan_.outputs.end());
  }

  nvinfer1::IShuffleLayer* addShuffle(ITensor& input) noexcept override {
    int in = index_of(input);
    if (in < 0) return fail<nvinfer1::IShuffleLayer>("addShuffle: the input is not a tensor of this network");
    auto* layer = add_layer<ShuffleLayer>(LayerKind::kShuffle, in, "Shuffle");
    return layer;
  }

  nvinfer1::IDistCollectiveLayer* addDistCollective(ITensor& input, nvinfer1::CollectiveOperation op,
                                                    nvinfer1::ReduceOperation reduce, int64_t root, int64_t* groups,
                                                    int64_t groupSize) noexcept override {
    int in = index_of(input);
    const std::string what = std::string("addDistCollective(") + op_name(op) + "): ";
    if (in < 0) return fail<nvinfer1::IDistCollectiveLayer>(what + "the input is not a tensor of this network");
    if (std::string(op_name(op)) == "unknown") return fail<nvinfer1::IDistCollectiveLayer>(what + "unknown collective operation");
    if (groupSize < 0 || (groupSize > 0 && groups == nullptr))
      return fail<nvinfer1::IDistCollectiveLayer>(what + "groups is null with groupSize " + std::to_string(groupSize));
    std::vector<int64_t> members(groups, groups + std::max<int64_t>(groupSize, 0));
    std::set<int64_t> seen;
    for (int64_t r : members) {
      if (r < 0) return fail<nvinfer1::IDistCollectiveLayer>(what + "groups names rank " + std::to_string(r));
      if (!seen.insert(r).second)
        return fail<nvinfer1::IDistCollectiveLayer>(what + "groups names rank " + std::to_string(r) + " twice");
    }
    if (op_reduces(op) && reduce == nvinfer1::ReduceOperation::kNONE)
      return fail<nvinfer1::IDistCollectiveLayer>(what + "a reducing collective needs a reduce operation other than kNONE");
    if (op_has_root(op)) {
      if (root < 0) return fail<nvinfer1::IDistCollectiveLayer>(what + "needs a root rank, got " + std::to_string(root));
      if (!members.empty() && seen.count(root) == 0)
        return fail<nvinfer1::IDistCollectiveLayer>(what + "root " + std::to_string(root) + " is not in the group");
    }
    if (op_reduces(op) && plan_.tensors[in].type == nvinfer1::DataType::kBOOL)
      return fail<nvinfer1::IDistCollectiveLayer>(what + "BOOL tensors cannot be reduced");
    auto* layer = add_layer<DistCollectiveLayer>(LayerKind::kDistCollective, in, "DistCollective");
    LayerInfo& l = plan_.layers.back();
    l.op = op;
    l.reduce = reduce;
    l.root = root;
    l.groups = members;
    return layer;
  }

  int32_t getNbLayers() const noexcept override { return static_cast<int32_t>(layers_.size()); }
  nvinfer1::ILayer* getLayer(int32_t index) const noexcept override {
    return index >= 0 && index < getNbLayers() ? layers_[index]->public_layer() : nullptr;
  }
  int32_t getNbInputs() const noexcept override { return static_cast<int32_t>(plan_.inputs.size()); }
  ITensor* getInput(int32_t index) const noexcept override {
    return index >= 0 && index < getNbInputs() ? tensor(plan_.inputs[index].tensor) : nullptr;
  }
  int32_t getNbOutputs() const noexcept override { return static_cast<int32_t>(plan_.outputs.size()); }
  ITensor* getOutput(int32_t index) const noexcept override {
    return index >= 0 && index < getNbOutputs() ? tensor(plan_.outputs[index]) : nullptr;
  }
  void setName(char const* name) noexcept override { plan_.name = name ? name : ""; }
  char const* getName() const noexcept override { return plan_.name.c_str(); }
  bool hasImplicitBatchDimension() const noexcept override { return false; }
  nvinfer1::IBuilder& getBuilder() const noexcept override { return builder_; }
  nvinfer1::NetworkDefinitionCreationFlags getFlags() const noexcept override { return flags_; }
  bool getFlag(nvinfer1::NetworkDefinitionCreationFlag flag) const noexcept override {
    return (flags_ & (1U << static_cast<int32_t>(flag))) != 0;
  }

 private:
  template <typename T>
  T* fail(const std::string& text) {
    error(logger_, text);
    return nullptr;
  }

  int new_tensor(const std::string& name, nvinfer1::DataType type, Shape dims) {
    int index = static_cast<int>(tensors_.size());
    plan_.tensors.push_back(TensorInfo{name, type, std::move(dims)});
    tensors_.push_back(std::make_unique<Tensor>(logger_, *this, index));
    return index;
  }

  template <typename L>
  L* add_layer(LayerKind kind, int input, const char* type_name) {
    const int index = static_cast<int>(layers_.size());
    LayerInfo l;
    l.kind = kind;
    l.name = "(Unnamed Layer* " + std::to_string(index) + ") [" + type_name + "]";
    l.input = input;
    l.output = new_tensor(l.name + "_output", plan_.tensors[input].type, {});
    plan_.layers.push_back(l);
    auto layer = std::make_unique<L>(logger_, *this, index);
    L* raw = layer.get();
    layers_.push_back(std::move(layer));
    return raw;
  }

  nvinfer1::IBuilder& builder_;
  nvinfer1::NetworkDefinitionCreationFlags flags_;
  Plan plan_;
  std::vector<std::unique_ptr<Tensor>> tensors_;
  std::vector<std::unique_ptr<LayerCore>> layers_;
};

void Tensor::setName(char const* name) noexcept { network_.plan().tensors[index_].name = name ? name : ""; }
char const* Tensor::getName() const noexcept { return network_.plan().tensors[index_].name.c_str(); }
void Tensor::setDimensions(Dims const& dims) noexcept {
  if (!isNetworkInput()) return (void)error(logger_, "ITensor::setDimensions: only network inputs have settable dimensions");
  network_.plan().tensors[index_].dims = to_shape(dims);
}
Dims Tensor::getDimensions() const noexcept {
  if (isNetworkInput()) return to_dims(network_.plan().tensors[index_].dims);
  std::vector<Shape> shapes;
  std::string why;
  if (!network_.shapes(shapes, why)) {
    error(logger_, "ITensor::getDimensions of '" + std::string(getName()) + "': " + why);
    return invalid_dims();
  }
  return to_dims(shapes[index_]);
}
nvinfer1::DataType Tensor::getType() const noexcept { return network_.plan().tensors[index_].type; }
bool Tensor::isNetworkInput() const noexcept { return network_.plan().is_input(index_); }
bool Tensor::isNetworkOutput() const noexcept { return network_.plan().is_output(index_); }

LayerInfo& LayerCore::info() const { return network_.plan().layers[index_]; }
nvinfer1::LayerType LayerCore::getType() const noexcept {
  switch (info().kind) {
    case LayerKind::kShuffle: return nvinfer1::LayerType::kSHUFFLE;
    case LayerKind::kIdentity: return nvinfer1::LayerType::kIDENTITY;
    case LayerKind::kDistCollective: return nvinfer1::LayerType::kDIST_COLLECTIVE;
  }
  return nvinfer1::LayerType::kIDENTITY;
}
void LayerCore::setName(char const* name) noexcept { info().name = name ? name : ""; }
char const* LayerCore::getName() const noexcept { return info().name.c_str(); }
ITensor* LayerCore::getInput(int32_t index) const noexcept { return index == 0 ? network_.tensor(info().input) : nullptr; }
ITensor* LayerCore::getOutput(int32_t index) const noexcept { return index == 0 ? network_.tensor(info().output) : nullptr; }
void LayerCore::setInput(int32_t index, ITensor& tensor) noexcept {
  int t = network_.index_of(tensor);
  if (index != 0 || t < 0) return (void)error(logger_, "ILayer::setInput: input " + std::to_string(index) + " cannot be set");
  info().input = t;
}
nvinfer1::DataType LayerCore::getOutputType(int32_t) const noexcept { return network_.plan().tensors[info().output].type; }
bool LayerCore::setNbRanks(int32_t nbRanks) noexcept {
  if (nbRanks < 1) {
    error(logger_, "ILayer::setNbRanks(" + std::to_string(nbRanks) + ") on '" + info().name + "': nbRanks must be >= 1");
    return false;
  }
  if (info().kind != LayerKind::kDistCollective && nbRanks != 1) {
    error(logger_, "ILayer::setNbRanks(" + std::to_string(nbRanks) + ") on '" + info().name +
                       "': only multi-device layers (IDistCollectiveLayer) take nbRanks > 1");
    return false;
  }
  info().nb_ranks = nbRanks;
  return true;
}
int32_t LayerCore::getNbRanks() const noexcept { return info().nb_ranks; }

// ---------------------------------------------------------------------------------------------
class OptimizationProfile : public nvinfer1::IOptimizationProfile, public DefaultVOptimizationProfile {
 public:
  explicit OptimizationProfile(nvinfer1::ILogger* logger) : DefaultVOptimizationProfile(logger) { mImpl = this; }

  struct Range {
    Shape dims[3];
    bool set[3] = {false, false, false};
  };

  bool setDimensions(char const* name, nvinfer1::OptProfileSelector select, Dims const& dims) noexcept override {
    const int s = static_cast<int>(select);
    if (name == nullptr || s < 0 || s > 2 || dims.nbDims < 0 || dims.nbDims > Dims::MAX_DIMS) {
      error(logger_, "IOptimizationProfile::setDimensions: invalid arguments");
      return false;
    }
    Shape shape = to_shape(dims);
    for (int64_t d : shape)
      if (d < 0) {
        error(logger_, std::string("IOptimizationProfile::setDimensions('") + name + "'): profile dimensions must be >= 0, got " + shape_string(shape));
        return false;
      }
    Range& r = ranges_[name];
    for (int other = 0; other < 3; ++other) {
      if (!r.set[other] || other == s) continue;
      const Shape& o = r.dims[other];
      bool ordered = o.size() == shape.size();
      for (size_t i = 0; ordered && i < shape.size(); ++i) ordered = other < s ? o[i] <= shape[i] : o[i] >= shape[i];
      if (!ordered) {
        error(logger_, std::string("IOptimizationProfile::setDimensions('") + name + "'): " + shape_string(shape) +
                           " breaks min <= opt <= max against " + shape_string(o));
        return false;
      }
    }
    r.dims[s] = shape;
    r.set[s] = true;
    return true;
  }
  Dims getDimensions(char const* name, nvinfer1::OptProfileSelector select) const noexcept override {
    auto it = name ? ranges_.find(name) : ranges_.end();
    const int s = static_cast<int>(select);
    if (it == ranges_.end() || s < 0 || s > 2 || !it->second.set[s]) return invalid_dims();
    return to_dims(it->second.dims[s]);
  }
  bool isValid() const noexcept override {
    for (const auto& [name, r] : ranges_)
      if (!(r.set[0] && r.set[1] && r.set[2])) return false;
    return true;
  }
  int32_t getNbShapeValues(char const*) const noexcept override { return -1; }
  bool setExtraMemoryTarget(float target) noexcept override {
    extra_ = target;
    return target >= 0;
  }
  float getExtraMemoryTarget() const noexcept override { return extra_; }

  const std::map<std::string, Range>& ranges() const { return ranges_; }

 private:
  std::map<std::string, Range> ranges_;
  float extra_ = 1.0f;
};

class TimingCache : public nvinfer1::ITimingCache, public DefaultVTimingCache {
 public:
  TimingCache(nvinfer1::ILogger* logger, int64_t entries) : DefaultVTimingCache(logger), entries_(entries) { mImpl = this; }
  nvinfer1::IHostMemory* serialize() const noexcept override {
    return new HostMemory(logger_, std::string(kCacheMagic) + "\nentries=" + std::to_string(entries_) + "\n");
  }
  bool combine(nvinfer1::ITimingCache const& input, bool) noexcept override {
    auto* other = dynamic_cast<TimingCache const*>(&input);
    if (other == nullptr) {
      error(logger_, "ITimingCache::combine: the cache is not one of the TensorRT test double");
      return false;
    }
    entries_ += other->entries_;
    return true;
  }
  bool reset() noexcept override {
    entries_ = 0;
    return true;
  }
  void add(int64_t n) const { entries_ += n; }
  int64_t entries() const { return entries_; }

 private:
  mutable int64_t entries_;  // "tactics timed": one per layer built with the cache
};

class BuilderConfig : public nvinfer1::IBuilderConfig, public DefaultVBuilderConfig {
 public:
  explicit BuilderConfig(nvinfer1::ILogger* logger) : DefaultVBuilderConfig(logger) { mImpl = this; }

  void setFlags(nvinfer1::BuilderFlags flags) noexcept override { flags_ = flags; }
  nvinfer1::BuilderFlags getFlags() const noexcept override { return flags_; }
  void clearFlag(nvinfer1::BuilderFlag flag) noexcept override { flags_ &= ~(1U << static_cast<int32_t>(flag)); }
  // Every flag is accepted and recorded in the plan (builder flags=...), so tests can see it.
  void setFlag(nvinfer1::BuilderFlag flag) noexcept override { flags_ |= 1U << static_cast<int32_t>(flag); }
  bool getFlag(nvinfer1::BuilderFlag flag) const noexcept override { return (flags_ >> static_cast<int32_t>(flag)) & 1U; }
  void setMemoryPoolLimit(nvinfer1::MemoryPoolType pool, std::size_t size) noexcept override { pools_[static_cast<int>(pool)] = size; }
  std::size_t getMemoryPoolLimit(nvinfer1::MemoryPoolType pool) const noexcept override {
    auto it = pools_.find(static_cast<int>(pool));
    return it == pools_.end() ? 0 : it->second;
  }
  int32_t addOptimizationProfile(nvinfer1::IOptimizationProfile const* profile) noexcept override {
    auto* p = dynamic_cast<OptimizationProfile const*>(profile);
    if (p == nullptr || !p->isValid()) {
      error(logger_, "addOptimizationProfile: the profile is null or incomplete (set kMIN, kOPT and kMAX of every input it names)");
      return -1;
    }
    profiles_.push_back(p);
    return static_cast<int32_t>(profiles_.size() - 1);
  }
  int32_t getNbOptimizationProfiles() const noexcept override { return static_cast<int32_t>(profiles_.size()); }
  nvinfer1::ITimingCache* createTimingCache(void const* blob, std::size_t size) const noexcept override {
    if (blob == nullptr || size == 0) return new TimingCache(logger_, 0);
    std::string text(static_cast<const char*>(blob), size);
    const std::string magic = std::string(kCacheMagic) + "\nentries=";
    if (text.compare(0, magic.size(), magic) != 0) {
      error(logger_, "createTimingCache: the " + std::to_string(size) + " bytes are not a timing cache of the TensorRT test double");
      return nullptr;
    }
    return new TimingCache(logger_, std::stoll(text.substr(magic.size())));
  }
  bool setTimingCache(nvinfer1::ITimingCache const& cache, bool) noexcept override {
    auto* c = dynamic_cast<TimingCache const*>(&cache);
    if (c == nullptr) {
      error(logger_, "setTimingCache: the cache is not one of the TensorRT test double");
      return false;
    }
    cache_ = c;
    return true;
  }
  nvinfer1::ITimingCache const* getTimingCache() const noexcept override { return cache_; }
  void setProgressMonitor(nvinfer1::IProgressMonitor* monitor) noexcept override { monitor_ = monitor; }
  nvinfer1::IProgressMonitor* getProgressMonitor() const noexcept override { return monitor_; }
  void setProfilingVerbosity(nvinfer1::ProfilingVerbosity v) noexcept override { verbosity_ = v; }
  nvinfer1::ProfilingVerbosity getProfilingVerbosity() const noexcept override { return verbosity_; }
  void setBuilderOptimizationLevel(int32_t level) noexcept override { level_ = level; }
  int32_t getBuilderOptimizationLevel() const noexcept override { return level_; }
  void setHardwareCompatibilityLevel(nvinfer1::HardwareCompatibilityLevel l) noexcept override { hw_ = l; }
  nvinfer1::HardwareCompatibilityLevel getHardwareCompatibilityLevel() const noexcept override { return hw_; }
  void setEngineCapability(nvinfer1::EngineCapability c) noexcept override { capability_ = c; }
  nvinfer1::EngineCapability getEngineCapability() const noexcept override { return capability_; }
  bool setMaxAuxStreams(int32_t) noexcept override { return true; }
  int32_t getMaxAuxStreams() const noexcept override { return 0; }

  const std::vector<OptimizationProfile const*>& profiles() const { return profiles_; }
  TimingCache const* cache() const { return cache_; }

 private:
  nvinfer1::BuilderFlags flags_ = 0;
  std::map<int, std::size_t> pools_;
  std::vector<OptimizationProfile const*> profiles_;
  TimingCache const* cache_ = nullptr;
  nvinfer1::IProgressMonitor* monitor_ = nullptr;
  nvinfer1::ProfilingVerbosity verbosity_ = nvinfer1::ProfilingVerbosity::kLAYER_NAMES_ONLY;
  int32_t level_ = 3;
  nvinfer1::HardwareCompatibilityLevel hw_ = nvinfer1::HardwareCompatibilityLevel::kNONE;
  nvinfer1::EngineCapability capability_ = nvinfer1::EngineCapability::kSTANDARD;
};

// Reports phases to the config's IProgressMonitor as TensorRT does; a stepComplete that returns
// false cancels the build.
class Progress {
 public:
  explicit Progress(nvinfer1::IProgressMonitor* monitor) : monitor_(monitor) {}
  ~Progress() {
    while (!open_.empty()) finish();
  }
  void start(const char* phase, int32_t steps) {
    if (monitor_) monitor_->phaseStart(phase, open_.empty() ? nullptr : open_.back(), steps);
    open_.push_back(phase);
  }
  bool step(int32_t index) {
    if (cancelled_) return false;
    if (monitor_ && !monitor_->stepComplete(open_.back(), index)) cancelled_ = true;
    return !cancelled_;
  }
  void finish() {
    if (monitor_) monitor_->phaseFinish(open_.back());
    open_.pop_back();
  }
  bool cancelled() const { return cancelled_; }

 private:
  nvinfer1::IProgressMonitor* monitor_;
  std::vector<const char*> open_;
  bool cancelled_ = false;
};

class Builder : public nvinfer1::IBuilder, public DefaultVBuilder {
 public:
  explicit Builder(nvinfer1::ILogger* logger) : DefaultVBuilder(logger) { mImpl = this; }

  nvinfer1::IBuilderConfig* createBuilderConfig() noexcept override { return new BuilderConfig(logger_); }
  nvinfer1::INetworkDefinition* createNetworkV2(nvinfer1::NetworkDefinitionCreationFlags flags) noexcept override {
    return new Network(logger_, *this, flags);
  }
  nvinfer1::IOptimizationProfile* createOptimizationProfile() noexcept override {
    profiles_.push_back(std::make_unique<OptimizationProfile>(logger_));
    return profiles_.back().get();
  }
  nvinfer1::ILogger* getLogger() const noexcept override { return logger_; }
  int32_t getNbDLACores() const noexcept override { return 0; }
  int32_t getMaxDLABatchSize() const noexcept override { return 1; }
  bool setMaxThreads(int32_t n) noexcept override {
    threads_ = n;
    return n >= 1;
  }
  int32_t getMaxThreads() const noexcept override { return threads_; }
  void reset() noexcept override { profiles_.clear(); }
  bool isNetworkSupported(nvinfer1::INetworkDefinition const& network, nvinfer1::IBuilderConfig const& config) const noexcept override {
    Plan plan;
    std::string why;
    return to_plan(network, config, plan, why);
  }

  nvinfer1::IHostMemory* buildSerializedNetwork(nvinfer1::INetworkDefinition& network, nvinfer1::IBuilderConfig& config) noexcept override {
    auto* net = dynamic_cast<Network*>(&network);
    auto* cfg = dynamic_cast<BuilderConfig*>(&config);
    Progress progress(cfg != nullptr ? cfg->getProgressMonitor() : nullptr);
    const int32_t nb_layers = net != nullptr ? net->getNbLayers() : 0;
    progress.start("Building a TensorRT test double plan", 3);
    // Step 0: every layer checked, in a nested phase (TensorRT nests its phases the same way).
    progress.start("Checking layers", nb_layers);
    for (int32_t i = 0; i < nb_layers && progress.step(i); ++i) {
    }
    progress.finish();
    Plan plan;
    std::string why;
    if (progress.cancelled()) return cancelled();
    if (!to_plan(network, config, plan, why)) {
      error(logger_, "buildSerializedNetwork: " + why);
      return nullptr;
    }
    if (!progress.step(0)) return cancelled();
    // Step 1: "tactics" into the timing cache (one per layer), as a real build fills it.
    if (cfg->cache() != nullptr) cfg->cache()->add(nb_layers);
    if (!progress.step(1)) return cancelled();
    std::string bytes = serialize(plan);
    if (!progress.step(2)) return cancelled();
    log(logger_, Severity::kINFO, "built a plan of " + std::to_string(nb_layers) + " layers for " + std::to_string(plan.ranks) +
                                      " ranks (" + std::to_string(bytes.size()) + " bytes)");
    return new HostMemory(logger_, bytes);
  }

 private:
  nvinfer1::IHostMemory* cancelled() {
    error(logger_, "buildSerializedNetwork: the build was cancelled (IProgressMonitor::stepComplete returned false)");
    return nullptr;
  }

  // The network as a plan, checked; false with why.
  bool to_plan(nvinfer1::INetworkDefinition const& network, nvinfer1::IBuilderConfig const& config, Plan& plan,
               std::string& why) const {
    auto* net = dynamic_cast<Network const*>(&network);
    auto* cfg = dynamic_cast<BuilderConfig const*>(&config);
    if (net == nullptr || cfg == nullptr) {
      why = "the network or config was not made by the TensorRT test double";
      return false;
    }
    plan = net->plan();
    if (plan.outputs.empty()) {
      why = "the network has no outputs (markOutput)";
      return false;
    }
    std::vector<Shape> shapes;
    if (!infer_shapes(plan, {}, shapes, why)) return false;
    for (auto& l : plan.layers) {
      if (l.kind != LayerKind::kShuffle) continue;
      const size_t in_rank = shapes[l.input].size();
      if (!l.first_transpose.empty()) l.first_transpose.resize(in_rank);
      const size_t mid_rank = l.has_reshape ? l.reshape.size() : in_rank;
      if (!l.second_transpose.empty()) l.second_transpose.resize(mid_rank);
      if (!shuffle_supported(l, in_rank, why)) return false;
    }
    for (size_t t = 0; t < plan.tensors.size(); ++t)
      if (!plan.is_input(static_cast<int>(t))) plan.tensors[t].dims = shapes[t];
    // Profile 0 (the only one the double keeps): every dynamic input needs one.
    const OptimizationProfile* profile = cfg->profiles().empty() ? nullptr : cfg->profiles()[0];
    for (auto& in : plan.inputs) {
      const TensorInfo& t = plan.tensors[in.tensor];
      const OptimizationProfile::Range* range = nullptr;
      if (profile != nullptr) {
        auto it = profile->ranges().find(t.name);
        if (it != profile->ranges().end()) range = &it->second;
      }
      if (range == nullptr) {
        if (dynamic(t.dims)) {
          why = "input '" + t.name + "' has dynamic dimensions " + shape_string(t.dims) +
                " and no optimization profile gives its range (addOptimizationProfile)";
          return false;
        }
        in.min = in.opt = in.max = t.dims;
        continue;
      }
      for (int s = 0; s < 3; ++s) {
        const Shape& d = range->dims[s];
        bool fits = d.size() == t.dims.size();
        for (size_t i = 0; fits && i < d.size(); ++i) fits = t.dims[i] < 0 || t.dims[i] == d[i];
        if (!fits) {
          why = "the optimization profile gives input '" + t.name + "' " + shape_string(d) + ", which does not fit its dimensions " +
                shape_string(t.dims);
          return false;
        }
      }
      in.min = range->dims[0];
      in.opt = range->dims[1];
      in.max = range->dims[2];
    }
    // Shapes at both ends of the profile must work (uneven splits are found here, not at run time).
    for (int end = 0; end < 2; ++end) {
      std::vector<Shape> ins;
      for (const auto& in : plan.inputs) ins.push_back(end == 0 ? in.min : in.max);
      if (!infer_shapes(plan, ins, shapes, why)) return false;
    }
    compute_ranks(plan);
    plan.builder_flags = cfg->getFlags();
    plan.builder_flag_names.clear();
    for (int32_t bit = 0; bit < 32; ++bit) {
      if (!((plan.builder_flags >> bit) & 1U)) continue;
      const char* name = BuilderFlag_name(bit);
      plan.builder_flag_names += (plan.builder_flag_names.empty() ? "" : ",") + (name ? std::string(name) : std::to_string(bit));
    }
    plan.workspace = cfg->getMemoryPoolLimit(nvinfer1::MemoryPoolType::kWORKSPACE);
    plan.timing_cache = cfg->cache() != nullptr;
    return true;
  }

  std::vector<std::unique_ptr<OptimizationProfile>> profiles_;  // owned by the builder, as in TensorRT
  int32_t threads_ = 1;
};

}  // namespace

nvinfer1::IBuilder* create_builder(nvinfer1::ILogger* logger) { return new Builder(logger); }

}  // namespace trt_double
