// What NCCL's and TensorRT's run-time loaders share: the record of each candidate tried, so that
// a failed search can list every place it looked and why each one was refused.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace mdtrt {

struct LoadAttempt {
  std::string rule;       // which search rule produced the candidate ("libnccl.so.2", "extra directory", ...)
  std::string candidate;  // what was passed to dlopen
  bool loaded = false;
  std::string message;    // dlerror() text, a missing symbol, a refused version, or "ok"
};

// "major.minor.patch" of a version code major * 10000 + minor * 100 + patch (how NCCL and
// TensorRT number their releases, e.g. 22805 -> "2.28.5").
std::string version_string(int code);

// One line per attempt, for error messages.
std::string describe_attempts(const std::vector<LoadAttempt>& attempts);

// dlopen(candidate, flags), recording the candidate and, on failure, dlerror()'s text in `attempt`.
void* open_candidate(const std::string& candidate, int flags, LoadAttempt& attempt);

// A function pointer to fill from a loaded library: its exported name and where to store it
// (symbol_slot(api.Fn) gives the place).
struct SymbolSlot {
  const char* name;
  void** slot;
};
template <typename Fn>
void** symbol_slot(Fn& fn) {
  return reinterpret_cast<void**>(&fn);
}

// Fills every slot with dlsym(handle, name). At the first symbol missing, records "missing symbol
// NAME (`hint`)" in `attempt` and returns false; the caller closes the handle.
bool resolve_symbols(void* handle, const std::vector<SymbolSlot>& slots, const char* hint, LoadAttempt& attempt);

// One place to look: the rule that names it (reported as "found by") and what to dlopen.
struct SearchStep {
  std::string rule;
  std::string candidate;
};

// The search every loader runs: the path in `env_var` when it is set (a failure there is final:
// the error says it could not be used, then `env_hint`), else each step in order. `try_candidate`
// opens and checks one candidate, recording why it refused it. Every attempt is appended to
// `attempts`. Returns the rule that found a usable library, or "" when none did (the caller
// says what to install). `call` names the step in errors ("load NCCL").
std::string search_library(const char* env_var, const std::string& env_hint, const std::string& call,
                           const std::vector<SearchStep>& steps, std::vector<LoadAttempt>& attempts,
                           const std::function<bool(const std::string& candidate, LoadAttempt& attempt)>& try_candidate);

// The file a loaded symbol lives in (what the dynamic loader actually picked), or `fallback`.
std::string loaded_path(void* symbol, const std::string& fallback);

}  // namespace mdtrt
