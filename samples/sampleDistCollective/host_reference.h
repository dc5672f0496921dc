// The sample's ground truth: every rank's input, computed from the seed alone (so each process of a
// one-process-per-rank launch knows every rank's input), and what each rank must receive, computed
// on the host in double precision from the same network: transpose, collective along the first
// dimension, transpose back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/collective_program.h"
#include "runtime/dtype.h"

namespace sample_dc {

// A row-major 2-D tensor of element values; values are exactly representable in the run's dtype.
struct HostTensor {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<double> values;
};

HostTensor transpose(const HostTensor& t);

// Random inputs for world rank `rank`: small integers, or values near 1 for prod (nothing
// overflows, every value is exact in float16, bfloat16 and int32).
HostTensor random_input(uint64_t seed, int rank, int64_t rows, int64_t cols, mdtrt::DType dtype,
                        mdtrt::ReduceOp reduce, int group_size);

// NVIDIA's fixed 2-rank inputs and expected outputs ([3, 4] float32, sum, root 0).
struct OriginalVectors {
  HostTensor input[2];
  std::vector<double> expected[2];  // empty: that rank's output is undefined (not checked)
};
OriginalVectors original_vectors(mdtrt::CollectiveOp op);

struct Expectation {
  bool defined = false;         // false: not a member, or a non-root of reduce/gather
  std::string why_undefined;
  HostTensor values;            // [rows, cols'] as the network outputs it
  std::vector<double> tolerance;  // per element; empty: compare bytes exactly
};

// What world rank `rank` must receive. `inputs` holds every world rank's [rows, cols] input.
Expectation expected_output(const mdtrt::CollectiveSpec& spec, const std::vector<HostTensor>& inputs, int world_size,
                            int rank, mdtrt::DType dtype);

std::vector<uint8_t> encode(const std::vector<double>& values, mdtrt::DType dtype);
std::vector<double> decode(const std::vector<uint8_t>& bytes, mdtrt::DType dtype);

struct CheckResult {
  bool passed = false;
  int64_t mismatches = 0;
  std::string first_mismatch;  // "element [r, c]: expected x, got y (tolerance t)"
};
CheckResult check_output(const Expectation& expected, const std::vector<uint8_t>& got, mdtrt::DType dtype);

// Test-only: changes element 0 of `bytes` to a value the check cannot accept.
void corrupt_first_element(std::vector<uint8_t>& bytes, mdtrt::DType dtype);

}  // namespace sample_dc
