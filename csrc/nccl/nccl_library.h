// Finding and opening NCCL at run time.
//
// Order, first success wins:
//   1. MDTRT_NCCL_LIBRARY (a path); if set and it does not load, that is an error, not a fall-through
//   1b. a NCCL another library already loaded into the process (torch, ...), when new enough
//   2. libnccl.so.2 through the dynamic loader
//   3. libnccl.so through the dynamic loader
//   4. each extra directory handed in by the caller (the Python layer passes the nvidia-nccl-cu13
//      wheel's lib folder)
// The library is opened RTLD_GLOBAL so that TensorRT's own dlopen("libnccl.so.2") binds to this
// same NCCL instance: the communicators we create are handed to TensorRT. For the same reason one
// process must hold one NCCL: when another copy was loaded before (torch's, too old, or another
// file than MDTRT_NCCL_LIBRARY names), loading fails and names both files.
#pragma once

#include <string>
#include <vector>

#include "common/library_search.h"

#include "nccl/nccl_api.h"

namespace mdtrt::nccl {

constexpr int kMinVersion = 21900;  // 2.19.0
constexpr int kMaxVersionExclusive = 30000;

struct LibraryInfo {
  std::string path;     // the file that was loaded
  int version = 0;      // ncclGetVersion code, e.g. 22805
  std::string found_by; // the rule that found it
  std::vector<LoadAttempt> attempts;
};

// A NCCL library mapped into this process, found by walking the loaded objects (libnccl.so*).
struct LoadedCopy {
  std::string path;
  int version = 0;  // ncclGetVersion, 0 when it has none or it failed
};
std::vector<LoadedCopy> loaded_copies();

// Names of every NCCL symbol mdtrt resolves (tests build fake libraries exporting exactly these).
const std::vector<std::string>& required_symbols();

// Loads NCCL once per process (thread-safe). Later calls return the cached library and ignore
// `extra_dirs`. A failed load is not cached, so a fixed environment can be retried; it throws an
// Error of kind kLibraryNotFound whose message lists every attempt and what to do.
const LibraryInfo& load_library(const std::vector<std::string>& extra_dirs = {});

// The resolved entry points; loads with no extra directories if nothing was loaded yet.
const Api& api();

bool is_loaded();
// Every attempt of the last search that found no usable library (empty when none failed): what
// the error listed, as records.
std::vector<LoadAttempt> failed_attempts();

}  // namespace mdtrt::nccl
