#include "plan.h"

#include <algorithm>
#include <cctype>
#include <stdexcept>
#include <cstdio>
#include <map>
#include <sstream>

namespace trt_double {

using nvinfer1::CollectiveOperation;
using nvinfer1::DataType;
using nvinfer1::ReduceOperation;

namespace {

const std::pair<CollectiveOperation, const char*> kOps[] = {
    {CollectiveOperation::kALL_REDUCE, "all_reduce"}, {CollectiveOperation::kALL_GATHER, "all_gather"},
    {CollectiveOperation::kBROADCAST, "broadcast"},   {CollectiveOperation::kREDUCE, "reduce"},
    {CollectiveOperation::kREDUCE_SCATTER, "reduce_scatter"}, {CollectiveOperation::kALL_TO_ALL, "all_to_all"},
    {CollectiveOperation::kGATHER, "gather"},         {CollectiveOperation::kSCATTER, "scatter"}};
const std::pair<ReduceOperation, const char*> kReduces[] = {
    {ReduceOperation::kSUM, "sum"}, {ReduceOperation::kPROD, "prod"}, {ReduceOperation::kMAX, "max"},
    {ReduceOperation::kMIN, "min"}, {ReduceOperation::kAVG, "avg"},   {ReduceOperation::kNONE, "none"}};
const std::pair<DataType, const char*> kTypes[] = {
    {DataType::kFLOAT, "FLOAT"}, {DataType::kHALF, "HALF"},   {DataType::kINT8, "INT8"}, {DataType::kINT32, "INT32"},
    {DataType::kBOOL, "BOOL"},   {DataType::kUINT8, "UINT8"}, {DataType::kFP8, "FP8"},   {DataType::kBF16, "BF16"},
    {DataType::kINT64, "INT64"}, {DataType::kINT4, "INT4"},   {DataType::kFP4, "FP4"},   {DataType::kE8M0, "E8M0"}};

template <typename E, size_t N>
const char* name_of(const std::pair<E, const char*> (&table)[N], E value) {
  for (const auto& [v, n] : table)
    if (v == value) return n;
  return "unknown";
}

template <typename E, size_t N>
bool value_of(const std::pair<E, const char*> (&table)[N], const std::string& name, E& value) {
  for (const auto& [v, n] : table)
    if (name == n) {
      value = v;
      return true;
    }
  return false;
}

std::string encode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '_' || c == '.' || c == '-' || c == ':' || c == '/' || c == '(' || c == ')') {
      out += static_cast<char>(c);
    } else {
      char buf[4];
      std::snprintf(buf, sizeof(buf), "%%%02X", c);
      out += buf;
    }
  }
  return out.empty() ? "%" : out;  // "%" alone: the empty name
}

std::string decode(const std::string& s) {
  if (s == "%") return "";
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

template <typename T>
std::string join(const std::vector<T>& values) {
  if (values.empty()) return "-";
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + std::to_string(values[i]);
  return out;
}

template <typename T>
std::vector<T> split_ints(const std::string& text) {
  std::vector<T> out;
  if (text == "-" || text.empty()) return out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(static_cast<T>(std::stoll(item)));
  return out;
}

int64_t volume_known(const Shape& s) {
  int64_t v = 1;
  for (int64_t d : s) v *= d;
  return v;
}

bool is_identity(const std::vector<int32_t>& perm) {
  for (size_t i = 0; i < perm.size(); ++i)
    if (perm[i] != static_cast<int32_t>(i)) return false;
  return true;
}

bool transpose(const std::vector<int32_t>& perm, Shape& shape, const std::string& layer, std::string& why) {
  if (perm.empty()) return true;
  // A Permutation always has MAX_DIMS entries; only the first rank ones apply (callers leave the
  // rest zero, as Permutation{{1, 0}} does).
  if (perm.size() < shape.size()) {
    why = "IShuffleLayer '" + layer + "': a transpose of " + std::to_string(perm.size()) + " dimensions on a tensor of " +
          std::to_string(shape.size());
    return false;
  }
  Shape out(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    if (perm[i] < 0 || static_cast<size_t>(perm[i]) >= shape.size()) {
      why = "IShuffleLayer '" + layer + "': permutation entry " + std::to_string(perm[i]) + " outside a " +
            std::to_string(shape.size()) + "-D tensor";
      return false;
    }
    out[i] = shape[static_cast<size_t>(perm[i])];
  }
  shape = out;
  return true;
}

}  // namespace

