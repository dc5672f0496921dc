// Device memory handed to the caller (outputs of a call), from one stream-ordered pool per GPU:
// a call allocates in stream order on its rank's stream (no cudaMalloc, no device-wide
// synchronization), and the caller's release returns the memory to the pool in stream order
// (no cudaFree, which synchronizes the device).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace mdtrt {

// Freed memory up to this many bytes per GPU stays in the pool for the next call instead of going
// back to the driver at the next synchronization (the pool's release threshold).
constexpr size_t kPoolReleaseThresholdBytes = size_t(1) << 30;

// The pool of `device`, created on first use and kept for the process: every GPU that can reach
// `device` peer-to-peer may read and write its allocations (as with cudaMalloc memory, so that an
// output can be the peer-copied input of a later call).
cudaMemPool_t device_memory_pool(int device);

// One allocation from device_memory_pool(device), owned by whoever holds this object.
class PooledBuffer {
 public:
  // Allocated in stream order on `stream` (a stream of `device`): usable by work queued there
  // after this call, or by anyone once that stream has passed this point.
  PooledBuffer(int device, size_t bytes, cudaStream_t stream);
  // Freed in stream order on `device`'s legacy default stream: after the work the caller queued
  // there (torch's default stream), which may still read this memory when the caller lets go.
  ~PooledBuffer();
  PooledBuffer(const PooledBuffer&) = delete;
  PooledBuffer& operator=(const PooledBuffer&) = delete;

  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }
  int device() const { return device_; }
  // Gives the memory up without freeing it: for a buffer whose allocating stream may never get
  // there (a call that failed with its stream stuck), where a free could race the allocation.
  void leak() { ptr_ = nullptr; }

 private:
  int device_;
  void* ptr_ = nullptr;
  size_t bytes_;
};

}  // namespace mdtrt
