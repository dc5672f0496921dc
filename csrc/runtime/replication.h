// A rank's inputs for one call: where the program reads each one (placed during the checks, with
// every buffer reserved) and the copies that put them there (staged at launch): host copies,
// peer copies, the pipelined host -> first GPU -> peers path, ncclBroadcast, and device arrays
// whose address the program cannot take (misaligned) copied into an aligned buffer.
#pragma once

#include <condition_variable>
#include <mutex>
#include <vector>

#include "runtime/call_plan.h"
#include "runtime/cuda_handles.h"

namespace mdtrt {

// Progress of the first rank's host-to-device copy of one replicated input, for the other ranks'
// threads: a rank may only wait on a chunk's CUDA event after the event was recorded, or the wait
// is a no-op and the peer copy reads stale memory (the bug class that made others give up peer
// copies of IO buffers).
class StagingProgress {
 public:
  void publish(int chunks);
  void fail();
  // Waits until chunk `c` was recorded; throws when the first rank failed or on the deadline.
  void wait_for_chunk(int c, const Deadline& deadline, int rank);

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  int chunks_recorded_ = 0;
  bool source_failed_ = false;
};

// What the ranks of one call share to replicate inputs through the first rank.
struct ReplicationSource {
  explicit ReplicationSource(size_t num_inputs) : progress(num_inputs) {}
  std::vector<StagingProgress> progress;  // per input
  std::vector<DeviceBuffer>* staging = nullptr;  // the first rank's staging buffers, per input
  std::vector<CudaEvent>* chunk_events = nullptr;  // on the first rank's GPU, per chunk
  // The first rank's launch failed, at any step before its staging finished (also before
  // stage_inputs): the ranks waiting for its chunks stop at once instead of at the deadline.
  void fail() {
    for (StagingProgress& p : progress) p.fail();
  }
};

// Check step: a view per input for the program, pointing at the caller's array where the program
// can read it in place (on this GPU, aligned), at the rank's staging buffer (reserved here) otherwise.
std::vector<TensorView> place_inputs(const RankContext& ctx, const std::vector<InputArg>& args,
                                     std::vector<DeviceBuffer>& staging, size_t alignment);

// Launch step: the copies into the staging buffers chosen by place_inputs, on ctx.stream, in the
// call's replication modes; then ncclBroadcast for inputs replicated that way. When the first rank's
// launch throws (here or before), its caller calls source.fail().
void stage_inputs(RankContext& ctx, const CallPlan& plan, const std::vector<InputArg>& args,
                  const std::vector<TensorView>& views, ReplicationSource& source, int first_rank_in_world);

}  // namespace mdtrt
