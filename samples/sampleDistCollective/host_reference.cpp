#include "host_reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace sample_dc {
namespace {

using mdtrt::CollectiveOp;
using mdtrt::DType;
using mdtrt::ReduceOp;

// splitmix64: the same stream on every machine and standard library, unlike std::*_distribution,
// so that separate processes agree on every rank's input.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const int exp = static_cast<int>((x >> 23) & 0xFF);
  uint32_t mant = x & 0x7FFFFF;
  if (exp == 0xFF) return sign | 0x7C00 | (mant ? 0x200 : 0);
  const int e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7C00;
  if (e <= 0) {  // subnormal half
    if (e < -10) return sign;
    mant |= 0x800000;
    const int shift = 14 - e;
    uint32_t h = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // a carry into the exponent is still right
  return static_cast<uint16_t>(sign | h);
}

float half_to_float(uint16_t h) {
  const float sign = (h & 0x8000) ? -1.0f : 1.0f;
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -24);
  if (exp == 31) return mant ? std::numeric_limits<float>::quiet_NaN() : sign * std::numeric_limits<float>::infinity();
  return sign * std::ldexp(static_cast<float>(1024 + mant), exp - 25);
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7F800000) == 0x7F800000 && (x & 0x7FFFFF)) return static_cast<uint16_t>((x >> 16) | 0x40);
  x += 0x7FFF + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

float bf16_to_float(uint16_t b) {
  uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// Unit round-off with a factor 2 of margin: the bound a floating-point reduction of n terms keeps.
double epsilon(DType t) {
  switch (t) {
    case DType::kFloat32: return std::ldexp(1.0, -23);
    case DType::kFloat16: return std::ldexp(1.0, -10);
    case DType::kBFloat16: return std::ldexp(1.0, -7);
    default: return 0.0;
  }
}

std::string format_value(double v, DType dtype) {
  std::ostringstream s;
  if (dtype == DType::kInt32) s << static_cast<int64_t>(v);
  else s << std::setprecision(dtype == DType::kFloat32 ? 9 : 5) << v;
  return s.str();
}

}  // namespace

HostTensor transpose(const HostTensor& t) {
  HostTensor out;
  out.rows = t.cols;
  out.cols = t.rows;
  out.values.resize(t.values.size());
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c) out.values[c * t.rows + r] = t.values[r * t.cols + c];
  return out;
}

HostTensor random_input(uint64_t seed, int rank, int64_t rows, int64_t cols, DType dtype, ReduceOp reduce,
                        int group_size) {
  uint64_t state = seed * 0x100000001B3ull + static_cast<uint64_t>(rank + 1) * 0xD1B54A32D192ED03ull;
  HostTensor t{rows, cols, std::vector<double>(static_cast<size_t>(rows * cols))};
  for (double& v : t.values) {
    const uint64_t r = splitmix64(state);
    if (reduce != ReduceOp::kProd) {
      v = static_cast<double>(static_cast<int64_t>(r % 17) - 8);  // -8..8: sums of a few ranks stay exact
    } else if (dtype == DType::kInt32) {
      // Products of 2 * group_size factors of magnitude <= 2 would overflow int32 past 31 ranks.
      static const double kFactors[] = {-2, -1, 1, 2};
      v = group_size <= 16 ? kFactors[r % 4] : (r % 2 ? 1.0 : -1.0);
    } else {
      v = 1.0 + static_cast<double>(static_cast<int64_t>(r % 5) - 2) / 16.0;  // 0.875..1.125, exact in bf16
    }
  }
  return t;
}

OriginalVectors original_vectors(CollectiveOp op) {
  auto iota = [](double start, double step) {
    HostTensor t{3, 4, std::vector<double>(12)};
    for (int i = 0; i < 12; ++i) t.values[i] = start + step * i;
    return t;
  };
  const HostTensor one_to_12 = iota(1, 1), tens = iota(10, 10), zero_to_11 = iota(0, 1), hundreds = iota(100, 1),
                   nines = iota(99, 0);
  const std::vector<double> sum = {11, 22, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132};
  const std::vector<double> gathered = {0, 1, 2,  3,  100, 101, 102, 103, 4,   5,   6,   7,
                                        104, 105, 106, 107, 8, 9, 10, 11, 108, 109, 110, 111};
  switch (op) {
    case CollectiveOp::kAllGather: return {{zero_to_11, hundreds}, {gathered, gathered}};
    case CollectiveOp::kAllReduce: return {{one_to_12, tens}, {sum, sum}};
    case CollectiveOp::kBroadcast: return {{one_to_12, nines}, {one_to_12.values, one_to_12.values}};
    case CollectiveOp::kReduce: return {{one_to_12, tens}, {sum, {}}};
    case CollectiveOp::kReduceScatter:
      return {{one_to_12, tens}, {{11, 22, 55, 66, 99, 110}, {33, 44, 77, 88, 121, 132}}};
    case CollectiveOp::kAllToAll:
      return {{zero_to_11, hundreds},
              {{0, 1, 100, 101, 4, 5, 104, 105, 8, 9, 108, 109}, {2, 3, 102, 103, 6, 7, 106, 107, 10, 11, 110, 111}}};
    case CollectiveOp::kGather: return {{zero_to_11, hundreds}, {gathered, {}}};
    case CollectiveOp::kScatter: return {{zero_to_11, nines}, {{0, 1, 4, 5, 8, 9}, {2, 3, 6, 7, 10, 11}}};
  }
  throw std::logic_error("unknown collective");
}

