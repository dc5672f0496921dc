#include "runtime/collective_program.h"

#include <algorithm>
#include <set>

#include "common/error.h"
#include "common/name_table.h"
#include "nccl/nccl_library.h"

namespace mdtrt {
namespace {

constexpr NamedValue<CollectiveOp> kOps[] = {
    {CollectiveOp::kAllReduce, "all_reduce"},         {CollectiveOp::kAllGather, "all_gather"},
    {CollectiveOp::kBroadcast, "broadcast"},          {CollectiveOp::kReduce, "reduce"},
    {CollectiveOp::kReduceScatter, "reduce_scatter"}, {CollectiveOp::kAllToAll, "all_to_all"},
    {CollectiveOp::kGather, "gather"},                {CollectiveOp::kScatter, "scatter"},
};
constexpr NamedValue<ReduceOp> kReduceOps[] = {
    {ReduceOp::kSum, "sum"}, {ReduceOp::kProd, "prod"}, {ReduceOp::kMax, "max"},
    {ReduceOp::kMin, "min"}, {ReduceOp::kAvg, "avg"},   {ReduceOp::kNone, "none"},
};

nccl::DataType nccl_type(DType t) {
  switch (t) {
    case DType::kFloat32: return nccl::kFloat32;
    case DType::kFloat16: return nccl::kFloat16;
    case DType::kBFloat16: return nccl::kBfloat16;
    case DType::kInt32: return nccl::kInt32;
    case DType::kInt8: return nccl::kInt8;
    case DType::kUInt8: return nccl::kUint8;
    case DType::kInt64: return nccl::kInt64;
    case DType::kFloat64: return nccl::kFloat64;
    case DType::kBool: break;
  }
  // The only type without an NCCL counterpart; its bytes are 0 or 1, so uint8 carries it.
  throw_invalid_argument(std::string("collectives do not support dtype ") + dtype_name(t) +
                         " (NCCL has no boolean type): pass the array as uint8 (numpy x.view(np.uint8), torch "
                         "x.view(torch.uint8)); reduce='max' is then a logical or, 'min' a logical and");
}

nccl::RedOp nccl_reduce(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return nccl::kSum;
    case ReduceOp::kProd: return nccl::kProd;
    case ReduceOp::kMax: return nccl::kMax;
    case ReduceOp::kMin: return nccl::kMin;
    case ReduceOp::kAvg: return nccl::kAvg;
    case ReduceOp::kNone: break;
  }
  throw_invalid_argument("a reducing collective needs a reduce op (sum, prod, max, min, avg), not 'none'");
}

}  // namespace

CollectiveOp collective_op_from_name(const std::string& name) { return value_from_name(kOps, name, "op"); }
ReduceOp reduce_op_from_name(const std::string& name) { return value_from_name(kReduceOps, name, "reduce"); }
const char* collective_op_name(CollectiveOp op) { return name_of(kOps, op, "collective"); }
const char* reduce_op_name(ReduceOp op) { return name_of(kReduceOps, op, "reduce op"); }
std::vector<std::string> collective_op_names() { return all_names(kOps); }
std::vector<std::string> reduce_op_names() { return all_names(kReduceOps); }

bool op_reduces(CollectiveOp op) {
  return op == CollectiveOp::kAllReduce || op == CollectiveOp::kReduce || op == CollectiveOp::kReduceScatter;
}
bool op_has_root(CollectiveOp op) {
  return op == CollectiveOp::kBroadcast || op == CollectiveOp::kReduce || op == CollectiveOp::kGather ||
         op == CollectiveOp::kScatter;
}

std::vector<int> CollectiveSpec::members(int world_size) const {
  if (!groups.empty()) return groups;
  std::vector<int> all(world_size);
  for (int i = 0; i < world_size; ++i) all[i] = i;
  return all;
}

