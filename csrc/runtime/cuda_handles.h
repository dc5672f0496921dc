// RAII owners of CUDA streams, events and memory. Each remembers its device, because rank
// threads and the caller's thread touch handles of several GPUs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "common/cuda_check.h"
#include "common/deadline.h"
#include "common/scoped_device.h"

namespace mdtrt {

// A CUDA handle of one device, destroyed with that device current. Move-only.
template <typename Handle, cudaError_t (*Destroy)(Handle)>
class DeviceHandle {
 public:
  DeviceHandle() = default;
  ~DeviceHandle() { reset(); }
  DeviceHandle(DeviceHandle&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)), device_(o.device_) {}
  DeviceHandle& operator=(DeviceHandle&& o) noexcept {
    if (this != &o) {
      reset();
      device_ = o.device_;
      handle_ = std::exchange(o.handle_, nullptr);
    }
    return *this;
  }
  Handle get() const { return handle_; }
  int device() const { return device_; }

 protected:
  explicit DeviceHandle(int device) : device_(device) {}
  Handle handle_ = nullptr;

 private:
  void reset() {
    if (handle_ != nullptr) {
      ScopedDevice on(device_, std::nothrow);  // destructors must not throw (a failed GPU, at exit)
      Destroy(handle_);
      handle_ = nullptr;
    }
  }
  int device_ = -1;
};

class CudaStream : public DeviceHandle<cudaStream_t, cudaStreamDestroy> {
 public:
  CudaStream() = default;
  // priority: CUDA's stream priority (lower numbers first; 0 is the default, see
  // cudaDeviceGetStreamPriorityRange).
  explicit CudaStream(int device, int priority = 0) : DeviceHandle(device) {
    ScopedDevice on(device);
    MDTRT_CUDA_CHECK(cudaStreamCreateWithPriority(&handle_, cudaStreamNonBlocking, priority));
  }
};

// An instantiated CUDA graph of one device.
class CudaGraphExec : public DeviceHandle<cudaGraphExec_t, cudaGraphExecDestroy> {
 public:
  CudaGraphExec() = default;
  CudaGraphExec(int device, cudaGraphExec_t exec) : DeviceHandle(device) { handle_ = exec; }
};

class CudaEvent : public DeviceHandle<cudaEvent_t, cudaEventDestroy> {
 public:
  CudaEvent() = default;
  CudaEvent(int device, bool timing) : DeviceHandle(device) {
    ScopedDevice on(device);
    MDTRT_CUDA_CHECK(cudaEventCreateWithFlags(&handle_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
};

// Device memory owned by one GPU. Grows on demand; contents are not kept across growth.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(int device, size_t bytes) : device_(device) { reserve(bytes); }
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : device_(o.device_), ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      device_ = o.device_;
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  void set_device(int device) {
    if (device != device_) {
      reset();
      device_ = device;
    }
  }
  void reserve(size_t bytes) {
    if (bytes <= bytes_) return;
    reset();
    ScopedDevice on(device_);
    // At least one byte, so that an empty tensor still has a valid, distinct address.
    MDTRT_CUDA_CHECK(cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes));
    bytes_ = bytes;
  }
  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }
  int device() const { return device_; }

 private:
  void reset() {
    if (ptr_ != nullptr) {
      ScopedDevice on(device_, std::nothrow);
      cudaFree(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
    }
  }
  int device_ = -1;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory, for staging host<->device copies at full link speed.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() { reset(); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void reserve(size_t bytes) {
    if (bytes <= bytes_) return;
    reset();
    MDTRT_CUDA_CHECK(cudaMallocHost(&ptr_, bytes == 0 ? 1 : bytes));
    bytes_ = bytes;
  }
  void* get() const { return ptr_; }
  size_t size() const { return bytes_; }

 private:
  void reset() {
    if (ptr_ != nullptr) {
      cudaFreeHost(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
    }
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Waits for `stream` without blocking past `deadline`. Returns false when the deadline passed
// first (the work may still be running), throws on a CUDA error.
bool wait_stream(cudaStream_t stream, const Deadline& deadline);

}  // namespace mdtrt