const char* op_name(CollectiveOperation op) { return name_of(kOps, op); }
const char* reduce_name(ReduceOperation op) { return name_of(kReduces, op); }
const char* dtype_name(DataType type) { return name_of(kTypes, type); }

size_t dtype_size(DataType type) {
  switch (type) {
    case DataType::kFLOAT:
    case DataType::kINT32: return 4;
    case DataType::kHALF:
    case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    case DataType::kINT8:
    case DataType::kUINT8:
    case DataType::kBOOL:
    case DataType::kFP8:
    case DataType::kE8M0: return 1;
    default: return 0;
  }
}

bool op_has_root(CollectiveOperation op) {
  return op == CollectiveOperation::kBROADCAST || op == CollectiveOperation::kREDUCE ||
         op == CollectiveOperation::kGATHER || op == CollectiveOperation::kSCATTER;
}

bool op_reduces(CollectiveOperation op) {
  return op == CollectiveOperation::kALL_REDUCE || op == CollectiveOperation::kREDUCE ||
         op == CollectiveOperation::kREDUCE_SCATTER;
}

std::string shape_string(const Shape& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

bool Plan::multi_device() const {
  return std::any_of(layers.begin(), layers.end(), [](const LayerInfo& l) { return l.kind == LayerKind::kDistCollective; });
}

int Plan::find_tensor(const std::string& n) const {
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].name == n && (is_input(static_cast<int>(i)) || is_output(static_cast<int>(i)))) return static_cast<int>(i);
  return -1;
}

bool Plan::is_input(int t) const {
  return std::any_of(inputs.begin(), inputs.end(), [&](const InputInfo& i) { return i.tensor == t; });
}

bool Plan::is_output(int t) const { return std::find(outputs.begin(), outputs.end(), t) != outputs.end(); }

// The rule (README): a layer's nbRanks is the number of ranks taking part in it. An ungrouped
// layer spans the whole communicator, so the communicator must have exactly nbRanks ranks; a
// grouped layer names world ranks, so the communicator needs at least max(rank) + 1 of them (and
// at least nbRanks).
void compute_ranks(Plan& plan) {
  plan.ranks = 0;
  plan.ranks_exact = false;
  for (const auto& l : plan.layers) {
    if (l.kind != LayerKind::kDistCollective) continue;
    int need = l.nb_ranks;
    if (l.groups.empty()) {
      plan.ranks_exact = true;
    } else {
      need = std::max<int>(need, static_cast<int>(*std::max_element(l.groups.begin(), l.groups.end())) + 1);
    }
    plan.ranks = std::max(plan.ranks, need);
  }
  if (plan.ranks == 0) plan.ranks_exact = true;
}

