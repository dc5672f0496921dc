// Device scoping for code that touches several GPUs from one thread: every layer (the NCCL
// communicators, the rank runtime, TensorRT objects) switches devices, so this lives in common.
#pragma once

#include <cuda_runtime_api.h>

#include <new>

#include "common/cuda_check.h"

namespace mdtrt {

// Makes `device` current for the scope and restores the previous device after.
//
// ScopedDevice(device) throws an mdtrt::Error (kind kCuda) when `device` cannot be made current.
// ScopedDevice(device, std::nothrow) is for clean-up paths (destructors), which must not throw:
// a failure is ignored (ok() says whether `device` became current) and the previous device is
// restored all the same. A negative `device` leaves the current device as it is.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    cudaGetDevice(&previous_);
    if (device >= 0 && device != previous_) MDTRT_CUDA_CHECK(cudaSetDevice(device));
  }
  ScopedDevice(int device, std::nothrow_t) : previous_(-1) {
    cudaGetDevice(&previous_);
    if (device >= 0) ok_ = cudaSetDevice(device) == cudaSuccess;
  }
  ~ScopedDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

  // Whether the device asked for is current (always true for the throwing constructor).
  bool ok() const { return ok_; }

 private:
  int previous_ = 0;
  bool ok_ = true;
};

}  // namespace mdtrt
