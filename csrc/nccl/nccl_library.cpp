#include "nccl/nccl_library.h"

#include <dlfcn.h>

#include <mutex>
#include <sstream>
#include <utility>

#include "common/error.h"

namespace mdtrt::nccl {
namespace {

struct SymbolSlot {
  const char* name;
  void** slot;
};

std::vector<SymbolSlot> symbol_slots(Api& a) {
  auto slot = [](auto& fn) { return reinterpret_cast<void**>(&fn); };
  return {
      {"ncclGetVersion", slot(a.GetVersion)},
      {"ncclGetUniqueId", slot(a.GetUniqueId)},
      {"ncclCommInitRankConfig", slot(a.CommInitRankConfig)},
      {"ncclCommSplit", slot(a.CommSplit)},
      {"ncclCommFinalize", slot(a.CommFinalize)},
      {"ncclCommDestroy", slot(a.CommDestroy)},
      {"ncclCommAbort", slot(a.CommAbort)},
      {"ncclCommGetAsyncError", slot(a.CommGetAsyncError)},
      {"ncclCommCount", slot(a.CommCount)},
      {"ncclCommUserRank", slot(a.CommUserRank)},
      {"ncclGetErrorString", slot(a.GetErrorString)},
      {"ncclGetLastError", slot(a.GetLastError)},
      {"ncclGroupStart", slot(a.GroupStart)},
      {"ncclGroupEnd", slot(a.GroupEnd)},
      {"ncclAllReduce", slot(a.AllReduce)},
      {"ncclAllGather", slot(a.AllGather)},
      {"ncclBroadcast", slot(a.Broadcast)},
      {"ncclReduce", slot(a.Reduce)},
      {"ncclReduceScatter", slot(a.ReduceScatter)},
      {"ncclSend", slot(a.Send)},
      {"ncclRecv", slot(a.Recv)},
  };
}

struct Loaded {
  std::mutex mutex;
  bool ok = false;
  LibraryInfo info;
  Api api{};
  void* handle = nullptr;
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
  for (const auto& s : symbol_slots(candidate_api)) {
    dlerror();
    *s.slot = dlsym(h, s.name);
    if (*s.slot == nullptr) {
      attempt.message = std::string("missing symbol ") + s.name + " (NCCL too old or not NCCL?)";
      dlclose(h);
      return false;
    }
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

}  // namespace

std::string version_string(int code) {
  int major = code / 10000, minor = (code % 10000) / 100, patch = code % 100;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
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
  std::vector<SearchStep> steps = {{"libnccl.so.2", "libnccl.so.2"}, {"libnccl.so", "libnccl.so"}};
  for (const auto& dir : extra_dirs) steps.push_back({"extra directory", dir + "/libnccl.so.2"});
  info.found_by = search_library(
      "MDTRT_NCCL_LIBRARY",
      "Point MDTRT_NCCL_LIBRARY at a NCCL >= 2.19 libnccl.so.2, or unset it to search the usual places.",
      "load NCCL", steps, info.attempts, [&](const std::string& candidate, LoadAttempt& attempt) {
        return try_candidate(candidate, attempt, st.api, st.handle, info.path, info.version);
      });
  if (!info.found_by.empty()) {
    st.info = std::move(info);
    st.ok = true;
    return st.info;
  }
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

bool is_loaded() {
  Loaded& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.ok;
}

}  // namespace mdtrt::nccl
