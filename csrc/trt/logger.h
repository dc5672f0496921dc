// The one TensorRT logger of the process. TensorRT keeps the first ILogger it is given for the
// life of the process, so every runtime, builder and parser mdtrt creates shares this one.
//
// Messages go into a bounded queue that the Python layer drains into logging
// ("mdtrt.tensorrt") after each call: TensorRT logs from whatever thread is working (rank
// threads, builds with the GIL released, and TensorRT's own worker threads), where calling into
// Python is not an option. Errors are also kept, with the thread that logged them, so that a
// failing call's TensorRT text can go into the mdtrt::Error it raises: a call made inside an
// ErrorScope gets the errors of its own thread and those logged meanwhile by threads that are in no
// ErrorScope (TensorRT's own threads: which thread TensorRT logs from is not documented, so an
// error from a thread mdtrt did not make is attributed to every call in flight rather than lost).
#pragma once

#include <NvInferRuntime.h>

#include <cstddef>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

namespace mdtrt::trt {

class Logger : public nvinfer1::ILogger {
 public:
  struct Message {
    Severity severity;
    std::string text;
  };

  static constexpr size_t kCapacity = 4096;

  void log(Severity severity, const char* msg) noexcept override;

  // Every queued message, oldest first; empties the queue.
  std::vector<Message> drain();
  // Messages dropped because nobody drained the queue in time (reset by drain()).
  size_t dropped() const;

  // Messages less severe than this are not queued (errors are always remembered for ErrorScope).
  void set_min_severity(Severity severity);
  Severity min_severity() const;

  // The kERROR/kINTERNAL_ERROR texts logged since the calling thread's clear_last_error() (or
  // ErrorScope) by this thread or by threads outside any ErrorScope, joined with "; ", or "".
  static std::string last_error();
  static void clear_last_error();

 private:
  mutable std::mutex mutex_;
  std::deque<Message> queue_;
  size_t dropped_ = 0;
  Severity min_severity_ = Severity::kINFO;
};

Logger& logger();

const char* severity_name(nvinfer1::ILogger::Severity severity);

// "what failed: TensorRT's last error on this thread" (or what failed alone when TensorRT said
// nothing), for error messages of calls that only return false/nullptr.
std::string with_trt_error(const std::string& what);

// A call into TensorRT whose errors are collected for its exception. Clears the calling thread's
// last error on construction, so a message left by an earlier unrelated call is never blamed for
// this one, and marks the thread as one of mdtrt's callers while it lives: errors logged by other
// threads in a scope belong to those calls, errors from threads in none (TensorRT's) to every
// call in flight. Scopes may nest; each one clears.
class ErrorScope {
 public:
  ErrorScope();
  ~ErrorScope();
  ErrorScope(const ErrorScope&) = delete;
  ErrorScope& operator=(const ErrorScope&) = delete;
};

}  // namespace mdtrt::trt
