// The part of NCCL's C ABI that mdtrt uses, declared by us so that mdtrt builds without NCCL
// installed: NCCL is opened at run time (nccl_library.h). Values and layouts follow NCCL's
// public, stable ABI (NCCL >= 2.19 < 3).
#pragma once

#include <cuda_runtime_api.h>

#include <climits>
#include <cstddef>

namespace mdtrt::nccl {

struct OpaqueComm;
using Comm = OpaqueComm*;  // ncclComm_t

constexpr int kUniqueIdBytes = 128;
struct UniqueId {
  char internal[kUniqueIdBytes];
};

enum Result : int {
  kSuccess = 0,
  kUnhandledCudaError = 1,
  kSystemError = 2,
  kInternalError = 3,
  kInvalidArgument = 4,
  kInvalidUsage = 5,
  kRemoteError = 6,
  kInProgress = 7,
};

enum DataType : int {
  kInt8 = 0,
  kUint8 = 1,
  kInt32 = 2,
  kUint32 = 3,
  kInt64 = 4,
  kUint64 = 5,
  kFloat16 = 6,
  kFloat32 = 7,
  kFloat64 = 8,
  kBfloat16 = 9,
};

enum RedOp : int { kSum = 0, kProd = 1, kMax = 2, kMin = 3, kAvg = 4 };

constexpr int kSplitNoColor = -1;
constexpr unsigned kConfigMagic = 0xcafebeef;
constexpr int kConfigUndefInt = INT_MIN;

// ncclConfig_t as of NCCL 2.18. NCCL copies min(size, its own size) bytes and fills the fields
// added after `version` with their defaults, so this older layout stays valid on newer NCCL.
struct Config {
  size_t size = sizeof(Config);
  unsigned int magic = kConfigMagic;
  unsigned int version = 21800;
  int blocking = kConfigUndefInt;
  int cgaClusterSize = kConfigUndefInt;
  int minCTAs = kConfigUndefInt;
  int maxCTAs = kConfigUndefInt;
  const char* netName = nullptr;
  int splitShare = kConfigUndefInt;
};

// One pointer per NCCL entry point that mdtrt calls. Filled by the loader, all or nothing.
struct Api {
  Result (*GetVersion)(int* version);
  Result (*GetUniqueId)(UniqueId* id);
  Result (*CommInitRankConfig)(Comm* comm, int nranks, UniqueId id, int rank, Config* config);
  Result (*CommSplit)(Comm comm, int color, int key, Comm* newcomm, Config* config);
  Result (*CommFinalize)(Comm comm);
  Result (*CommDestroy)(Comm comm);
  Result (*CommAbort)(Comm comm);
  Result (*CommGetAsyncError)(Comm comm, Result* async_error);
  Result (*CommCount)(const Comm comm, int* count);
  Result (*CommUserRank)(const Comm comm, int* rank);
  const char* (*GetErrorString)(Result result);
  const char* (*GetLastError)(Comm comm);
  Result (*GroupStart)();
  Result (*GroupEnd)();
  Result (*AllReduce)(const void* send, void* recv, size_t count, DataType type, RedOp op, Comm comm,
                      cudaStream_t stream);
  Result (*AllGather)(const void* send, void* recv, size_t send_count, DataType type, Comm comm,
                      cudaStream_t stream);
  Result (*Broadcast)(const void* send, void* recv, size_t count, DataType type, int root, Comm comm,
                      cudaStream_t stream);
  Result (*Reduce)(const void* send, void* recv, size_t count, DataType type, RedOp op, int root, Comm comm,
                   cudaStream_t stream);
  Result (*ReduceScatter)(const void* send, void* recv, size_t recv_count, DataType type, RedOp op, Comm comm,
                          cudaStream_t stream);
  Result (*Send)(const void* send, size_t count, DataType type, int peer, Comm comm, cudaStream_t stream);
  Result (*Recv)(void* recv, size_t count, DataType type, int peer, Comm comm, cudaStream_t stream);
};

}  // namespace mdtrt::nccl
