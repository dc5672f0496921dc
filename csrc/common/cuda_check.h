// CUDA runtime error checking, in the style of NCCL's CUDACHECK: the failing call's text and
// the runtime's message go into an mdtrt::Error of kind kCuda.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "common/error.h"

namespace mdtrt {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call) {
  throw Error(ErrorKind::kCuda,
              std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")", -1, call);
}

}  // namespace mdtrt

#define MDTRT_CUDA_CHECK(call)                                    \
  do {                                                            \
    cudaError_t mdtrt_status_ = (call);                           \
    if (mdtrt_status_ != cudaSuccess) {                           \
      ::mdtrt::throw_cuda_error(mdtrt_status_, #call);            \
    }                                                             \
  } while (0)
