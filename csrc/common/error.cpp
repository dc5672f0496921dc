#include "common/error.h"

namespace mdtrt {
namespace {
std::string format_message(const std::string& detail, int rank, const std::string& call) {
  std::string prefix;
  if (rank >= 0) prefix += "rank " + std::to_string(rank) + ": ";
  if (!call.empty()) prefix += call + ": ";
  return prefix + detail;
}
}  // namespace

Error::Error(ErrorKind kind, std::string message, int rank, std::string call)
    : std::runtime_error(format_message(message, rank, call)),
      kind_(kind),
      rank_(rank),
      call_(std::move(call)),
      detail_(std::move(message)) {}

Error Error::with_rank(int rank) const {
  if (rank_ >= 0) return *this;
  return Error(kind_, detail_, rank, call_);
}

void throw_invalid_argument(const std::string& message) { throw Error(ErrorKind::kInvalidArgument, message); }

}  // namespace mdtrt
