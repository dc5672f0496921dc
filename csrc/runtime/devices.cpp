#include "runtime/devices.h"

#include <cuda_runtime_api.h>

#include <cstdlib>

#include "common/cuda_check.h"
#include "common/scoped_device.h"

namespace mdtrt {

CudaInfo query_cuda() {
  CudaInfo info;
  cudaDriverGetVersion(&info.driver_version);
  cudaRuntimeGetVersion(&info.runtime_version);
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    info.error = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
    cudaGetLastError();
    return info;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    GpuInfo gpu;
    gpu.index = i;
    gpu.name = prop.name;
    gpu.cc_major = prop.major;
    gpu.cc_minor = prop.minor;
    gpu.total_memory = prop.totalGlobalMem;
    gpu.pci_bus_id = pci_bus_id(i);
    info.gpus.push_back(gpu);
  }
  info.peer_access.assign(count, std::vector<bool>(count, false));
  for (int i = 0; i < count; ++i) {
    for (int j = 0; j < count; ++j) {
      int can = (i == j) ? 1 : 0;
      if (i != j && cudaDeviceCanAccessPeer(&can, i, j) != cudaSuccess) {
        cudaGetLastError();
        can = 0;
      }
      info.peer_access[i][j] = can != 0;
    }
  }
  std::vector<std::string> bus_ids(count);
  for (const auto& gpu : info.gpus) bus_ids[gpu.index] = gpu.pci_bus_id;
  info.peer_links = classify_peer_links(bus_ids, info.peer_access);
  return info;
}

int visible_gpu_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

namespace {
std::string cuda_version_text(int code) {
  return code ? std::to_string(code / 1000) + "." + std::to_string((code % 1000) / 10) : "none";
}
}  // namespace

std::string describe_cuda_problem(const std::string& error, int driver_version, int runtime_version) {
  if (error.rfind("cudaErrorInsufficientDriver", 0) == 0) {
    if (driver_version == 0)
      return "no NVIDIA driver was found (libcuda.so.1 is not there): install the NVIDIA driver, on a machine with "
             "an NVIDIA GPU";
    return "the NVIDIA driver (CUDA " + cuda_version_text(driver_version) + ") is older than the CUDA " +
           cuda_version_text(runtime_version) + " runtime mdtrt was built with: update the driver";
  }
  return error;
}

std::string describe_no_gpu(const std::string& error, int driver_version, int runtime_version) {
  const std::string problem = describe_cuda_problem(error, driver_version, runtime_version);
  if (!problem.empty()) return problem;
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  return std::string("cudaGetDeviceCount found no device") +
         (visible ? std::string(" with CUDA_VISIBLE_DEVICES='") + visible + "'" : "");
}

namespace {
// What CUDA knows of `ptr`; false (the error cleared) when it cannot say.
bool pointer_attributes(const void* ptr, cudaPointerAttributes& attr) {
  if (cudaPointerGetAttributes(&attr, ptr) == cudaSuccess) return true;
  cudaGetLastError();
  return false;
}
}  // namespace

int pointer_device(const void* ptr) {
  cudaPointerAttributes attr{};
  if (!pointer_attributes(ptr, attr)) return -1;
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ? attr.device : -1;
}

bool is_pageable_host_memory(const void* ptr) {
  cudaPointerAttributes attr{};
  return pointer_attributes(ptr, attr) && attr.type == cudaMemoryTypeUnregistered;
}

void copy_device_to_host(void* dst, const void* src, int device, size_t nbytes) {
  ScopedDevice on(device);
  MDTRT_CUDA_CHECK(cudaMemcpy(dst, src, nbytes, cudaMemcpyDeviceToHost));
}

}  // namespace mdtrt
