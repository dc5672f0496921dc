#include "runtime/call_plan.h"

#include <algorithm>
#include <functional>

#include "common/error.h"
#include "common/name_table.h"
#include "runtime/devices.h"

namespace mdtrt {
namespace {
constexpr NamedValue<Replication> kReplications[] = {
    {Replication::kAuto, "auto"}, {Replication::kHost, "host"}, {Replication::kPeer, "peer"},
    {Replication::kBroadcast, "broadcast"},
};
}  // namespace

Replication replication_from_name(const std::string& name) {
  return value_from_name(kReplications, name, "replication");
}
const char* replication_name(Replication r) { return name_of(kReplications, r, "replication"); }
std::vector<std::string> replication_names() { return all_names(kReplications); }

Replication choose_replication(Replication requested, size_t bytes, bool all_nvlink,
                               const std::function<bool()>& is_pageable) {
  if (requested != Replication::kAuto) return requested;
  // On 2x H200 (NVLink, a PCIe link per GPU; BENCHMARKS.md section 3, four full runs) every GPU
  // copying pinned host memory itself was the fastest at every size from 1 KiB to 1 GiB: the host
  // links work in parallel and the peer path adds a hop. From pageable memory, which the driver
  // stages through its own pinned buffers with the CPU, peer copies from the first GPU were as fast
  // at 16 MiB (peer/host time 0.94-1.05) and faster from 64 MiB (0.91-1.03, 2-3% on average): one
  // pageable copy instead of one per GPU, the rest over NVLink. Below 16 MiB the extra hop costs
  // (1.05-1.30 at 1 KiB-4 MiB). A fifth run (2026-12-01 09:17, a host whose pageable copies ran at
  // 6-8 GB/s) had host faster at 256 MiB and 1 GiB (peer/host 1.20 and 1.13, 0.95 at 64 MiB): the
  // choice is machine-dependent, kept on the average; replication="host" pins the other one.
  // Only where every pair of GPUs is joined by NVLink: over PCIe peer access the first GPU's one
  // PCIe link would carry the N-1 peer copies one after another, while each GPU reading the host
  // over its own link runs in parallel; that was never measured to win, so links that are PCIe or
  // unknown (NVML unavailable) take the host path, the rule measured best for pinned memory.
  // Pageability asked last: a CUDA call, only where it can change the choice.
  if (all_nvlink && bytes >= kAutoPeerFromPageableBytes && is_pageable()) return Replication::kPeer;
  return Replication::kHost;
}

CallPlan plan_call(const std::vector<std::vector<InputArg>>& inputs, const InferOptions& options,
                   const std::vector<std::vector<TensorSpec>>& input_specs, const std::vector<int>& ranks,
                   bool all_peer_access, bool all_nvlink, bool whole_world_here) {
  const int n = static_cast<int>(ranks.size());
  if (static_cast<int>(inputs.size()) != n)
    throw_invalid_argument("inputs for " + std::to_string(inputs.size()) + " ranks given, this group has " +
                           std::to_string(n) + " local ranks");
  if (static_cast<int>(options.outputs.size()) > n)
    throw_invalid_argument("output buffers for " + std::to_string(options.outputs.size()) +
                           " ranks given, this group has " + std::to_string(n) + " local ranks");
  CallPlan plan;
  plan.num_ranks = n;
  plan.num_inputs = inputs[0].size();
  for (int i = 0; i < n; ++i) {
    const auto& specs = input_specs[i];
    if (inputs[i].size() != specs.size()) {
      std::string names;
      for (auto& s : specs) names += (names.empty() ? "" : ", ") + s.name;
      throw_invalid_argument("rank " + std::to_string(ranks[i]) + " got " + std::to_string(inputs[i].size()) +
                             " inputs; the program takes " + std::to_string(specs.size()) + " (" + names + ")");
    }
    for (size_t k = 0; k < specs.size(); ++k) {
      const InputArg& a = inputs[i][k];
      if (a.dtype != specs[k].dtype)
        throw_invalid_argument("input '" + specs[k].name + "' of rank " + std::to_string(ranks[i]) + " is " +
                               dtype_name(a.dtype) + "; the program takes " + dtype_name(specs[k].dtype) +
                               ": convert it to " + dtype_name(specs[k].dtype) + " first");
      for (int64_t d : a.shape)
        if (d < 0)
          throw_invalid_argument("input '" + specs[k].name + "' of rank " + std::to_string(ranks[i]) +
                                 " has a negative dimension: " + shape_string(a.shape));
      if (a.data == nullptr && a.nbytes() > 0)
        throw_invalid_argument("input '" + specs[k].name + "' of rank " + std::to_string(ranks[i]) +
                               " has no data (a null pointer) for " + std::to_string(a.nbytes()) + " bytes");
    }
  }
  if (options.stream_ordered) {
    // Nothing may be read or written after the call returns except in the order of a stream the
    // caller gave: host memory and arrays without a stream have none.
    // One check for inputs and outputs; the message is only built when it fails (every
    // stream-ordered call runs this).
    auto require_stream = [&](int device, uintptr_t stream, const char* needs, const char* kind,
                              const std::string& name, int i) {
      if (device >= 0 && stream != 0) return;
      throw_invalid_argument(std::string("a stream-ordered call needs ") + needs +
                             " with a stream (torch CUDA tensors, or __cuda_array_interface__ arrays that name "
                             "theirs); " + kind + " '" + name + "' of rank " + std::to_string(ranks[i]) + " is " +
                             (device < 0 ? "in host memory" : "on a device without a stream") +
                             ". Pass stream_ordered=False to wait for the call instead");
    };
    for (int i = 0; i < n; ++i) {
      for (size_t k = 0; k < inputs[i].size(); ++k)
        require_stream(inputs[i][k].device, inputs[i][k].stream, "device inputs", "input", input_specs[i][k].name, i);
      if (i < static_cast<int>(options.outputs.size()))
        for (const OutputArg& g : options.outputs[i])
          require_stream(g.device, g.stream, "output buffers on a device", "output", g.name, i);
    }
    if (!options.fetch_ranks.empty())
      throw_invalid_argument("a stream-ordered call cannot copy outputs to host memory; pass stream_ordered=False");
  }
  plan.fetch.assign(n, false);
  for (int f : options.fetch_ranks) {
    if (f < 0 || f >= n) throw_invalid_argument("fetch rank " + std::to_string(f) + " is not a local rank");
    plan.fetch[f] = true;
  }

  // Which inputs are one host tensor for every rank, and how each travels.
  plan.modes.assign(plan.num_inputs, Replication::kHost);
  for (size_t k = 0; k < plan.num_inputs; ++k) {
    bool replicated = n > 1 && inputs[0][k].device < 0;
    for (int i = 1; i < n && replicated; ++i)
      replicated = inputs[i][k].data == inputs[0][k].data && inputs[i][k].device < 0 &&
                   inputs[i][k].shape == inputs[0][k].shape;
    if (!replicated) continue;
    const size_t bytes = inputs[0][k].nbytes();
    plan.modes[k] = plan.replication =
        choose_replication(options.replication, bytes, all_nvlink,
                           [&] { return is_pageable_host_memory(inputs[0][k].data); });
    plan.replicated_inputs += 1;
    if (plan.modes[k] == Replication::kPeer && !all_peer_access)
      throw_invalid_argument("replication='peer' needs peer access between every pair of GPUs in the group, "
                             "which this machine does not give (see `python -m mdtrt doctor`); use 'host' or 'auto'");
    if (plan.modes[k] == Replication::kBroadcast && !whole_world_here)
      throw_invalid_argument("replication='broadcast' needs every rank in this process; use 'host'");
    if (plan.modes[k] == Replication::kPeer || plan.modes[k] == Replication::kBroadcast) {
      const int chunks = static_cast<int>(
          std::max<size_t>(1, (bytes + kPeerReplicationChunkBytes - 1) / kPeerReplicationChunkBytes));
      plan.max_chunks = std::max(plan.max_chunks, chunks);
    }
  }
  return plan;
}

}  // namespace mdtrt
