#include "runtime/memory_pool.h"

#include <cstdint>
#include <map>
#include <mutex>

#include "common/cuda_check.h"
#include "common/scoped_device.h"

namespace mdtrt {

cudaMemPool_t device_memory_pool(int device) {
  // Pools live as long as the process: outputs the caller still holds at exit return to them.
  static std::mutex mutex;
  static std::map<int, cudaMemPool_t>* pools = new std::map<int, cudaMemPool_t>();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = pools->find(device);
  if (it != pools->end()) return it->second;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.handleTypes = cudaMemHandleTypeNone;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  MDTRT_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
  uint64_t threshold = kPoolReleaseThresholdBytes;
  MDTRT_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  // Memory freed on the legacy stream is reused by a rank's stream once the free has run, never
  // by making the rank's stream wait for the caller's unrelated work queued before the free.
  int no = 0;
  MDTRT_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &no));
  // Unlike cudaMalloc memory, pool memory does not follow cudaDeviceEnablePeerAccess: grant the
  // peers access here, so that peer copies from and to outputs work as they do for other memory.
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    count = 0;
  }
  for (int peer = 0; peer < count; ++peer) {
    int can = 0;
    if (peer == device || cudaDeviceCanAccessPeer(&can, peer, device) != cudaSuccess || !can) {
      cudaGetLastError();
      continue;
    }
    cudaMemAccessDesc access{};
    access.location.type = cudaMemLocationTypeDevice;
    access.location.id = peer;
    access.flags = cudaMemAccessFlagsProtReadWrite;
    if (cudaMemPoolSetAccess(pool, &access, 1) != cudaSuccess) cudaGetLastError();  // peer copies stage instead
  }
  (*pools)[device] = pool;
  return pool;
}

PooledBuffer::PooledBuffer(int device, size_t bytes, cudaStream_t stream) : device_(device), bytes_(bytes) {
  cudaMemPool_t pool = device_memory_pool(device);
  // At least one byte, so that an empty tensor still has a valid, distinct address.
  MDTRT_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr_, bytes == 0 ? 1 : bytes, pool, stream));
}

PooledBuffer::~PooledBuffer() {
  if (ptr_ == nullptr) return;
  // cudaStreamLegacy is the current device's legacy default stream (torch's default stream). A
  // failure here (the process is exiting, the context is gone) leaves nothing to clean up, and a
  // destructor must not throw.
  ScopedDevice on(device_, std::nothrow);
  if (on.ok() && cudaFreeAsync(ptr_, cudaStreamLegacy) == cudaSuccess) return;
  cudaGetLastError();
}

}  // namespace mdtrt
