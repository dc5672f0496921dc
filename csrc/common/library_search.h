// What NCCL's and TensorRT's run-time loaders share: the record of each candidate tried, so that
// a failed search can list every place it looked and why each one was refused.
#pragma once

#include <string>
#include <vector>

namespace mdtrt {

struct LoadAttempt {
  std::string rule;       // which search rule produced the candidate ("libnccl.so.2", "extra directory", ...)
  std::string candidate;  // what was passed to dlopen
  bool loaded = false;
  std::string message;    // dlerror() text, a missing symbol, a refused version, or "ok"
};

// One line per attempt, for error messages.
std::string describe_attempts(const std::vector<LoadAttempt>& attempts);

// dlopen(candidate, flags), recording the candidate and, on failure, dlerror()'s text in `attempt`.
void* open_candidate(const std::string& candidate, int flags, LoadAttempt& attempt);

// The file a loaded symbol lives in (what the dynamic loader actually picked), or `fallback`.
std::string loaded_path(void* symbol, const std::string& fallback);

}  // namespace mdtrt
