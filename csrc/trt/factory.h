// TensorRT's root objects (runtime, builder), made in one place: TensorRT's create functions are
// called through the run-time loader (trt_library.h) with mdtrt's logger, and a null result
// becomes an mdtrt::Error of kind kTensorRT carrying TensorRT's logged text.
#pragma once

#include <NvInfer.h>
#include <NvInferRuntime.h>

#include "trt/trt_types.h"

namespace mdtrt::trt {

// A TensorRT runtime using mdtrt's logger; loads TensorRT (and NCCL before it) if needed.
// `rank` only labels errors (-1: none). `allow_host_code`: IRuntime::setEngineHostCodeAllowed(true),
// needed to load plans that carry host code (version-compatible plans embedding the lean runtime);
// off by default, as in TensorRT, because it runs code from the plan file.
Owned<nvinfer1::IRuntime> make_runtime(int rank = -1, bool allow_host_code = false);

// A TensorRT builder using mdtrt's logger (needs the full TensorRT, not the lean runtime).
Owned<nvinfer1::IBuilder> make_builder();

}  // namespace mdtrt::trt
