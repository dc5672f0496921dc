// Exchanging the NCCL unique id through a shared file, compatible with NVIDIA's samples
// (TRT_NCCL_ID_FILE): rank 0 writes the id as 256 hex characters on the first line, the other
// ranks poll for it. The file is written through a temporary file and rename, so a reader never
// sees half an id.
//
// A file left by an earlier run must never be taken for this run's: rank 0 adds a second line
// naming its run (the launcher's run id when there is one, its host, pid and process start time).
// The other ranks accept an id only when that record says it is this run's: no other launcher run
// id, and, on this host, a rank 0 that is still alive (the rank 0 of an earlier run has exited;
// this run's waits in NCCL set-up). Rank 0 replaces a stale file, refuses one that a live
// process of another run published, and removes its own file once every rank has joined or when
// it fails. A file without the record (an older mdtrt, NVIDIA's sample) is never trusted: rank 0
// replaces it, the other ranks wait for that.
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

// Refuses (InvalidArgument, attributed to `rank`) an id file path rank 0 cannot write: a directory,
// or a file in a folder that does not exist. Every rank fails at once, where the other ranks would
// otherwise wait the whole deadline for an id that never comes. exchange_unique_id_via_file checks
// it; callers check it before CUDA is touched, with the launcher's other variables.
void check_unique_id_file_path(const std::string& path, int rank = -1);

// Rank 0: creates a new id and publishes it; other ranks: wait for this run's id until the deadline.
// `run_token` names this run when the launcher gives it an id (empty: judged by rank 0's process).
// The wait answers interrupt_requested() (common/interrupt.h).
nccl::UniqueId exchange_unique_id_via_file(const std::string& path, int rank, const Deadline& deadline,
                                           const std::string& run_token = {});

// Rank 0: removes the file when it still holds `id` (another run's file is left alone).
void remove_unique_id_file(const std::string& path, const nccl::UniqueId& id);

// Bytes rank 0 shares with the other ranks through a file beside the id file (an engine plan built
// once), tagged with the run's NCCL id: a file left by an earlier run (another id) is never read.
// publish writes through a unique temporary file and a rename; try_read returns nothing until the
// file holds this run's complete data. Callers poll try_read with their own deadline (Python polls
// between sleeps, so that Ctrl-C still works).
void publish_shared_bytes(const std::string& path, const nccl::UniqueId& run, const std::vector<uint8_t>& data);
std::optional<std::vector<uint8_t>> try_read_shared_bytes(const std::string& path, const nccl::UniqueId& run);

}  // namespace mdtrt
