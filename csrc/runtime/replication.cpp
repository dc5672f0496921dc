#include "runtime/replication.h"

#include <algorithm>

#include "common/error.h"
#include "nccl/communicator.h"
#include "nccl/nccl_library.h"

namespace mdtrt {

void StagingProgress::publish(int chunks) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    chunks_recorded_ = chunks;
  }
  changed_.notify_all();
}

void StagingProgress::fail() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    source_failed_ = true;
  }
  changed_.notify_all();
}

void StagingProgress::wait_for_chunk(int c, const Deadline& deadline, int rank) {
  std::unique_lock<std::mutex> lock(mutex_);
  bool ok = changed_.wait_until(lock, deadline.at(), [&] { return source_failed_ || chunks_recorded_ > c; });
  if (source_failed_)
    throw Error(ErrorKind::kGeneric, "the first rank failed while staging a replicated input", rank, "infer");
  if (!ok)
    throw Error(ErrorKind::kTimeout, "waited past the deadline for the first rank to stage a replicated input", rank,
                "infer");
}

std::vector<TensorView> place_inputs(const RankContext& ctx, const std::vector<InputArg>& args,
                                     std::vector<DeviceBuffer>& staging, size_t alignment) {
  if (staging.size() < args.size()) staging.resize(args.size());
  std::vector<TensorView> views(args.size());
  for (size_t k = 0; k < args.size(); ++k) {
    const InputArg& a = args[k];
    views[k].dtype = a.dtype;
    views[k].shape = a.shape;
    if (a.device == ctx.device && is_aligned(a.data, alignment)) {
      views[k].data = const_cast<void*>(a.data);  // zero copy: already on this GPU, where the program can take it
      continue;
    }
    DeviceBuffer& buf = staging[k];
    buf.set_device(ctx.device);
    buf.reserve(a.nbytes());  // cudaMalloc'd: aligned to 256 bytes
    views[k].data = buf.get();
  }
  return views;
}

void stage_inputs(RankContext& ctx, const CallPlan& plan, const std::vector<InputArg>& args,
                  const std::vector<TensorView>& views, ReplicationSource& source, int first_rank_in_world) {
  const int i = ctx.local_index;
  cudaStream_t stream = ctx.stream;
  for (size_t k = 0; k < args.size(); ++k) {
    const InputArg& a = args[k];
    const size_t bytes = a.nbytes();
    void* dst = views[k].data;
    if (dst == a.data) continue;  // read in place
    if (a.device == ctx.device) {  // on this GPU but misaligned for the program
      MDTRT_CUDA_CHECK(cudaMemcpyAsync(dst, a.data, bytes, cudaMemcpyDeviceToDevice, stream));
      continue;
    }
    if (a.device >= 0) {
      MDTRT_CUDA_CHECK(cudaMemcpyPeerAsync(dst, ctx.device, a.data, a.device, bytes, stream));
      continue;
    }
    const Replication mode = plan.modes[k];
    if (mode == Replication::kHost) {
      MDTRT_CUDA_CHECK(cudaMemcpyAsync(dst, a.data, bytes, cudaMemcpyHostToDevice, stream));
      continue;
    }
    if (mode == Replication::kBroadcast && i != 0) continue;  // filled by ncclBroadcast below
    const int chunks =
        static_cast<int>(std::max<size_t>(1, (bytes + kPeerReplicationChunkBytes - 1) / kPeerReplicationChunkBytes));
    if (i == 0) {
      for (int c = 0; c < chunks; ++c) {
        const size_t off = static_cast<size_t>(c) * kPeerReplicationChunkBytes;
        const size_t len = std::min(kPeerReplicationChunkBytes, bytes - off);
        MDTRT_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + off, static_cast<const char*>(a.data) + off, len,
                                         cudaMemcpyHostToDevice, stream));
        MDTRT_CUDA_CHECK(cudaEventRecord((*source.chunk_events)[c].get(), stream));
        source.progress[k].publish(c + 1);
      }
    } else {  // peer copy chunk by chunk from the first rank, as soon as each chunk is staged
      const DeviceBuffer& from = (*source.staging)[k];
      for (int c = 0; c < chunks; ++c) {
        source.progress[k].wait_for_chunk(c, ctx.deadline, ctx.rank);
        const size_t off = static_cast<size_t>(c) * kPeerReplicationChunkBytes;
        const size_t len = std::min(kPeerReplicationChunkBytes, bytes - off);
        MDTRT_CUDA_CHECK(cudaStreamWaitEvent(stream, (*source.chunk_events)[c].get(), 0));
        MDTRT_CUDA_CHECK(cudaMemcpyPeerAsync(static_cast<char*>(dst) + off, ctx.device,
                                             static_cast<const char*>(from.get()) + off, from.device(), len,
                                             stream));
      }
    }
  }
  for (size_t k = 0; k < args.size(); ++k) {
    if (plan.modes[k] != Replication::kBroadcast) continue;
    MDTRT_NCCL_CHECK_ON(*ctx.world, ctx.deadline, Broadcast, views[k].data, views[k].data, args[k].nbytes(),
                        nccl::kUint8, first_rank_in_world, ctx.world->handle(), stream);
  }
}

}  // namespace mdtrt
