#include "common/library_search.h"

#include <dlfcn.h>

#include <cstdlib>
#include <sstream>

#include "common/error.h"

namespace mdtrt {

namespace {

// dlerror()'s text starts with the file it could not open, which the caller names already
// ("libnvinfer.so.11: libnvinfer.so.11: libnvinfer.so.11: cannot open ..."): the reason alone.
std::string reason_of(const LoadAttempt& a) {
  const std::string prefix = a.candidate + ": ";
  return a.message.compare(0, prefix.size(), prefix) == 0 ? a.message.substr(prefix.size()) : a.message;
}

}  // namespace

std::string describe_attempts(const std::vector<LoadAttempt>& attempts) {
  std::ostringstream out;
  for (const auto& a : attempts)
    out << "\n  - " << (a.rule == a.candidate ? a.candidate : a.rule + ": " + a.candidate) << ": " << reason_of(a);
  return out.str();
}

void* open_candidate(const std::string& candidate, int flags, LoadAttempt& attempt) {
  attempt.candidate = candidate;
  dlerror();
  void* handle = dlopen(candidate.c_str(), flags);
  if (handle == nullptr) {
    const char* err = dlerror();
    attempt.message = err ? err : "dlopen failed";
  }
  return handle;
}

bool resolve_symbols(void* handle, const std::vector<SymbolSlot>& slots, const char* hint, LoadAttempt& attempt) {
  for (const auto& s : slots) {
    dlerror();
    *s.slot = dlsym(handle, s.name);
    if (*s.slot == nullptr) {
      attempt.message = std::string("missing symbol ") + s.name + " (" + hint + ")";
      return false;
    }
  }
  return true;
}

std::string search_library(const char* env_var, const std::string& env_hint, const std::string& call,
                           const std::vector<SearchStep>& steps, std::vector<LoadAttempt>& attempts,
                           const std::function<bool(const std::string&, LoadAttempt&)>& try_candidate) {
  auto attempt = [&](const std::string& rule, const std::string& candidate) {
    attempts.push_back(LoadAttempt{rule, candidate, false, {}});
    return try_candidate(candidate, attempts.back());
  };
  const char* env = std::getenv(env_var);
  if (env != nullptr && env[0] != '\0') {
    if (attempt(env_var, env)) return env_var;
    throw Error(ErrorKind::kLibraryNotFound,
                std::string(env_var) + " is set to '" + env + "' but it could not be used: " +
                    reason_of(attempts.back()) + ". " + env_hint,
                -1, call);
  }
  for (const auto& step : steps)
    if (attempt(step.rule, step.candidate)) return step.rule;
  return {};
}

std::string loaded_path(void* symbol, const std::string& fallback) {
  Dl_info dl{};
  if (symbol != nullptr && dladdr(symbol, &dl) != 0 && dl.dli_fname != nullptr) return dl.dli_fname;
  return fallback;
}

std::string version_string(int code) {
  int major = code / 10000, minor = (code % 10000) / 100, patch = code % 100;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace mdtrt
