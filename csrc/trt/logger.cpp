#include "trt/logger.h"

namespace mdtrt::trt {
namespace {
// Every error since the thread's last clear_last_error(), joined: TensorRT often logs the cause
// first and a generic consequence after it.
thread_local std::string t_last_error;
constexpr size_t kMaxErrorText = 4096;
}  // namespace

void Logger::log(Severity severity, const char* msg) noexcept {
  try {
    std::string text = msg != nullptr ? msg : "";
    if (severity <= Severity::kERROR && t_last_error.size() < kMaxErrorText)
      t_last_error += (t_last_error.empty() ? "" : "; ") + text;
    std::lock_guard<std::mutex> lock(mutex_);
    if (severity > min_severity_) return;
    if (queue_.size() >= kCapacity) {
      queue_.pop_front();
      ++dropped_;
    }
    queue_.push_back(Message{severity, std::move(text)});
  } catch (...) {
    // Out of memory while logging: losing the message beats terminating inside TensorRT.
  }
}

std::vector<Logger::Message> Logger::drain() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Message> out(std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
  queue_.clear();
  dropped_ = 0;
  return out;
}

size_t Logger::dropped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return dropped_;
}

void Logger::set_min_severity(Severity severity) {
  std::lock_guard<std::mutex> lock(mutex_);
  min_severity_ = severity;
}

nvinfer1::ILogger::Severity Logger::min_severity() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return min_severity_;
}

std::string Logger::last_error() { return t_last_error; }
void Logger::clear_last_error() { t_last_error.clear(); }

Logger& logger() {
  // Never destroyed: TensorRT may still log from its own teardown at process exit.
  static Logger* instance = new Logger();
  return *instance;
}

const char* severity_name(nvinfer1::ILogger::Severity severity) {
  using S = nvinfer1::ILogger::Severity;
  switch (severity) {
    case S::kINTERNAL_ERROR: return "internal error";
    case S::kERROR: return "error";
    case S::kWARNING: return "warning";
    case S::kINFO: return "info";
    case S::kVERBOSE: return "verbose";
  }
  return "unknown";
}

std::string with_trt_error(const std::string& what) {
  std::string last = Logger::last_error();
  if (last.empty()) return what + " (TensorRT logged no error)";
  return what + ": " + last;
}

}  // namespace mdtrt::trt