void CollectiveSpec::validate(int world_size) const {
  std::set<int> seen;
  for (int r : groups) {
    if (r < 0 || r >= world_size)
      throw_invalid_argument("groups lists rank " + std::to_string(r) + ", outside the world of " +
                             std::to_string(world_size) + " ranks");
    if (!seen.insert(r).second) throw_invalid_argument("groups lists rank " + std::to_string(r) + " twice");
  }
  if (op_reduces(op) && reduce == ReduceOp::kNone)
    throw_invalid_argument(std::string(collective_op_name(op)) + " needs a reduce op (sum, prod, max, min, avg)");
  if (op_has_root(op)) {
    auto m = members(world_size);
    if (std::find(m.begin(), m.end(), root) == m.end()) {
      std::string g;
      for (int r : m) g += (g.empty() ? "" : ", ") + std::to_string(r);
      throw_invalid_argument("root " + std::to_string(root) + " of " + collective_op_name(op) +
                             " is not a member of the group [" + g + "]; root is a world rank of the group");
    }
  }
}

std::string CollectiveSpec::describe() const {
  std::string s = collective_op_name(op);
  if (op_reduces(op)) s += std::string(" reduce=") + reduce_op_name(reduce);
  if (op_has_root(op)) s += " root=" + std::to_string(root);
  if (!groups.empty()) {
    s += " groups=[";
    for (size_t i = 0; i < groups.size(); ++i) s += (i ? "," : "") + std::to_string(groups[i]);
    s += "]";
  }
  return s;
}

Shape collective_output_shape(const CollectiveSpec& spec, const Shape& input, int group_size) {
  if (input.empty()) throw_invalid_argument("collectives need a tensor with at least one dimension");
  Shape out = input;
  auto require_divisible = [&] {
    if (input[0] % group_size != 0)
      throw_invalid_argument(std::string(collective_op_name(spec.op)) + " splits the first dimension across " +
                             std::to_string(group_size) + " ranks, but the input shape is " + shape_string(input) +
                             ": make the first dimension a multiple of " + std::to_string(group_size));
  };
  switch (spec.op) {
    case CollectiveOp::kAllGather:
    case CollectiveOp::kGather: out[0] = input[0] * group_size; break;
    case CollectiveOp::kReduceScatter:
    case CollectiveOp::kScatter:
      require_divisible();
      out[0] = input[0] / group_size;
      break;
    case CollectiveOp::kAllToAll: require_divisible(); break;
    default: break;
  }
  return out;
}

void enqueue_collective(Communicator& comm, const CollectiveSpec& spec, int root, const void* in, void* out,
                        DType dtype, const Shape& shape, cudaStream_t stream, const Deadline& deadline) {
  const nccl::DataType type = nccl_type(dtype);
  const size_t count = static_cast<size_t>(element_count(shape));
  const int g = comm.size();
  const size_t esize = dtype_size(dtype);
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  nccl::Comm c = comm.handle();
  switch (spec.op) {
    case CollectiveOp::kAllReduce:
      MDTRT_NCCL_CHECK_ON(comm, deadline, AllReduce, in, out, count, type, nccl_reduce(spec.reduce), c, stream);
      return;
    case CollectiveOp::kAllGather:
      MDTRT_NCCL_CHECK_ON(comm, deadline, AllGather, in, out, count, type, c, stream);
      return;
    case CollectiveOp::kBroadcast:
      MDTRT_NCCL_CHECK_ON(comm, deadline, Broadcast, in, out, count, type, root, c, stream);
      return;
    case CollectiveOp::kReduce:
      MDTRT_NCCL_CHECK_ON(comm, deadline, Reduce, in, out, count, type, nccl_reduce(spec.reduce), root, c, stream);
      return;
    case CollectiveOp::kReduceScatter:
      MDTRT_NCCL_CHECK_ON(comm, deadline, ReduceScatter, in, out, count / g, type, nccl_reduce(spec.reduce), c, stream);
      return;
    default: break;
  }
  // all_to_all, gather and scatter as grouped point-to-point (works on every NCCL >= 2.19).
  const size_t chunk = spec.op == CollectiveOp::kGather ? count : count / g;
  const int me = comm.rank();
  MDTRT_NCCL_CHECK_ON(comm, deadline, GroupStart);
  try {
    if (spec.op == CollectiveOp::kAllToAll) {
      for (int peer = 0; peer < g; ++peer) {
        MDTRT_NCCL_CHECK_ON(comm, deadline, Send, src + peer * chunk * esize, chunk, type, peer, c, stream);
        MDTRT_NCCL_CHECK_ON(comm, deadline, Recv, dst + peer * chunk * esize, chunk, type, peer, c, stream);
      }
    } else if (spec.op == CollectiveOp::kGather) {
      MDTRT_NCCL_CHECK_ON(comm, deadline, Send, src, chunk, type, root, c, stream);
      if (me == root)
        for (int peer = 0; peer < g; ++peer)
          MDTRT_NCCL_CHECK_ON(comm, deadline, Recv, dst + peer * chunk * esize, chunk, type, peer, c, stream);
    } else {  // scatter
      if (me == root)
        for (int peer = 0; peer < g; ++peer)
          MDTRT_NCCL_CHECK_ON(comm, deadline, Send, src + peer * chunk * esize, chunk, type, peer, c, stream);
      MDTRT_NCCL_CHECK_ON(comm, deadline, Recv, dst, chunk, type, root, c, stream);
    }
  } catch (...) {
    MDTRT_NCCL_IGNORE(GroupEnd);
    throw;
  }
  MDTRT_NCCL_CHECK_ON(comm, deadline, GroupEnd);
}

