#include "nccl/nccl_library.h"

#include <dlfcn.h>
#include <link.h>
#include <limits.h>
#include <stdlib.h>

#include <cstring>

#include <mutex>
#include <sstream>
#include <utility>

#include "common/error.h"

namespace mdtrt::nccl {
namespace {

std::vector<SymbolSlot> symbol_slots(Api& a) {
  return {
      {"ncclGetVersion", symbol_slot(a.GetVersion)},
      {"ncclGetUniqueId", symbol_slot(a.GetUniqueId)},
      {"ncclCommInitRankConfig", symbol_slot(a.CommInitRankConfig)},
      {"ncclCommSplit", symbol_slot(a.CommSplit)},
      {"ncclCommFinalize", symbol_slot(a.CommFinalize)},
      {"ncclCommDestroy", symbol_slot(a.CommDestroy)},
      {"ncclCommAbort", symbol_slot(a.CommAbort)},
      {"ncclCommGetAsyncError", symbol_slot(a.CommGetAsyncError)},
      {"ncclCommCount", symbol_slot(a.CommCount)},
      {"ncclCommUserRank", symbol_slot(a.CommUserRank)},
      {"ncclGetErrorString", symbol_slot(a.GetErrorString)},
      {"ncclGetLastError", symbol_slot(a.GetLastError)},
      {"ncclGroupStart", symbol_slot(a.GroupStart)},
      {"ncclGroupEnd", symbol_slot(a.GroupEnd)},
      {"ncclAllReduce", symbol_slot(a.AllReduce)},
      {"ncclAllGather", symbol_slot(a.AllGather)},
      {"ncclBroadcast", symbol_slot(a.Broadcast)},
      {"ncclReduce", symbol_slot(a.Reduce)},
      {"ncclReduceScatter", symbol_slot(a.ReduceScatter)},
      {"ncclSend", symbol_slot(a.Send)},
      {"ncclRecv", symbol_slot(a.Recv)},
  };
}

struct Loaded {
  std::mutex mutex;
  bool ok = false;
  LibraryInfo info;
  Api api{};
  void* handle = nullptr;
  std::vector<LoadAttempt> failed_attempts;  // of the last search that found no usable library
};

Loaded& state() {
  static Loaded loaded;
  return loaded;
}

// Opens one candidate and checks it; on failure fills attempt.message and returns false.
bool try_candidate(const std::string& candidate, LoadAttempt& attempt, Api& api, void*& handle,
                   std::string& path, int& version) {
  void* h = open_candidate(candidate, RTLD_NOW | RTLD_GLOBAL, attempt);
  if (h == nullptr) return false;
  Api candidate_api{};
  if (!resolve_symbols(h, symbol_slots(candidate_api), "NCCL too old or not NCCL?", attempt)) {
    dlclose(h);
    return false;
  }
  int code = 0;
  Result r = candidate_api.GetVersion(&code);
  if (r != kSuccess) {
    attempt.message = "ncclGetVersion failed with code " + std::to_string(r);
    dlclose(h);
    return false;
  }
  if (code < kMinVersion || code >= kMaxVersionExclusive) {
    attempt.message = "NCCL " + version_string(code) + " is not supported: mdtrt needs NCCL >= " +
                      version_string(kMinVersion) + " and < 3.0";
    dlclose(h);
    return false;
  }
  attempt.loaded = true;
  attempt.message = "ok";
  api = candidate_api;
  handle = h;
  path = loaded_path(reinterpret_cast<void*>(candidate_api.GetVersion), candidate);
  version = code;
  return true;
}

std::string real_path(const std::string& path) {
  char resolved[PATH_MAX];
  return ::realpath(path.c_str(), resolved) != nullptr ? std::string(resolved) : path;
}

// Refuses a second NCCL in the process: TensorRT would bind to one, mdtrt's communicators come
// from the other.
void check_single_copy(const std::vector<LoadedCopy>& before, const LibraryInfo& chosen) {
  const std::string ours = real_path(chosen.path);
  for (const auto& other : before) {
    if (real_path(other.path) == ours) continue;
    const bool usable = other.version >= kMinVersion && other.version < kMaxVersionExclusive;
    throw Error(ErrorKind::kLibraryNotFound,
                "NCCL " + version_string(other.version) + " at " + other.path +
                    " is already loaded in this process (another library loaded it first, e.g. torch), and mdtrt "
                    "would use NCCL " + version_string(chosen.version) + " at " + chosen.path + " (found by " +
                    chosen.found_by + "). One process must use one NCCL: TensorRT opens libnccl.so.2 by name and "
                    "gets the first copy, while mdtrt's communicators would come from the second. " +
                    (usable ? "Unset MDTRT_NCCL_LIBRARY (or point it at " + other.path + ") to use the loaded copy, "
                            : "That copy is older than mdtrt needs (>= " + version_string(kMinVersion) +
                                  "): import mdtrt (or call mdtrt.nccl_library()) before that library, so that it "
                                  "binds to mdtrt's NCCL, or upgrade the NCCL it brings, ") +
                    "or run the two in separate processes.",
                -1, "load NCCL");
  }
}

}  // namespace

std::vector<LoadedCopy> loaded_copies() {
  std::vector<std::string> paths;
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* data) {
        const char* name = info->dlpi_name;
        if (name == nullptr || name[0] == '\0') return 0;
        const char* base = std::strrchr(name, '/');
        base = base ? base + 1 : name;
        // libnccl.so, libnccl.so.2, libnccl.so.2.28.9, libnccl-custom.so; not NCCL's plugins
        // (libnccl-net*.so, libnccl-tuner*.so, libnccl-profiler*.so), which are not NCCL itself.
        if (std::strncmp(base, "libnccl", 7) != 0) return 0;
        for (const char* plugin : {"libnccl-net", "libnccl-tuner", "libnccl-profiler", "libnccl-env"})
          if (std::strncmp(base, plugin, std::strlen(plugin)) == 0) return 0;
        static_cast<std::vector<std::string>*>(data)->push_back(name);
        return 0;
      },
      &paths);
  std::vector<LoadedCopy> out;
  for (const auto& path : paths) {
    LoadedCopy copy{path, 0};
    if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD)) {
      using GetVersion = Result (*)(int*);
      if (auto fn = reinterpret_cast<GetVersion>(dlsym(h, "ncclGetVersion"))) {
        int code = 0;
        if (fn(&code) == kSuccess) copy.version = code;
      }
      dlclose(h);
    }
    if (copy.version == 0) continue;  // a library named libnccl* that is not NCCL
    out.push_back(copy);
  }
  return out;
}

