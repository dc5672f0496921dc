// Element types that travel between Python, NCCL and TensorRT.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mdtrt {

enum class DType : int { kFloat32, kFloat16, kBFloat16, kInt32, kInt8, kUInt8, kInt64, kBool, kFloat64 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // "float32", "float16", "bfloat16", ...
DType dtype_from_name(const std::string& name);  // throws InvalidArgument listing the known names
std::vector<DType> all_dtypes();                  // every dtype, in the table's order

using Shape = std::vector<int64_t>;
int64_t element_count(const Shape& shape);
std::string shape_string(const Shape& shape);

}  // namespace mdtrt
