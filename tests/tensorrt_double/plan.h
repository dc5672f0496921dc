// The TensorRT test double's plan: its own serialized network (not NVIDIA's format).
//
// Text, one record per line, `key=value` tokens; lists are comma-separated ("-" when empty),
// names percent-encoded. The first line is the magic `MDTRT-TENSORRT-DOUBLE-PLAN 1`:
//   tensor index=I name=N dtype=FLOAT dims=4,-1          every tensor of the network
//   input tensor=I min=.. opt=.. max=..                  network inputs with profile 0's range
//   layer index=L type=shuffle|identity|dist_collective name=N inputs=I outputs=O nb_ranks=R
//         [first_transpose=1,0 reshape=.. zero_is_placeholder=1 second_transpose=..]
//         [op=all_gather reduce=none root=-1 groups=1,0]
//   output tensor=I                                      network outputs, in markOutput order
//   ranks value=R exact=0|1                              the communicator the plan needs
//   builder flags=.. flag_names=.. workspace=.. timing_cache=0|1 name=..
// tests/trt_double.py's read_plan() parses the same format for the tests.
#pragma once

#include <NvInfer.h>

#include <cstdint>
#include <string>
#include <vector>

namespace trt_double {

using Shape = std::vector<int64_t>;

constexpr const char* kPlanMagic = "MDTRT-TENSORRT-DOUBLE-PLAN 1";

struct TensorInfo {
  std::string name;
  nvinfer1::DataType type = nvinfer1::DataType::kFLOAT;
  Shape dims;  // -1 for dimensions fixed only at run time
};

struct InputInfo {
  int tensor = -1;
  Shape min, opt, max;  // profile 0; equal to the dims for static inputs
};

enum class LayerKind { kShuffle, kIdentity, kDistCollective };

struct LayerInfo {
  LayerKind kind = LayerKind::kIdentity;
  std::string name;
  int input = -1;
  int output = -1;
  int32_t nb_ranks = 1;
  // shuffle: numpy's transpose semantics (out[i] = in[perm[i]]); empty = identity
  std::vector<int32_t> first_transpose, second_transpose;
  bool has_reshape = false;
  Shape reshape;
  bool zero_is_placeholder = true;
  // dist_collective
  nvinfer1::CollectiveOperation op = nvinfer1::CollectiveOperation::kALL_REDUCE;
  nvinfer1::ReduceOperation reduce = nvinfer1::ReduceOperation::kNONE;
  int64_t root = -1;
  std::vector<int64_t> groups;  // ordered world ranks; empty = every rank of the communicator
};

struct Plan {
  std::vector<TensorInfo> tensors;
  std::vector<InputInfo> inputs;
  std::vector<LayerInfo> layers;
  std::vector<int> outputs;
  // The communicator the plan needs (0: no multi-device layer). exact: its size must equal
  // `ranks` (some layer spans every rank); otherwise (every layer grouped) it must be >= ranks.
  int ranks = 0;
  bool ranks_exact = true;
  uint64_t builder_flags = 0;
  std::string builder_flag_names;
  uint64_t workspace = 0;
  bool timing_cache = false;
  std::string name;

  bool multi_device() const;
  int find_tensor(const std::string& name) const;
  bool is_input(int tensor) const;
  bool is_output(int tensor) const;
};

const char* op_name(nvinfer1::CollectiveOperation op);
const char* reduce_name(nvinfer1::ReduceOperation op);
const char* dtype_name(nvinfer1::DataType type);
size_t dtype_size(nvinfer1::DataType type);  // 0 for sub-byte types
bool op_has_root(nvinfer1::CollectiveOperation op);
bool op_reduces(nvinfer1::CollectiveOperation op);
std::string shape_string(const Shape& shape);

// The plan's `ranks` from its layers (see the README for the rule).
void compute_ranks(Plan& plan);

std::string serialize(const Plan& plan);
// false with `why` for bytes that are not a plan of this double.
bool parse(const void* data, size_t size, Plan& plan, std::string& why);

// Shapes of every tensor given the inputs' (input_shapes[i] for plan.inputs[i]; -1 stays -1).
// false with `why` naming the layer when a layer cannot take its input.
bool infer_shapes(const Plan& plan, const std::vector<Shape>& input_shapes, std::vector<Shape>& shapes,
                  std::string& why);

// Whether the double can run this shuffle (identity or 2-D [1,0] transposes, any reshape).
bool shuffle_supported(const LayerInfo& layer, size_t input_rank, std::string& why);

}  // namespace trt_double
