// The one TensorRT logger of the process. TensorRT keeps the first ILogger it is given for the
// life of the process, so every runtime, builder and parser mdtrt creates shares this one.
//
// Messages go into a bounded queue that the Python layer drains into logging
// ("mdtrt.tensorrt") after each call: TensorRT logs from whatever thread is working (rank
// threads, builds with the GIL released), where calling into Python is not an option. The last
// error of each thread is kept as well, so that a failing call's own TensorRT text can go into
// the mdtrt::Error it raises.
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

  // Messages less severe than this are not queued (errors are always remembered per thread).
  void set_min_severity(Severity severity);
  Severity min_severity() const;

  // The kERROR/kINTERNAL_ERROR texts TensorRT logged on the calling thread since
  // clear_last_error(), joined with "; ", or "".
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

// Clears the calling thread's last error on construction, so a message left by an earlier
// unrelated call is never blamed for this one.
class ErrorScope {
 public:
  ErrorScope() { Logger::clear_last_error(); }
};

}  // namespace mdtrt::trt
