#include "runtime/gpu_links.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <mutex>

#include "common/error.h"
#include "common/library_search.h"
#include "common/name_table.h"

namespace mdtrt {
namespace {

// The part of NVML's C ABI that mdtrt uses, declared here so that mdtrt builds without NVIDIA's
// nvml.h: NVML is opened at run time. Values and signatures follow NVML's public, stable ABI
// (nvml.h), as NCCL's copy of it reads (github.com/NVIDIA/nccl, src/include/nvmlwrap.h, "Extracted
// from nvml.h": nvmlReturn_t NVML_SUCCESS = 0; nvmlGpuP2PCapsIndex_t READ = 0, WRITE, NVLINK
// (= 2), ...; nvmlGpuP2PStatus_t NVML_P2P_STATUS_OK = 0; the functions' signatures as
// src/misc/nvmlwrap.cc declares them). C enums are ints.
namespace nvml {
struct OpaqueDevice;
using Device = OpaqueDevice*;  // nvmlDevice_t (struct nvmlDevice_st*)
using Return = int;            // nvmlReturn_t
using P2PCapsIndex = int;      // nvmlGpuP2PCapsIndex_t
using P2PStatus = int;         // nvmlGpuP2PStatus_t
constexpr Return kSuccess = 0;               // NVML_SUCCESS
constexpr P2PCapsIndex kP2PCapsNvlink = 2;   // NVML_P2P_CAPS_INDEX_NVLINK
constexpr P2PStatus kP2PStatusOk = 0;        // NVML_P2P_STATUS_OK

struct Api {
  Return (*Init_v2)() = nullptr;
  Return (*Shutdown)() = nullptr;
  Return (*DeviceGetHandleByPciBusId_v2)(const char* pci_bus_id, Device* device) = nullptr;
  Return (*DeviceGetP2PStatus)(Device device1, Device device2, P2PCapsIndex index, P2PStatus* status) = nullptr;
  const char* (*ErrorString)(Return result) = nullptr;
};
}  // namespace nvml

std::vector<SymbolSlot> symbol_slots(nvml::Api& a) {
  return {
      {"nvmlInit_v2", symbol_slot(a.Init_v2)},
      {"nvmlShutdown", symbol_slot(a.Shutdown)},
      {"nvmlDeviceGetHandleByPciBusId_v2", symbol_slot(a.DeviceGetHandleByPciBusId_v2)},
      {"nvmlDeviceGetP2PStatus", symbol_slot(a.DeviceGetP2PStatus)},
      {"nvmlErrorString", symbol_slot(a.ErrorString)},
  };
}

// NVML for the whole process: opened and initialized by the constructor (run once, thread-safe:
// a function-local static), shut down by the destructor at exit. The library stays loaded: NVML
// is reference-counted (torch or pynvml may hold it too), and unloading at exit is the loader's job.
class NvmlSession {
 public:
  NvmlSession() {
    std::vector<LoadAttempt> attempts;
    std::string found_by;
    try {
      found_by = search_library(
          "MDTRT_NVML_LIBRARY",
          "Point MDTRT_NVML_LIBRARY at the driver's libnvidia-ml.so.1, or unset it to search the usual places.",
          "load NVML", {{"libnvidia-ml.so.1", "libnvidia-ml.so.1"}}, attempts,
          [this](const std::string& candidate, LoadAttempt& attempt) { return open(candidate, attempt); });
    } catch (const Error& e) {
      status_.error = e.detail();
      return;
    }
    if (found_by.empty()) {
      status_.error = "NVML (libnvidia-ml.so.1, installed with the NVIDIA driver) was not found:" +
                      describe_attempts(attempts);
      return;
    }
    const nvml::Return r = api_.Init_v2();
    if (r != nvml::kSuccess) {
      status_.error = "nvmlInit_v2 failed: " + error_string(r);
      dlclose(handle_);
      handle_ = nullptr;
      api_ = nvml::Api{};  // nothing may call into the closed library
      return;
    }
    status_.available = true;
    status_.found_by = found_by;
    status_.path = loaded_path(reinterpret_cast<void*>(api_.Init_v2), attempts.back().candidate);
  }
  ~NvmlSession() {
    if (status_.available) api_.Shutdown();
  }
  NvmlSession(const NvmlSession&) = delete;
  NvmlSession& operator=(const NvmlSession&) = delete;

  const NvmlStatus& status() const { return status_; }
  const nvml::Api& api() const { return api_; }
  // NVML's queries are serialized: NCCL found thread-safety bugs in it (nvmlwrap.cc locks every call).
  std::mutex& mutex() { return mutex_; }

  std::string error_string(nvml::Return r) const {
    const char* text = api_.ErrorString ? api_.ErrorString(r) : nullptr;
    return (text && text[0] ? std::string(text) : "NVML error") + " (code " + std::to_string(r) + ")";
  }

 private:
  bool open(const std::string& candidate, LoadAttempt& attempt) {
    void* h = open_candidate(candidate, RTLD_NOW | RTLD_LOCAL, attempt);
    if (h == nullptr) return false;
    nvml::Api api{};
    if (!resolve_symbols(h, symbol_slots(api), "NVML too old, or not NVML?", attempt)) {
      dlclose(h);
      return false;
    }
    attempt.loaded = true;
    attempt.message = "ok";
    api_ = api;
    handle_ = h;
    return true;
  }

