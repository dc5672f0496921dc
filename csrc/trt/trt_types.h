// Conversions between TensorRT's types and mdtrt's, and owning pointers for TensorRT objects.
#pragma once

#include <NvInferRuntime.h>

#include <memory>
#include <string>

#include "runtime/dtype.h"

namespace mdtrt::trt {

// TensorRT 10+ objects are released with plain delete (their destructors are public).
template <typename T>
using Owned = std::unique_ptr<T>;

// Throws kTensorRT for TensorRT types mdtrt cannot hand to Python (FP8, INT4, FP4, E8M0),
// naming `tensor`.
DType from_trt(nvinfer1::DataType type, const std::string& tensor);
nvinfer1::DataType to_trt(DType type);  // throws kInvalidArgument for float64
const char* trt_type_name(nvinfer1::DataType type);

Shape from_dims(const nvinfer1::Dims& dims);
// Throws kInvalidArgument when the shape has more dimensions than TensorRT allows.
nvinfer1::Dims to_dims(const Shape& shape);

}  // namespace mdtrt::trt