Expectation expected_output(const mdtrt::CollectiveSpec& spec, const std::vector<HostTensor>& inputs, int world_size,
                            int rank, DType dtype) {
  Expectation e;
  const std::vector<int> members = spec.members(world_size);
  const int n = static_cast<int>(members.size());
  const auto me = std::find(members.begin(), members.end(), rank);
  if (me == members.end()) {
    e.why_undefined = "not in the group, does nothing";
    return e;
  }
  const int position = static_cast<int>(me - members.begin());
  const bool is_root = rank == spec.root;
  if ((spec.op == CollectiveOp::kReduce || spec.op == CollectiveOp::kGather) && !is_root) {
    e.why_undefined = "output undefined on a non-root rank, not checked";
    return e;
  }

  // The network's view: each member's input transposed to [cols, rows]; the collective works on
  // contiguous chunks along that first dimension.
  std::vector<HostTensor> t;
  for (int m : members) t.push_back(transpose(inputs.at(m)));
  const HostTensor* root_t = nullptr;
  if (mdtrt::op_has_root(spec.op))
    root_t = &t[std::find(members.begin(), members.end(), spec.root) - members.begin()];
  const int64_t first = t[0].rows, inner = t[0].cols, count = first * inner;
  const int64_t chunk = count / n;

  std::vector<double> reduced, scale;
  if (mdtrt::op_reduces(spec.op)) {
    reduced.assign(count, 0.0);
    scale.assign(count, 0.0);
    for (int64_t i = 0; i < count; ++i) {
      double acc = t[0].values[i], magnitude = std::fabs(acc);
      for (int p = 1; p < n; ++p) {
        const double x = t[p].values[i];
        magnitude += std::fabs(x);
        switch (spec.reduce) {
          case ReduceOp::kSum:
          case ReduceOp::kAvg: acc += x; break;
          case ReduceOp::kProd: acc *= x; break;
          case ReduceOp::kMax: acc = std::max(acc, x); break;
          case ReduceOp::kMin: acc = std::min(acc, x); break;
          case ReduceOp::kNone: throw std::logic_error("reducing collective without a reduce op");
        }
      }
      if (spec.reduce == ReduceOp::kAvg) {
        acc /= n;
        magnitude /= n;
      }
      reduced[i] = acc;
      // Floating-point sums of n terms are off by at most about n * eps * sum|x|; products by
      // n * eps * |result|; max and min pick an input, exactly. NCCL averages integers by a
      // truncating division after the sum, so int32 avg may differ by one from the rounded mean.
      const double eps = epsilon(dtype);
      switch (spec.reduce) {
        case ReduceOp::kSum: scale[i] = 2.0 * n * eps * magnitude; break;
        case ReduceOp::kAvg:
          scale[i] = dtype == DType::kInt32 ? 1.0 : 2.0 * n * eps * magnitude + eps * std::fabs(acc);
          break;
        case ReduceOp::kProd: scale[i] = 2.0 * n * eps * std::fabs(acc); break;
        default: scale[i] = 0.0; break;
      }
    }
    if (dtype == DType::kInt32 && spec.reduce == ReduceOp::kAvg)
      for (double& v : reduced) v = std::trunc(v);
  }

  HostTensor out{0, inner, {}};
  std::vector<double> tolerance;
  auto append = [&](const std::vector<double>& src, int64_t offset, int64_t len) {
    out.values.insert(out.values.end(), src.begin() + offset, src.begin() + offset + len);
  };
  switch (spec.op) {
    case CollectiveOp::kAllReduce:
    case CollectiveOp::kReduce:
      append(reduced, 0, count);
      tolerance = scale;
      break;
    case CollectiveOp::kReduceScatter:
      append(reduced, position * chunk, chunk);
      tolerance.assign(scale.begin() + position * chunk, scale.begin() + (position + 1) * chunk);
      break;
    case CollectiveOp::kAllGather:
    case CollectiveOp::kGather:
      for (const auto& x : t) append(x.values, 0, count);
      break;
    case CollectiveOp::kBroadcast: append(root_t->values, 0, count); break;
    case CollectiveOp::kAllToAll:
      for (const auto& x : t) append(x.values, position * chunk, chunk);
      break;
    case CollectiveOp::kScatter: append(root_t->values, position * chunk, chunk); break;
  }
  out.rows = static_cast<int64_t>(out.values.size()) / inner;

  // Back to the network's output layout [rows, cols'].
  e.defined = true;
  e.values = transpose(out);
  if (!tolerance.empty()) e.tolerance = transpose(HostTensor{out.rows, inner, tolerance}).values;
  return e;
}

