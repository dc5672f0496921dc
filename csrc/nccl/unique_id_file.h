// Exchanging the NCCL unique id through a shared file, compatible with NVIDIA's samples
// (TRT_NCCL_ID_FILE): rank 0 writes the id as 256 hex characters, the other ranks poll for it.
// Rank 0 refuses a file that already has content (stale from an earlier run), and writes through a
// temporary file and rename, so a reader never sees half an id.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/deadline.h"
#include "nccl/nccl_api.h"

namespace mdtrt {

std::string unique_id_to_hex(const nccl::UniqueId& id);
nccl::UniqueId unique_id_from_hex(const std::string& hex);  // throws InvalidArgument on malformed text

// Rank 0: creates a new id and publishes it; other ranks: wait for it until the deadline.
nccl::UniqueId exchange_unique_id_via_file(const std::string& path, int rank, const Deadline& deadline);

// Bytes rank 0 shares with the other ranks through a file beside the id file (an engine plan built
// once), tagged with the run's NCCL id: a file left by an earlier run (another id) is never read.
// publish writes through a unique temporary file and a rename; try_read returns nothing until the
// file holds this run's complete data. Callers poll try_read with their own deadline (Python polls
// between sleeps, so that Ctrl-C still works).
void publish_shared_bytes(const std::string& path, const nccl::UniqueId& run, const std::vector<uint8_t>& data);
std::optional<std::vector<uint8_t>> try_read_shared_bytes(const std::string& path, const nccl::UniqueId& run);

}  // namespace mdtrt
