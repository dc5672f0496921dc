// mdtrt's native DistCollective: the eight operations of TensorRT's IDistCollectiveLayer, with
// the same semantics (along the first dimension; groups are an ordered list of world ranks whose
// order gives the group-local rank; `root` is a world rank, remapped to its group-local rank).
// It is the reference the TensorRT path is checked against, and a RankProgram like an engine.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "nccl/communicator.h"
#include "runtime/rank_program.h"

namespace mdtrt {

enum class CollectiveOp { kAllReduce, kAllGather, kBroadcast, kReduce, kReduceScatter, kAllToAll, kGather, kScatter };
enum class ReduceOp { kSum, kProd, kMax, kMin, kAvg, kNone };

CollectiveOp collective_op_from_name(const std::string& name);
ReduceOp reduce_op_from_name(const std::string& name);
const char* collective_op_name(CollectiveOp op);
const char* reduce_op_name(ReduceOp op);
// Every name, in the enum's order: what _core exports (collective_ops, reduce_ops) for Python.
std::vector<std::string> collective_op_names();
std::vector<std::string> reduce_op_names();
bool op_reduces(CollectiveOp op);
bool op_has_root(CollectiveOp op);

struct CollectiveSpec {
  CollectiveOp op = CollectiveOp::kAllReduce;
  ReduceOp reduce = ReduceOp::kSum;
  int root = 0;             // world rank; ignored by ops without a root
  std::vector<int> groups;  // ordered world ranks; empty = every rank in rank order

  // Checks the spec against a world size: names what is wrong (root outside the group, ...).
  void validate(int world_size) const;
  std::vector<int> members(int world_size) const;
  std::string describe() const;
};

// Output shape of `op` on a group of `group_size` ranks; throws InvalidArgument when the first
// dimension does not split evenly.
Shape collective_output_shape(const CollectiveSpec& spec, const Shape& input, int group_size);

class CollectiveProgram : public RankProgram {
 public:
  CollectiveProgram(CollectiveSpec spec, DType dtype, int world_size, int num_local_ranks);
  std::string describe() const override;
  void bind(RankContext& ctx) override;
  std::vector<TensorSpec> input_specs(const RankContext& ctx) const override;
  std::vector<TensorSpec> resolve_outputs(RankContext& ctx, const std::vector<TensorView>& inputs) override;
  void enqueue(RankContext& ctx, const std::vector<TensorView>& inputs,
               const std::vector<TensorView>& outputs) override;
  void abort() override;

 private:
  struct RankState {
    Communicator* comm = nullptr;            // the world or the group's communicator
    std::unique_ptr<Communicator> group;     // owned when a subgroup was split off
    int group_rank = -1;                     // -1: not a member
  };
  RankState& state(const RankContext& ctx);

  CollectiveSpec spec_;
  DType dtype_;
  std::vector<int> members_;
  int root_in_group_ = 0;
  std::vector<RankState> states_;  // by local index
};

// Enqueues one collective on `comm` (the group's communicator, group-local `root`). Used by the
// program above and by the benchmarks/sample directly.
void enqueue_collective(Communicator& comm, const CollectiveSpec& spec, int root_in_group, const void* input,
                        void* output, DType dtype, const Shape& input_shape, cudaStream_t stream,
                        const Deadline& deadline);

}  // namespace mdtrt
