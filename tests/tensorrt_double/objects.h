// The TensorRT test double's objects that more than one file creates.
#pragma once

#include <string>

#include "defaults.h"  // generated
#include "plan.h"

namespace trt_double {

// Bytes handed to the caller (serialized plans, timing caches); deleted by the caller.
class HostMemory : public nvinfer1::IHostMemory, public DefaultVHostMemory {
 public:
  HostMemory(nvinfer1::ILogger* logger, std::string bytes) : DefaultVHostMemory(logger), bytes_(std::move(bytes)) {
    mImpl = this;
  }
  void* data() const noexcept override { return const_cast<char*>(bytes_.data()); }
  std::size_t size() const noexcept override { return bytes_.size(); }
  nvinfer1::DataType type() const noexcept override { return nvinfer1::DataType::kUINT8; }

 private:
  std::string bytes_;
};

nvinfer1::IRuntime* create_runtime(nvinfer1::ILogger* logger);
nvinfer1::IBuilder* create_builder(nvinfer1::ILogger* logger);

}  // namespace trt_double
