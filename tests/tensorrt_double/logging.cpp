#include "double_common.h"

namespace trt_double {

void log(nvinfer1::ILogger* logger, Severity severity, const std::string& text) {
  if (logger != nullptr) logger->log(severity, ("[TensorRT test double] " + text).c_str());
}

void not_implemented(nvinfer1::ILogger* logger, const char* what) {
  error(logger, std::string(what) + " is not implemented by the TensorRT test double");
}

}  // namespace trt_double
