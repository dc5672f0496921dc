#include "trt/trt_types.h"

#include "common/error.h"

namespace mdtrt::trt {

using nvinfer1::DataType;

const char* trt_type_name(DataType type) {
  switch (type) {
    case DataType::kFLOAT: return "FLOAT";
    case DataType::kHALF: return "HALF";
    case DataType::kINT8: return "INT8";
    case DataType::kINT32: return "INT32";
    case DataType::kBOOL: return "BOOL";
    case DataType::kUINT8: return "UINT8";
    case DataType::kFP8: return "FP8";
    case DataType::kBF16: return "BF16";
    case DataType::kINT64: return "INT64";
    case DataType::kINT4: return "INT4";
    case DataType::kFP4: return "FP4";
    case DataType::kE8M0: return "E8M0";
  }
  return "unknown";
}

DType from_trt(DataType type, const std::string& tensor) {
  switch (type) {
    case DataType::kFLOAT: return DType::kFloat32;
    case DataType::kHALF: return DType::kFloat16;
    case DataType::kBF16: return DType::kBFloat16;
    case DataType::kINT32: return DType::kInt32;
    case DataType::kINT8: return DType::kInt8;
    case DataType::kUINT8: return DType::kUInt8;
    case DataType::kINT64: return DType::kInt64;
    case DataType::kBOOL: return DType::kBool;
    default: break;
  }
  throw Error(ErrorKind::kTensorRT,
              std::string("tensor '") + tensor + "' has TensorRT type " + trt_type_name(type) +
                  ", which mdtrt cannot pass in or out (supported: float32, float16, bfloat16, int32, int8, uint8, "
                  "int64, bool); cast it inside the network",
              -1, "engine IO types");
}

DataType to_trt(DType type) {
  switch (type) {
    case DType::kFloat32: return DataType::kFLOAT;
    case DType::kFloat16: return DataType::kHALF;
    case DType::kBFloat16: return DataType::kBF16;
    case DType::kInt32: return DataType::kINT32;
    case DType::kInt8: return DataType::kINT8;
    case DType::kUInt8: return DataType::kUINT8;
    case DType::kInt64: return DataType::kINT64;
    case DType::kBool: return DataType::kBOOL;
    case DType::kFloat64: break;
  }
  throw_invalid_argument(std::string("TensorRT has no ") + dtype_name(type) + " tensors");
}

Shape from_dims(const nvinfer1::Dims& dims) {
  if (dims.nbDims < 0) return {};
  return Shape(dims.d, dims.d + dims.nbDims);
}

nvinfer1::Dims to_dims(const Shape& shape) {
  if (shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
    throw_invalid_argument("TensorRT tensors have at most " + std::to_string(nvinfer1::Dims::MAX_DIMS) +
                           " dimensions, got " + shape_string(shape));
  nvinfer1::Dims dims{};
  dims.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) dims.d[i] = shape[i];
  return dims;
}

}  // namespace mdtrt::trt
