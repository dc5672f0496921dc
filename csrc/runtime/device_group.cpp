#include "runtime/device_group.h"

#include <set>

#include "common/error.h"
#include "nccl/nccl_library.h"
#include "runtime/devices.h"

namespace mdtrt {

void validate_devices(const std::vector<int>& devices) {
  if (devices.empty()) throw_invalid_argument("a device group needs at least one GPU; got an empty list");
  // What is wrong with the list itself first: it is wrong on any machine.
  std::set<int> seen;
  for (int d : devices) {
    if (d < 0)
      throw_invalid_argument("GPU " + std::to_string(d) + " is not a GPU id: ids count from 0 (CUDA_VISIBLE_DEVICES "
                             "renumbers them)");
    if (!seen.insert(d).second) {
      throw_invalid_argument("GPU " + std::to_string(d) +
                             " is listed twice; each rank needs its own GPU (NCCL cannot run two ranks of one "
                             "communicator on one GPU)");
    }
  }
  const int count = visible_gpu_count();
  if (count == 0) {
    // The machine's state, not a wrong argument: a CUDA error, with the driver's answer in words.
    const CudaInfo info = query_cuda();
    throw Error(ErrorKind::kCuda, "no CUDA GPU is visible on this machine: " +
                                      describe_no_gpu(info.error, info.driver_version, info.runtime_version) +
                                      " (run `python -m mdtrt doctor` for the whole report)");
  }
  for (int d : devices) {
    if (d >= count) {
      throw_invalid_argument("GPU " + std::to_string(d) + " does not exist: this machine has " +
                             std::to_string(count) + " visible GPU(s), ids 0.." + std::to_string(count - 1) +
                             " (CUDA_VISIBLE_DEVICES renumbers them)");
    }
  }
}

DeviceGroup::DeviceGroup(const std::vector<int>& devices, const std::vector<int>& ranks, int world_size,
                         double timeout_seconds)
    : timeout_seconds_(timeout_seconds) {
  if (!(timeout_seconds > 0)) throw_invalid_argument("timeout must be a positive number of seconds");
  validate_devices(devices);
  nccl::load_library();  // fails early, with the list of attempts, when NCCL is missing
  runtime_ = std::make_unique<RankRuntime>(devices, ranks, world_size);
  const size_t n = devices.size();
  peer_.assign(n, std::vector<bool>(n, false));
  for (size_t a = 0; a < n; ++a) {
    for (size_t b = 0; b < n; ++b) {
      int can = a == b ? 1 : 0;
      if (a != b) MDTRT_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, devices[a], devices[b]));
      peer_[a][b] = can != 0;
    }
  }
  // Whether replication="auto" may send large pageable inputs through peer copies (call_plan.cpp).
  links_ = peer_links_of_devices(devices, peer_);
  all_nvlink_ = mdtrt::all_nvlink(links_.kinds);
  // Peer access lets rank threads copy replicated inputs over NVLink; enabled once per pair.
  // By value: a rank given up on at the deadline runs on after this constructor threw.
  runtime_->run_on_all(
      [devices, peer = peer_](RankContext& ctx) {
        for (size_t b = 0; b < devices.size(); ++b) {
          if (static_cast<int>(b) == ctx.local_index || !peer[ctx.local_index][b]) continue;
          cudaError_t st = cudaDeviceEnablePeerAccess(devices[b], 0);
          if (st == cudaErrorPeerAccessAlreadyEnabled) {
            cudaGetLastError();
          } else if (st != cudaSuccess) {
            throw_cuda_error(st, "cudaDeviceEnablePeerAccess");
          }
        }
      },
      timeout_seconds_, "enable peer access");
  abort_hook_ = runtime_->add_abort_hook([this] { abort_communicators(); });
}

bool DeviceGroup::all_peer_access() const {
  for (const auto& row : peer_)
    for (bool p : row)
      if (!p) return false;
  return true;
}

