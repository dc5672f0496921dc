// What every part of the TensorRT test double shares: TensorRT's headers, logging through the
// ILogger the double was created with, and the neutral values the generated stubs return.
#pragma once

#include <NvInfer.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace trt_double {

using Severity = nvinfer1::ILogger::Severity;

// Every message of the double goes through the ILogger given to createInferRuntime/Builder, as
// TensorRT's own messages do; errors are what mdtrt quotes in its exceptions.
void log(nvinfer1::ILogger* logger, Severity severity, const std::string& text);
inline void error(nvinfer1::ILogger* logger, const std::string& text) { log(logger, Severity::kERROR, text); }

// The generated stubs' message: "<VClass>::<method> is not implemented by the TensorRT test double".
void not_implemented(nvinfer1::ILogger* logger, const char* what);

// The value an unimplemented method returns: nullptr, false, -1 for signed integers (TensorRT's
// "invalid" convention, e.g. addOptimizationProfile), Dims with nbDims = -1, 0 or a
// value-initialized object otherwise. A reference to a polymorphic TensorRT object cannot be
// made up: the process stops (after the kERROR above), which only the double's own gaps reach.
template <typename R>
R neutral() {
  if constexpr (std::is_void_v<R>) {
    return;
  } else if constexpr (std::is_reference_v<R>) {
    using T = std::remove_cv_t<std::remove_reference_t<R>>;
    if constexpr (std::is_polymorphic_v<T> || !std::is_default_constructible_v<T>) {
      std::abort();
    } else {
      static T value{};
      return value;
    }
  } else if constexpr (std::is_same_v<R, bool>) {
    return false;
  } else if constexpr (std::is_pointer_v<R>) {
    return nullptr;
  } else if constexpr (std::is_integral_v<R> && std::is_signed_v<R>) {
    return R(-1);
  } else if constexpr (std::is_same_v<std::remove_cv_t<R>, nvinfer1::Dims>) {
    nvinfer1::Dims dims{};
    dims.nbDims = -1;
    return dims;
  } else {
    return R{};
  }
}

}  // namespace trt_double
