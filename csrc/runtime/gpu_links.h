// How each pair of local GPUs is connected: NVLink, PCIe (peer access without NVLink), or no peer
// access at all. CUDA says whether two GPUs have peer access (cudaDeviceCanAccessPeer), not over
// which link; NVML (libnvidia-ml.so.1, which every NVIDIA driver installs) says whether it is
// NVLink. NVML is opened at run time (no NVIDIA header or link-time dependency), once per process;
// a machine without it, or an NVML that answers with an error, leaves those links "unknown" and
// never fails a group: replication="auto" then treats them as PCIe (see choose_replication).
#pragma once

#include <string>
#include <vector>

namespace mdtrt {

enum class LinkKind {
  kSelf,     // the diagonal: a GPU and itself
  kNvlink,   // peer access, and NVML reports the pair's NVLink P2P capability as OK
  kPcie,     // peer access without NVLink (over PCIe, or whatever other path the driver takes)
  kNone,     // no peer access (cudaDeviceCanAccessPeer says no)
  kUnknown,  // peer access, but NVML could not say over what (unavailable, or an error for this pair)
};
const char* link_kind_name(LinkKind kind);  // "self", "nvlink", "pcie", "none", "unknown"
std::vector<std::vector<std::string>> link_kind_names(const std::vector<std::vector<LinkKind>>& kinds);

// NVML's state in this process: opened and initialized (nvmlInit_v2) on the first call, from any
// thread, once; shut down (nvmlShutdown) at exit. Never throws.
struct NvmlStatus {
  bool available = false;
  std::string path;      // the library opened, when available
  std::string found_by;  // the search rule that found it ("libnvidia-ml.so.1", "MDTRT_NVML_LIBRARY")
  std::string error;     // why NVML is unavailable: not found (each place tried), a missing symbol, nvmlInit_v2's error string
};
const NvmlStatus& nvml_status();

struct PeerLinks {
  std::vector<std::vector<LinkKind>> kinds;  // kinds[a][b], n x n; kSelf on the diagonal
  std::string unknown_reason;                // why some pair is kUnknown; empty when none is
};

// The link kind of every pair of GPUs named by PCI bus id ("0000:65:00.0", as cudaDeviceGetPCIBusId
// writes it; "" when unknown), with CUDA's `peer_access[a][b]`. NVML is asked only when some pair
// has peer access.
PeerLinks classify_peer_links(const std::vector<std::string>& pci_bus_ids,
                              const std::vector<std::vector<bool>>& peer_access);
// CUDA device `device`'s PCI bus id as cudaDeviceGetPCIBusId writes it (how NVML finds the
// device); "" when CUDA cannot say (its error cleared).
std::string pci_bus_id(int device);
// The same for CUDA devices (bus ids from pci_bus_id).
PeerLinks peer_links_of_devices(const std::vector<int>& devices, const std::vector<std::vector<bool>>& peer_access);

// Every pair of distinct GPUs is kNvlink (true for a single GPU: there is no pair).
bool all_nvlink(const std::vector<std::vector<LinkKind>>& kinds);

}  // namespace mdtrt
