#include "runtime/dtype.h"

#include "common/error.h"
#include "common/name_table.h"

namespace mdtrt {
namespace {
struct DTypeInfo {
  DType type;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kTypes[] = {
    {DType::kFloat32, "float32", 4}, {DType::kFloat16, "float16", 2}, {DType::kBFloat16, "bfloat16", 2},
    {DType::kInt32, "int32", 4},     {DType::kInt8, "int8", 1},       {DType::kUInt8, "uint8", 1},
    {DType::kInt64, "int64", 8},     {DType::kBool, "bool", 1},       {DType::kFloat64, "float64", 8},
};
const DTypeInfo& info(DType t) {
  for (const auto& i : kTypes)
    if (i.type == t) return i;
  throw_invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(t)));
}
}  // namespace

size_t dtype_size(DType t) { return info(t).size; }
const char* dtype_name(DType t) { return info(t).name; }

DType dtype_from_name(const std::string& name) {
  std::vector<std::string> known;
  for (const auto& i : kTypes) {
    if (name == i.name) return i.type;
    known.push_back(i.name);
  }
  throw_unknown_name("dtype", name, known);
}

std::vector<DType> all_dtypes() {
  std::vector<DType> out;
  for (const auto& i : kTypes) out.push_back(i.type);
  return out;
}

int64_t element_count(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_string(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) s += ",";
  return s + ")";
}

}  // namespace mdtrt
