// Errors raised by the native core. Every error carries the rank it happened on (or -1),
// the library call that failed and the library's own message, so that the Python layer can
// raise an exception that tells the user where and why, not just "failed".
#pragma once

#include <stdexcept>
#include <string>

namespace mdtrt {

enum class ErrorKind {
  kGeneric,
  kInvalidArgument,  // the caller's input is wrong: shapes, dtypes, GPU ids, ...
  kLibraryNotFound,  // NCCL or TensorRT could not be loaded
  kNccl,
  kCuda,
  kTensorRT,
  kTimeout,  // a blocking wait ran past its deadline
  kInterrupted,  // a blocking wait was interrupted (Ctrl-C): Python raises KeyboardInterrupt
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message, int rank = -1, std::string call = {});

  ErrorKind kind() const noexcept { return kind_; }
  int rank() const noexcept { return rank_; }
  const std::string& call() const noexcept { return call_; }
  // The message without the "rank N: call: " prefix that what() carries.
  const std::string& detail() const noexcept { return detail_; }

  // The same error, attributed to a rank (used when a rank thread's error crosses to the caller).
  Error with_rank(int rank) const;

 private:
  ErrorKind kind_;
  int rank_;
  std::string call_;
  std::string detail_;
};

[[noreturn]] void throw_invalid_argument(const std::string& message);

}  // namespace mdtrt
