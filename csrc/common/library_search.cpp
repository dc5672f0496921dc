#include "common/library_search.h"

#include <dlfcn.h>

#include <sstream>

namespace mdtrt {

std::string describe_attempts(const std::vector<LoadAttempt>& attempts) {
  std::ostringstream out;
  for (const auto& a : attempts) out << "\n  - " << a.rule << ": " << a.candidate << ": " << a.message;
  return out.str();
}

std::string loaded_path(void* symbol, const std::string& fallback) {
  Dl_info dl{};
  if (symbol != nullptr && dladdr(symbol, &dl) != 0 && dl.dli_fname != nullptr) return dl.dli_fname;
  return fallback;
}

}  // namespace mdtrt
