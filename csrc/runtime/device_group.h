// The GPUs of one process taking part in multi-device inference: one rank thread per GPU
// (RankRuntime) and one world communicator per rank. In a single process the group holds every
// rank; under a launcher (one process per GPU) it holds this process's rank of a larger world.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "nccl/communicator.h"
#include "runtime/gpu_links.h"
#include "runtime/rank_runtime.h"

namespace mdtrt {

class DeviceGroup {
 public:
  // All ranks in this process: rank i runs on devices[i].
  static std::unique_ptr<DeviceGroup> create_local(const std::vector<int>& devices, double timeout_seconds);
  // This process's ranks `ranks` (on `devices`) of a world of `world_size`, joined through `id`.
  static std::unique_ptr<DeviceGroup> create_member(const std::vector<int>& devices, const std::vector<int>& ranks,
                                                    int world_size, const nccl::UniqueId& id,
                                                    double timeout_seconds);
  ~DeviceGroup();

  RankRuntime& runtime() { return *runtime_; }
  Communicator& world(int local_index) { return *world_.at(local_index); }
  // The same, shared: for holders that must keep it alive (a capsule handed to Python).
  std::shared_ptr<Communicator> world_shared(int local_index) { return world_.at(local_index); }
  Communicator& world_nonblocking(int local_index) { return *world_nonblocking_.at(local_index); }
  int num_local_ranks() const { return runtime_->num_local_ranks(); }
  int world_size() const { return runtime_->world_size(); }
  double timeout() const { return timeout_seconds_; }
  bool peer_access(int local_a, int local_b) const { return peer_[local_a][local_b]; }
  bool all_peer_access() const;
  // How each pair of local GPUs is connected (runtime/gpu_links.h), found once at construction.
  LinkKind peer_link(int local_a, int local_b) const { return links_.kinds.at(local_a).at(local_b); }
  // Why some pair is LinkKind::kUnknown (NVML unavailable, or its error); empty when none is.
  const std::string& peer_links_reason() const { return links_.unknown_reason; }
  bool all_nvlink() const { return all_nvlink_; }

  // Aborts every communicator now (from any thread); the group is unusable afterwards. TensorRT
  // contexts attached to them are then leaked, never destroyed (see EngineProgram).
  void abort();

  // Makes the group refuse every further step ("the DeviceGroup was closed"), waiting for one in
  // flight. Its threads and communicators are released when the last owner (a runner, a program
  // holding a communicator, a capsule) lets go of it.
  void close();

 private:
  // What abort() does to the communicators, without marking the group: the runtime's abort hook
  // (a deadline, Ctrl-C), which records its own reason.
  void abort_communicators();
  DeviceGroup(const std::vector<int>& devices, const std::vector<int>& ranks, int world_size, double timeout_seconds);
  void connect(const nccl::UniqueId& id);

  double timeout_seconds_;
  std::unique_ptr<RankRuntime> runtime_;
  // Created first (its set-up has a deadline); shared with the rank contexts.
  std::vector<std::shared_ptr<Communicator>> world_nonblocking_;
  std::vector<std::shared_ptr<Communicator>> world_;              // blocking twin for the data path
  std::vector<std::vector<bool>> peer_;
  PeerLinks links_;
  bool all_nvlink_ = false;
  int abort_hook_ = -1;
};

// Checks GPU ids against this machine: distinct, in range; throws InvalidArgument saying what to fix.
void validate_devices(const std::vector<int>& devices);

}  // namespace mdtrt