std::vector<uint8_t> encode(const std::vector<double>& values, DType dtype) {
  const size_t esize = mdtrt::dtype_size(dtype);
  std::vector<uint8_t> bytes(values.size() * esize);
  for (size_t i = 0; i < values.size(); ++i) {
    uint8_t* dst = bytes.data() + i * esize;
    const float f = static_cast<float>(values[i]);
    switch (dtype) {
      case DType::kFloat32: std::memcpy(dst, &f, 4); break;
      case DType::kFloat16: {
        const uint16_t h = float_to_half(f);
        std::memcpy(dst, &h, 2);
        break;
      }
      case DType::kBFloat16: {
        const uint16_t b = float_to_bf16(f);
        std::memcpy(dst, &b, 2);
        break;
      }
      case DType::kInt32: {
        const auto v = static_cast<int32_t>(std::llround(values[i]));
        std::memcpy(dst, &v, 4);
        break;
      }
      default: throw std::invalid_argument(std::string("the sample does not use dtype ") + mdtrt::dtype_name(dtype));
    }
  }
  return bytes;
}

std::vector<double> decode(const std::vector<uint8_t>& bytes, DType dtype) {
  const size_t esize = mdtrt::dtype_size(dtype);
  std::vector<double> values(bytes.size() / esize);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint8_t* src = bytes.data() + i * esize;
    switch (dtype) {
      case DType::kFloat32: {
        float f;
        std::memcpy(&f, src, 4);
        values[i] = f;
        break;
      }
      case DType::kFloat16:
      case DType::kBFloat16: {
        uint16_t h;
        std::memcpy(&h, src, 2);
        values[i] = dtype == DType::kFloat16 ? half_to_float(h) : bf16_to_float(h);
        break;
      }
      case DType::kInt32: {
        int32_t v;
        std::memcpy(&v, src, 4);
        values[i] = v;
        break;
      }
      default: throw std::invalid_argument(std::string("the sample does not use dtype ") + mdtrt::dtype_name(dtype));
    }
  }
  return values;
}

CheckResult check_output(const Expectation& expected, const std::vector<uint8_t>& got, DType dtype) {
  CheckResult result;
  const size_t esize = mdtrt::dtype_size(dtype);
  const size_t count = expected.values.values.size();
  if (got.size() != count * esize) {
    result.mismatches = static_cast<int64_t>(count);
    result.first_mismatch = "output has " + std::to_string(got.size() / esize) + " elements, expected " +
                            std::to_string(count) + " ([" + std::to_string(expected.values.rows) + ", " +
                            std::to_string(expected.values.cols) + "])";
    return result;
  }
  const std::vector<uint8_t> want = encode(expected.values.values, dtype);
  const std::vector<double> got_values = decode(got, dtype);
  const std::vector<double> want_values = decode(want, dtype);
  for (size_t i = 0; i < count; ++i) {
    bool ok;
    if (expected.tolerance.empty()) {
      ok = std::memcmp(got.data() + i * esize, want.data() + i * esize, esize) == 0;  // moved, never computed
    } else {
      ok = std::fabs(got_values[i] - expected.values.values[i]) <= expected.tolerance[i];  // false for NaN
    }
    if (ok) continue;
    if (result.mismatches++ == 0) {
      const int64_t cols = expected.values.cols;
      std::ostringstream m;
      m << "element [" << static_cast<int64_t>(i) / cols << ", " << static_cast<int64_t>(i) % cols
        << "]: expected " << format_value(want_values[i], dtype) << ", got " << format_value(got_values[i], dtype);
      if (expected.tolerance.empty()) m << " (moved data must match bit for bit)";
      else m << " (tolerance " << expected.tolerance[i] << ")";
      result.first_mismatch = m.str();
    }
  }
  result.passed = result.mismatches == 0;
  return result;
}

void corrupt_first_element(std::vector<uint8_t>& bytes, DType dtype) {
  const size_t esize = mdtrt::dtype_size(dtype);
  if (bytes.size() < esize) return;
  std::vector<uint8_t> first(bytes.begin(), bytes.begin() + esize);
  double v = decode(first, dtype)[0];
  v = std::isfinite(v) ? v + 1000.0 + 2.0 * std::fabs(v) : 1000.0;
  const std::vector<uint8_t> changed = encode({v}, dtype);
  std::copy(changed.begin(), changed.end(), bytes.begin());
}

}  // namespace sample_dc
