#include "trt/factory.h"

#include <string>

#include "common/error.h"
#include "trt/logger.h"
#include "trt/trt_library.h"

namespace mdtrt::trt {
namespace {

// Calls one of TensorRT's create functions under an ErrorScope; a null result throws with what
// TensorRT logged, `what` it returned none of, and `hint` (what to check).
void* create_checked(void* (*create)(void*, int32_t), const std::string& what, const std::string& hint, int rank,
                     const char* call) {
  ErrorScope scope;
  void* created = create(static_cast<nvinfer1::ILogger*>(&logger()), NV_TENSORRT_VERSION);
  if (created == nullptr) {
    throw Error(ErrorKind::kTensorRT,
                with_trt_error("TensorRT (" + load_library().path + ") returned no " + what) + ". " + hint, rank,
                call);
  }
  return created;
}

}  // namespace

Owned<nvinfer1::IRuntime> make_runtime(int rank, bool allow_host_code) {
  Owned<nvinfer1::IRuntime> runtime(static_cast<nvinfer1::IRuntime*>(
      create_checked(create_runtime, "runtime", "Check that a CUDA GPU and driver are usable (python -m mdtrt doctor).",
                     rank, "createInferRuntime")));
  if (allow_host_code) runtime->setEngineHostCodeAllowed(true);
  return runtime;
}

Owned<nvinfer1::IBuilder> make_builder() {
  return Owned<nvinfer1::IBuilder>(static_cast<nvinfer1::IBuilder*>(
      create_checked(create_builder, "builder", "Building needs a usable CUDA GPU and driver (python -m mdtrt doctor).",
                     -1, "createInferBuilder")));
}

}  // namespace mdtrt::trt
