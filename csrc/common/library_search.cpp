#include "common/library_search.h"

#include <dlfcn.h>

#include <sstream>

namespace mdtrt {

std::string describe_attempts(const std::vector<LoadAttempt>& attempts) {
  std::ostringstream out;
  for (const auto& a : attempts) out << "\n  - " << a.rule << ": " << a.candidate << ": " << a.message;
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

std::string loaded_path(void* symbol, const std::string& fallback) {
  Dl_info dl{};
  if (symbol != nullptr && dladdr(symbol, &dl) != 0 && dl.dli_fname != nullptr) return dl.dli_fname;
  return fallback;
}

}  // namespace mdtrt