std::string serialize(const Plan& plan) {
  std::ostringstream out;
  out << kPlanMagic << "\n";
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const auto& t = plan.tensors[i];
    out << "tensor index=" << i << " name=" << encode(t.name) << " dtype=" << dtype_name(t.type)
        << " dims=" << join(t.dims) << "\n";
  }
  for (const auto& in : plan.inputs)
    out << "input tensor=" << in.tensor << " min=" << join(in.min) << " opt=" << join(in.opt) << " max=" << join(in.max)
        << "\n";
  for (size_t i = 0; i < plan.layers.size(); ++i) {
    const auto& l = plan.layers[i];
    const char* type = l.kind == LayerKind::kShuffle ? "shuffle" : l.kind == LayerKind::kIdentity ? "identity" : "dist_collective";
    out << "layer index=" << i << " type=" << type << " name=" << encode(l.name) << " inputs=" << l.input
        << " outputs=" << l.output << " nb_ranks=" << l.nb_ranks;
    if (l.kind == LayerKind::kShuffle) {
      out << " first_transpose=" << join(l.first_transpose) << " reshape=" << (l.has_reshape ? join(l.reshape) : "none")
          << " zero_is_placeholder=" << (l.zero_is_placeholder ? 1 : 0) << " second_transpose=" << join(l.second_transpose);
    } else if (l.kind == LayerKind::kDistCollective) {
      out << " op=" << op_name(l.op) << " reduce=" << reduce_name(l.reduce) << " root=" << l.root
          << " groups=" << join(l.groups);
    }
    out << "\n";
  }
  for (int o : plan.outputs) out << "output tensor=" << o << "\n";
  out << "ranks value=" << plan.ranks << " exact=" << (plan.ranks_exact ? 1 : 0) << "\n";
  out << "builder flags=" << plan.builder_flags << " flag_names=" << encode(plan.builder_flag_names)
      << " workspace=" << plan.workspace << " timing_cache=" << (plan.timing_cache ? 1 : 0) << " name=" << encode(plan.name)
      << "\n";
  return out.str();
}

bool parse(const void* data, size_t size, Plan& plan, std::string& why) {
  const std::string magic = kPlanMagic;
  const char* bytes = static_cast<const char*>(data);
  if (data == nullptr || size < magic.size() + 1 || std::string(bytes, magic.size()) != magic || bytes[magic.size()] != '\n') {
    why = "the " + std::to_string(size) + " bytes are not a plan of the TensorRT test double (they do not start with '" +
          magic + "')";
    return false;
  }
  Plan p;
  std::istringstream in(std::string(bytes, size));
  std::string line;
  std::getline(in, line);
  int number = 1;
  try {
    while (std::getline(in, line)) {
      ++number;
      if (line.empty()) continue;
      std::istringstream tokens(line);
      std::string kind, token;
      tokens >> kind;
      std::map<std::string, std::string> kv;
      while (tokens >> token) {
        auto eq = token.find('=');
        if (eq == std::string::npos) throw std::runtime_error("token without '=': " + token);
        kv[token.substr(0, eq)] = token.substr(eq + 1);
      }
      auto get = [&](const char* key) -> const std::string& {
        auto it = kv.find(key);
        if (it == kv.end()) throw std::runtime_error(std::string("missing '") + key + "'");
        return it->second;
      };
      if (kind == "tensor") {
        TensorInfo t;
        t.name = decode(get("name"));
        if (!value_of(kTypes, get("dtype"), t.type)) throw std::runtime_error("unknown dtype " + get("dtype"));
        t.dims = split_ints<int64_t>(get("dims"));
        p.tensors.push_back(t);
      } else if (kind == "input") {
        InputInfo i;
        i.tensor = std::stoi(get("tensor"));
        i.min = split_ints<int64_t>(get("min"));
        i.opt = split_ints<int64_t>(get("opt"));
        i.max = split_ints<int64_t>(get("max"));
        p.inputs.push_back(i);
      } else if (kind == "layer") {
        LayerInfo l;
        const std::string& type = get("type");
        l.kind = type == "shuffle" ? LayerKind::kShuffle : type == "identity" ? LayerKind::kIdentity : LayerKind::kDistCollective;
        if (type != "shuffle" && type != "identity" && type != "dist_collective") throw std::runtime_error("unknown layer type " + type);
        l.name = decode(get("name"));
        l.input = std::stoi(get("inputs"));
        l.output = std::stoi(get("outputs"));
        l.nb_ranks = std::stoi(get("nb_ranks"));
        if (l.kind == LayerKind::kShuffle) {
          l.first_transpose = split_ints<int32_t>(get("first_transpose"));
          l.second_transpose = split_ints<int32_t>(get("second_transpose"));
          l.has_reshape = get("reshape") != "none";
          if (l.has_reshape) l.reshape = split_ints<int64_t>(get("reshape"));
          l.zero_is_placeholder = get("zero_is_placeholder") == "1";
        } else if (l.kind == LayerKind::kDistCollective) {
          if (!value_of(kOps, get("op"), l.op)) throw std::runtime_error("unknown op " + get("op"));
          if (!value_of(kReduces, get("reduce"), l.reduce)) throw std::runtime_error("unknown reduce " + get("reduce"));
          l.root = std::stoll(get("root"));
          l.groups = split_ints<int64_t>(get("groups"));
        }
        p.layers.push_back(l);
      } else if (kind == "output") {
        p.outputs.push_back(std::stoi(get("tensor")));
      } else if (kind == "ranks") {
        p.ranks = std::stoi(get("value"));
        p.ranks_exact = get("exact") == "1";
      } else if (kind == "builder") {
        p.builder_flags = std::stoull(get("flags"));
        p.builder_flag_names = decode(get("flag_names"));
        p.workspace = std::stoull(get("workspace"));
        p.timing_cache = get("timing_cache") == "1";
        p.name = decode(get("name"));
      } else {
        throw std::runtime_error("unknown record '" + kind + "'");
      }
    }
    const int n = static_cast<int>(p.tensors.size());
    auto check = [&](int t) {
      if (t < 0 || t >= n) throw std::runtime_error("tensor index " + std::to_string(t) + " out of range");
    };
    for (const auto& i : p.inputs) check(i.tensor);
    for (int o : p.outputs) check(o);
    for (const auto& l : p.layers) {
      check(l.input);
      check(l.output);
    }
  } catch (const std::exception& e) {
    why = "the TensorRT test double's plan is corrupt at line " + std::to_string(number) + ": " + e.what();
    return false;
  }
  plan = std::move(p);
  return true;
}

