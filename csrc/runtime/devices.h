// What the CUDA driver says about this machine's GPUs, for `mdtrt doctor` and argument checks.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "runtime/gpu_links.h"

namespace mdtrt {

struct GpuInfo {
  int index = 0;
  std::string name;
  int cc_major = 0;
  int cc_minor = 0;
  size_t total_memory = 0;
  std::string pci_bus_id;
};

struct CudaInfo {
  int driver_version = 0;   // 0 when no driver is installed
  int runtime_version = 0;  // the runtime mdtrt was linked with (static)
  std::string error;        // why no GPU could be listed, empty when fine
  std::vector<GpuInfo> gpus;
  std::vector<std::vector<bool>> peer_access;  // peer_access[i][j]: GPU i can access GPU j's memory
  PeerLinks peer_links;                        // how each pair is connected (NVLink, PCIe, ...)
};

CudaInfo query_cuda();

// Number of visible GPUs; 0 (not an error) when there is no driver or no device.
int visible_gpu_count();

// What stops CUDA, in words, from CudaInfo's error and versions (CUDA's 1000 * major + 10 * minor
// codes): no driver, a driver older than the runtime, or CUDA's own error; empty when nothing does.
// The runtime says cudaErrorInsufficientDriver also when there is no driver at all (the driver
// version then reads 0).
std::string describe_cuda_problem(const std::string& error, int driver_version, int runtime_version);
// Why no GPU is visible, in words: describe_cuda_problem, else that cudaGetDeviceCount found none
// (naming CUDA_VISIBLE_DEVICES as set).
std::string describe_no_gpu(const std::string& error, int driver_version, int runtime_version);

// The CUDA device that owns the allocation at `ptr` (device or managed memory), or -1 for host
// memory (pageable or pinned) and addresses CUDA does not know.
int pointer_device(const void* ptr);
// True when CUDA knows `ptr` as ordinary (pageable) host memory; false for pinned or device memory,
// and when CUDA cannot say.
bool is_pageable_host_memory(const void* ptr);

// Copies `nbytes` from device memory at `src` (on `device`) to host memory at `dst`, blocking.
// Throws mdtrt::Error (kind kCuda) when the device cannot be made current or the copy fails.
void copy_device_to_host(void* dst, const void* src, int device, size_t nbytes);

}  // namespace mdtrt