CollectiveProgram::CollectiveProgram(CollectiveSpec spec, DType dtype, int world_size, int num_local_ranks)
    : spec_(std::move(spec)), dtype_(dtype), states_(num_local_ranks) {
  spec_.validate(world_size);
  nccl_type(dtype_);  // rejects unsupported dtypes now, not on the rank threads
  members_ = spec_.members(world_size);
  if (op_has_root(spec_.op))
    root_in_group_ = static_cast<int>(std::find(members_.begin(), members_.end(), spec_.root) - members_.begin());
}

std::string CollectiveProgram::describe() const { return spec_.describe() + " " + dtype_name(dtype_); }

CollectiveProgram::RankState& CollectiveProgram::state(const RankContext& ctx) { return states_.at(ctx.local_index); }

void CollectiveProgram::bind(RankContext& ctx) {
  if (ctx.world == nullptr) throw Error(ErrorKind::kGeneric, "collectives need a communicator", ctx.rank, "bind");
  auto it = std::find(members_.begin(), members_.end(), ctx.rank);
  RankState& st = state(ctx);
  st.group_rank = it == members_.end() ? -1 : static_cast<int>(it - members_.begin());
  bool whole_world = static_cast<int>(members_.size()) == ctx.world_size;
  for (size_t i = 0; whole_world && i < members_.size(); ++i) whole_world = members_[i] == static_cast<int>(i);
  if (whole_world) {
    st.comm = ctx.world.get();
    return;
  }
  // A split is collective over the whole world: non-members take part with no color. It goes
  // through the non-blocking world so that a missing rank ends at the deadline.
  Communicator* parent = ctx.world_nonblocking != nullptr ? ctx.world_nonblocking.get() : ctx.world.get();
  st.group = parent->split(st.group_rank >= 0 ? 0 : nccl::kSplitNoColor, std::max(st.group_rank, 0), ctx.deadline,
                           /*blocking=*/true);
  st.comm = st.group.get();
}

std::vector<TensorSpec> CollectiveProgram::input_specs(const RankContext&) const {
  return {TensorSpec{"input", dtype_, {-1}}};
}

std::vector<TensorSpec> CollectiveProgram::resolve_outputs(RankContext&, const std::vector<TensorView>& inputs) {
  if (inputs.size() != 1) throw_invalid_argument("a collective takes exactly one input tensor");
  if (inputs[0].dtype != dtype_)
    throw_invalid_argument(std::string("input dtype ") + dtype_name(inputs[0].dtype) + " does not match the " +
                           dtype_name(dtype_) + " this collective was set up for");
  return {TensorSpec{"output", dtype_,
                     collective_output_shape(spec_, inputs[0].shape, static_cast<int>(members_.size()))}};
}

void CollectiveProgram::enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
                                const std::vector<TensorView>& outputs) {
  RankState& st = state(ctx);
  if (st.group_rank < 0) return;  // not in the group: nothing to do, output stays as it was
  enqueue_collective(*st.comm, spec_, root_in_group_, inputs[0].data, outputs[0].data, dtype_, inputs[0].shape,
                     ctx.stream, ctx.deadline);
}

void CollectiveProgram::abort() {
  std::vector<Communicator*> groups;
  for (auto& st : states_) groups.push_back(st.group.get());
  abort_concurrently(groups);
}

}  // namespace mdtrt