bool shuffle_supported(const LayerInfo& layer, size_t input_rank, std::string& why) {
  auto check = [&](const std::vector<int32_t>& perm, const char* which, size_t rank) {
    if (perm.empty() || is_identity(perm)) return true;
    if (rank == 2 && perm.size() == 2 && perm[0] == 1 && perm[1] == 0) return true;
    std::string p;
    for (size_t i = 0; i < perm.size(); ++i) p += (i ? "," : "") + std::to_string(perm[i]);
    why = "IShuffleLayer '" + layer.name + "': the TensorRT test double runs only 2-D transposes ([1,0] of a 2-D tensor) "
          "and reshapes, not the " + which + " transpose [" + p + "] of a " + std::to_string(rank) + "-D tensor";
    return false;
  };
  if (!check(layer.first_transpose, "first", input_rank)) return false;
  size_t rank = layer.has_reshape ? layer.reshape.size() : input_rank;
  return check(layer.second_transpose, "second", rank);
}

bool infer_shapes(const Plan& plan, const std::vector<Shape>& input_shapes, std::vector<Shape>& shapes, std::string& why) {
  shapes.assign(plan.tensors.size(), Shape{});
  std::vector<bool> known(plan.tensors.size(), false);
  for (size_t i = 0; i < plan.inputs.size(); ++i) {
    shapes[plan.inputs[i].tensor] = i < input_shapes.size() ? input_shapes[i] : plan.tensors[plan.inputs[i].tensor].dims;
    known[plan.inputs[i].tensor] = true;
  }
  for (const auto& l : plan.layers) {
    if (!known[l.input]) {
      why = "layer '" + l.name + "' reads tensor '" + plan.tensors[l.input].name + "', which no earlier layer produces";
      return false;
    }
    Shape s = shapes[l.input];
    if (l.kind == LayerKind::kShuffle) {
      if (!transpose(l.first_transpose, s, l.name, why)) return false;
      if (l.has_reshape) {
        Shape r = l.reshape;
        int infer = -1;
        bool dynamic = std::any_of(s.begin(), s.end(), [](int64_t d) { return d < 0; });
        for (size_t i = 0; i < r.size(); ++i) {
          if (r[i] == 0 && l.zero_is_placeholder) {
            if (i >= s.size()) {
              why = "IShuffleLayer '" + l.name + "': reshape placeholder 0 at dimension " + std::to_string(i) +
                    " of a " + std::to_string(s.size()) + "-D tensor";
              return false;
            }
            r[i] = s[i];
          } else if (r[i] == -1) {
            if (infer >= 0) {
              why = "IShuffleLayer '" + l.name + "': more than one -1 in the reshape dimensions";
              return false;
            }
            infer = static_cast<int>(i);
          }
        }
        if (infer >= 0) {
          int64_t rest = 1;
          for (size_t i = 0; i < r.size(); ++i)
            if (static_cast<int>(i) != infer) rest *= r[i];
          if (dynamic || rest <= 0) {
            r[infer] = -1;
          } else {
            if (volume_known(s) % rest != 0) {
              why = "IShuffleLayer '" + l.name + "': cannot reshape " + shape_string(s) + " to " + shape_string(l.reshape);
              return false;
            }
            r[infer] = volume_known(s) / rest;
          }
        } else if (!dynamic && volume_known(r) != volume_known(s)) {
          why = "IShuffleLayer '" + l.name + "': cannot reshape " + shape_string(s) + " (volume " +
                std::to_string(volume_known(s)) + ") to " + shape_string(r);
          return false;
        }
        s = r;
      }
      if (!transpose(l.second_transpose, s, l.name, why)) return false;
    } else if (l.kind == LayerKind::kDistCollective) {
      if (s.empty()) {
        why = "IDistCollectiveLayer '" + l.name + "' needs an input with at least one dimension";
        return false;
      }
      // nbRanks sets all_gather's and reduce_scatter's output (TensorRT's documented use of
      // it); gather, scatter and all_to_all follow the group (nbRanks when ungrouped).
      const int64_t group = l.groups.empty() ? l.nb_ranks : static_cast<int64_t>(l.groups.size());
      auto split = [&](int64_t parts) {
        if (s[0] < 0) return true;
        if (s[0] % parts != 0) {
          why = "IDistCollectiveLayer '" + l.name + "' (" + op_name(l.op) + "): dimension 0 of " + shape_string(s) +
                " does not split into " + std::to_string(parts) + " equal parts";
          return false;
        }
        return true;
      };
      switch (l.op) {
        case nvinfer1::CollectiveOperation::kALL_GATHER:
          if (s[0] >= 0) s[0] *= l.nb_ranks;
          break;
        case nvinfer1::CollectiveOperation::kREDUCE_SCATTER:
          if (!split(l.nb_ranks)) return false;
          if (s[0] >= 0) s[0] /= l.nb_ranks;
          break;
        case nvinfer1::CollectiveOperation::kGATHER:
          if (s[0] >= 0) s[0] *= group;
          break;
        case nvinfer1::CollectiveOperation::kSCATTER:
          if (!split(group)) return false;
          if (s[0] >= 0) s[0] /= group;
          break;
        case nvinfer1::CollectiveOperation::kALL_TO_ALL:
          if (!split(group)) return false;
          break;
        default: break;
      }
    }
    shapes[l.output] = s;
    known[l.output] = true;
  }
  for (int o : plan.outputs) {
    if (!known[o]) {
      why = "output '" + plan.tensors[o].name + "' is produced by no layer";
      return false;
    }
  }
  return true;
}

}  // namespace trt_double
