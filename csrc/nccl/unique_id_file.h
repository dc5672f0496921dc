// Exchanging the NCCL unique id through a shared file, compatible with NVIDIA's samples
// (TRT_NCCL_ID_FILE): rank 0 writes the id as 256 hex characters, the other ranks poll for it.
// Rank 0 refuses a file that already has content (stale from an earlier run), and writes through a
// temporary file and rename, so a reader never sees half an id.
#pragma once

#include <string>

#include "common/deadline.h"
#include "nccl/nccl_api.h"

namespace mdtrt {

std::string unique_id_to_hex(const nccl::UniqueId& id);
nccl::UniqueId unique_id_from_hex(const std::string& hex);  // throws InvalidArgument on malformed text

// Rank 0: creates a new id and publishes it; other ranks: wait for it until the deadline.
nccl::UniqueId exchange_unique_id_via_file(const std::string& path, int rank, const Deadline& deadline);

}  // namespace mdtrt
