// The entry points mdtrt's loader resolves (csrc/trt/trt_library.cpp), as TensorRT exports them.
#include <NvInferVersion.h>

#include "objects.h"

namespace {

// The caller's headers must be TensorRT 11 (NV_TENSORRT_VERSION = major * 10000 + ...), as the
// double's own; TensorRT refuses other majors the same way.
bool version_ok(void* logger, int32_t version, const char* what) {
  if (version / 10000 == NV_TENSORRT_MAJOR) return true;
  trt_double::error(static_cast<nvinfer1::ILogger*>(logger),
                    std::string(what) + ": the caller was built with TensorRT headers " + std::to_string(version) +
                        ", the TensorRT test double implements TensorRT " + std::to_string(NV_TENSORRT_MAJOR));
  return false;
}

}  // namespace

extern "C" TENSORRTAPI int32_t getInferLibVersion() noexcept { return NV_TENSORRT_VERSION; }
extern "C" TENSORRTAPI int32_t getInferLibMajorVersion() noexcept { return NV_TENSORRT_MAJOR; }
extern "C" TENSORRTAPI int32_t getInferLibMinorVersion() noexcept { return NV_TENSORRT_MINOR; }
extern "C" TENSORRTAPI int32_t getInferLibPatchVersion() noexcept { return NV_TENSORRT_PATCH; }
extern "C" TENSORRTAPI int32_t getInferLibBuildVersion() noexcept { return NV_TENSORRT_BUILD; }

// Returned as the public interface pointer (IRuntime*, IBuilder*): the caller casts void* back to it.
extern "C" TENSORRTAPI void* createInferRuntime_INTERNAL(void* logger, int32_t version) noexcept {
  if (logger == nullptr || !version_ok(logger, version, "createInferRuntime")) return nullptr;
  return static_cast<void*>(trt_double::create_runtime(static_cast<nvinfer1::ILogger*>(logger)));
}

extern "C" TENSORRTAPI void* createInferBuilder_INTERNAL(void* logger, int32_t version) noexcept {
  if (logger == nullptr || !version_ok(logger, version, "createInferBuilder")) return nullptr;
  return static_cast<void*>(trt_double::create_builder(static_cast<nvinfer1::ILogger*>(logger)));
}

// Lets tests tell the double from NVIDIA's TensorRT in a loaded process.
extern "C" TENSORRTAPI const char* mdtrtTensorRTDoubleIdentity() noexcept { return "MDTRT-TENSORRT-DOUBLE"; }