void DeviceGroup::connect(const nccl::UniqueId& id) {
  const Deadline deadline = Deadline::after_seconds(timeout_seconds_);
  for (auto& c : Communicator::create(id, runtime_->world_size(), runtime_->ranks(), runtime_->devices(), deadline))
    world_nonblocking_.push_back(std::move(c));
  // Every rank is known to be there now: split the blocking twin, all ranks at once (a split is
  // collective), keeping rank order. The tasks own what they use and write (a rank given up on at
  // the deadline runs on after this group is gone).
  auto split = std::make_shared<std::vector<std::shared_ptr<Communicator>>>(world_nonblocking_.size());
  runtime_->run_on_all(
      [split, parents = world_nonblocking_, deadline](RankContext& ctx) {
        (*split)[ctx.local_index] = parents[ctx.local_index]->split(0, ctx.rank, deadline, true);
      },
      timeout_seconds_, "create blocking world communicator");
  world_ = std::move(*split);
  for (int i = 0; i < runtime_->num_local_ranks(); ++i) {
    runtime_->context(i).world = world_[i];
    runtime_->context(i).world_nonblocking = world_nonblocking_[i];
  }
}

std::unique_ptr<DeviceGroup> DeviceGroup::create_local(const std::vector<int>& devices, double timeout_seconds) {
  std::vector<int> ranks(devices.size());
  for (size_t i = 0; i < ranks.size(); ++i) ranks[i] = static_cast<int>(i);
  std::unique_ptr<DeviceGroup> group(
      new DeviceGroup(devices, ranks, static_cast<int>(devices.size()), timeout_seconds));
  group->connect(nccl_unique_id());
  return group;
}

std::unique_ptr<DeviceGroup> DeviceGroup::create_member(const std::vector<int>& devices, const std::vector<int>& ranks,
                                                        int world_size, const nccl::UniqueId& id,
                                                        double timeout_seconds) {
  if (world_size < 1) throw_invalid_argument("world size must be >= 1, got " + std::to_string(world_size));
  std::set<int> seen;
  for (int r : ranks) {
    if (r < 0 || r >= world_size)
      throw_invalid_argument("rank " + std::to_string(r) + " is outside the world of " + std::to_string(world_size) +
                             " ranks (0.." + std::to_string(world_size - 1) + ")");
    if (!seen.insert(r).second) throw_invalid_argument("rank " + std::to_string(r) + " is listed twice");
  }
  std::unique_ptr<DeviceGroup> group(new DeviceGroup(devices, ranks, world_size, timeout_seconds));
  group->connect(id);
  return group;
}

void DeviceGroup::abort() {
  // Before the communicators go: stream-ordered work they end early must not pass for finished.
  // (The runtime's own deadline path aborts through abort_communicators and says why itself.)
  runtime_->mark_broken("the DeviceGroup was aborted (DeviceGroup.abort()); outputs of stream-ordered calls "
                        "still queued then are not valid");
  // Every abort hook: this group's (abort_communicators) and the programs' own communicators
  // (collectives on split groups).
  runtime_->abort_all();
}

void DeviceGroup::abort_communicators() {
  std::vector<Communicator*> all;
  for (auto& c : world_) all.push_back(c.get());
  for (auto& c : world_nonblocking_) all.push_back(c.get());
  abort_concurrently(all);
}

void DeviceGroup::close() { runtime_->mark_unusable("the DeviceGroup was closed"); }

DeviceGroup::~DeviceGroup() {
  // Work that stream-ordered calls left queued finishes first, or is aborted at its deadline: with
  // this group's abort hook still in place, so that the world communicators are aborted too (their
  // destruction below would otherwise wait for a collective that never completes).
  if (runtime_) runtime_->finish_in_flight();
  if (runtime_ && abort_hook_ >= 0) runtime_->remove_abort_hook(abort_hook_);
  // Communicators go before the rank threads, unless a TensorRT context attached to one still
  // holds it (it then goes after that context); if the runtime broke, they were aborted already.
  // The contexts share them: theirs go first, so that they are destroyed here as ever, except the
  // ones a rank given up on still holds (see RankRuntime::run_on_all).
  for (int i = 0; runtime_ && i < runtime_->num_local_ranks(); ++i)
    if (!runtime_->abandoned(i)) runtime_->context(i).world_nonblocking.reset();
  world_.clear();
  world_nonblocking_.clear();
}

}  // namespace mdtrt