  NvmlStatus status_;
  nvml::Api api_{};
  void* handle_ = nullptr;
  std::mutex mutex_;
};

NvmlSession& session() {
  static NvmlSession s;
  return s;
}

constexpr NamedValue<LinkKind> kLinkKinds[] = {
    {LinkKind::kSelf, "self"}, {LinkKind::kNvlink, "nvlink"}, {LinkKind::kPcie, "pcie"},
    {LinkKind::kNone, "none"}, {LinkKind::kUnknown, "unknown"},
};

void add_reason(std::string& reasons, const std::string& reason) {
  if (reasons.find(reason) != std::string::npos) return;
  reasons += (reasons.empty() ? "" : "; ") + reason;
}

}  // namespace

const char* link_kind_name(LinkKind kind) { return name_of(kLinkKinds, kind, "link kind"); }

std::vector<std::vector<std::string>> link_kind_names(const std::vector<std::vector<LinkKind>>& kinds) {
  std::vector<std::vector<std::string>> names;
  for (const auto& row : kinds) {
    names.emplace_back();
    for (LinkKind kind : row) names.back().emplace_back(link_kind_name(kind));
  }
  return names;
}

const NvmlStatus& nvml_status() { return session().status(); }

PeerLinks classify_peer_links(const std::vector<std::string>& pci_bus_ids,
                              const std::vector<std::vector<bool>>& peer_access) {
  const size_t n = pci_bus_ids.size();
  if (peer_access.size() != n)
    throw_invalid_argument("peer_access has " + std::to_string(peer_access.size()) + " rows for " +
                           std::to_string(n) + " GPUs");
  PeerLinks links;
  links.kinds.assign(n, std::vector<LinkKind>(n, LinkKind::kUnknown));
  bool any_peer = false;
  for (size_t a = 0; a < n; ++a) {
    if (peer_access[a].size() != n)
      throw_invalid_argument("peer_access row " + std::to_string(a) + " has " + std::to_string(peer_access[a].size()) +
                             " entries for " + std::to_string(n) + " GPUs");
    for (size_t b = 0; b < n; ++b) {
      if (a == b) {
        links.kinds[a][b] = LinkKind::kSelf;
      } else if (!peer_access[a][b]) {
        links.kinds[a][b] = LinkKind::kNone;
      } else {
        any_peer = true;
      }
    }
  }
  if (!any_peer) return links;  // nothing NVML could add: it is not even opened
  NvmlSession& nvml = session();
  if (!nvml.status().available) {
    links.unknown_reason = "NVML is unavailable: " + nvml.status().error;
    return links;
  }
  const nvml::Api& api = nvml.api();
  std::lock_guard<std::mutex> lock(nvml.mutex());
  std::vector<nvml::Device> handles(n, nullptr);
  std::vector<bool> have(n, false);
  for (size_t i = 0; i < n; ++i) {
    if (pci_bus_ids[i].empty()) {
      add_reason(links.unknown_reason, "no PCI bus id for GPU " + std::to_string(i));
      continue;
    }
    const nvml::Return r = api.DeviceGetHandleByPciBusId_v2(pci_bus_ids[i].c_str(), &handles[i]);
    if (r == nvml::kSuccess) {
      have[i] = true;
    } else {
      add_reason(links.unknown_reason,
                 "nvmlDeviceGetHandleByPciBusId_v2(" + pci_bus_ids[i] + ") failed: " + nvml.error_string(r));
    }
  }
  for (size_t a = 0; a < n; ++a) {
    for (size_t b = 0; b < n; ++b) {
      if (links.kinds[a][b] != LinkKind::kUnknown || !have[a] || !have[b]) continue;
      nvml::P2PStatus status = -1;
      const nvml::Return r = api.DeviceGetP2PStatus(handles[a], handles[b], nvml::kP2PCapsNvlink, &status);
      if (r != nvml::kSuccess) {
        add_reason(links.unknown_reason, "nvmlDeviceGetP2PStatus(" + pci_bus_ids[a] + ", " + pci_bus_ids[b] +
                                             ", NVLINK) failed: " + nvml.error_string(r));
        continue;
      }
      links.kinds[a][b] = status == nvml::kP2PStatusOk ? LinkKind::kNvlink : LinkKind::kPcie;
    }
  }
  return links;
}

std::string pci_bus_id(int device) {
  char bus[32] = {0};
  if (cudaDeviceGetPCIBusId(bus, sizeof(bus), device) == cudaSuccess) return bus;
  cudaGetLastError();
  return "";
}

PeerLinks peer_links_of_devices(const std::vector<int>& devices, const std::vector<std::vector<bool>>& peer_access) {
  std::vector<std::string> bus_ids;
  for (int d : devices) bus_ids.push_back(pci_bus_id(d));  // "": its pairs stay unknown, the reason says so
  return classify_peer_links(bus_ids, peer_access);
}

bool all_nvlink(const std::vector<std::vector<LinkKind>>& kinds) {
  for (size_t a = 0; a < kinds.size(); ++a)
    for (size_t b = 0; b < kinds[a].size(); ++b)
      if (a != b && kinds[a][b] != LinkKind::kNvlink) return false;
  return true;
}

}  // namespace mdtrt