const std::vector<std::string>& required_symbols() {
  static const std::vector<std::string> names = [] {
    Api scratch{};
    std::vector<std::string> out;
    for (const auto& s : symbol_slots(scratch)) out.emplace_back(s.name);
    return out;
  }();
  return names;
}

const LibraryInfo& load_library(const std::vector<std::string>& extra_dirs) {
  Loaded& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  if (st.ok) return st.info;

  LibraryInfo info;
  const std::vector<LoadedCopy> before = loaded_copies();
  std::vector<SearchStep> steps;
  for (const auto& copy : before) steps.push_back({"already loaded in this process", copy.path});
  steps.push_back({"libnccl.so.2", "libnccl.so.2"});
  steps.push_back({"libnccl.so", "libnccl.so"});
  for (const auto& dir : extra_dirs) steps.push_back({"extra directory", dir + "/libnccl.so.2"});
  try {
    info.found_by = search_library(
      "MDTRT_NCCL_LIBRARY",
      "Point MDTRT_NCCL_LIBRARY at a NCCL >= 2.19 libnccl.so.2, or unset it to search the usual places.",
      "load NCCL", steps, info.attempts, [&](const std::string& candidate, LoadAttempt& attempt) {
        return try_candidate(candidate, attempt, st.api, st.handle, info.path, info.version);
      });
  } catch (const Error&) {
    st.failed_attempts = info.attempts;
    throw;
  }
  if (!info.found_by.empty()) {
    try {
      check_single_copy(before, info);
    } catch (...) {
      st.failed_attempts = info.attempts;
      if (st.handle != nullptr) dlclose(st.handle);
      st.handle = nullptr;
      st.api = Api{};
      throw;
    }
    st.info = std::move(info);
    st.ok = true;
    return st.info;
  }
  st.failed_attempts = info.attempts;
  throw Error(ErrorKind::kLibraryNotFound,
              "could not find a usable NCCL library. Tried:" + describe_attempts(info.attempts) +
                  "\nInstall it with `pip install nvidia-nccl-cu13`, add its folder to LD_LIBRARY_PATH, or set "
                  "MDTRT_NCCL_LIBRARY=/path/to/libnccl.so.2.",
              -1, "load NCCL");
}

const Api& api() {
  if (!is_loaded()) load_library();
  return state().api;
}

std::vector<LoadAttempt> failed_attempts() {
  Loaded& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.failed_attempts;
}

bool is_loaded() {
  Loaded& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.ok;
}

}  // namespace mdtrt::nccl
