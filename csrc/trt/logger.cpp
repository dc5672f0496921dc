#include "trt/logger.h"

#include <algorithm>
#include <cstdint>
#include <thread>

namespace mdtrt::trt {
namespace {

constexpr size_t kMaxErrorText = 4096;
constexpr size_t kKeptErrors = 256;

// Every error TensorRT logged recently, with who logged it. A process-wide record instead of a
// thread-local one: TensorRT may log a call's error from one of its own threads.
struct ErrorRecord {
  uint64_t seq;
  std::thread::id thread;
  bool in_scope;  // the logging thread was inside an ErrorScope (one of mdtrt's calls)
  std::string text;
};

struct ErrorLog {
  std::mutex mutex;
  std::deque<ErrorRecord> records;
  uint64_t seq = 0;
  std::vector<std::thread::id> scoped;  // threads inside an ErrorScope, once per nesting level
};

ErrorLog& error_log() {
  static ErrorLog* log = new ErrorLog();  // never destroyed: TensorRT may log at process exit
  return *log;
}

// The sequence number of the last error this thread has already seen (cleared up to).
thread_local uint64_t t_cleared = 0;

bool thread_in_scope(const ErrorLog& log, std::thread::id id) {
  return std::find(log.scoped.begin(), log.scoped.end(), id) != log.scoped.end();
}

}  // namespace

void Logger::log(Severity severity, const char* msg) noexcept {
  try {
    std::string text = msg != nullptr ? msg : "";
    if (severity <= Severity::kERROR) {
      ErrorLog& errors = error_log();
      std::lock_guard<std::mutex> lock(errors.mutex);
      const auto me = std::this_thread::get_id();
      errors.records.push_back(ErrorRecord{++errors.seq, me, thread_in_scope(errors, me), text});
      if (errors.records.size() > kKeptErrors) errors.records.pop_front();
    }
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

std::string Logger::last_error() {
  ErrorLog& errors = error_log();
  const auto me = std::this_thread::get_id();
  std::string out;
  std::lock_guard<std::mutex> lock(errors.mutex);
  for (const ErrorRecord& r : errors.records) {
    if (r.seq <= t_cleared || (r.thread != me && r.in_scope)) continue;
    if (out.size() >= kMaxErrorText) break;
    out += (out.empty() ? "" : "; ") + r.text;
  }
  return out;
}

void Logger::clear_last_error() {
  ErrorLog& errors = error_log();
  std::lock_guard<std::mutex> lock(errors.mutex);
  t_cleared = errors.seq;
}

ErrorScope::ErrorScope() {
  ErrorLog& errors = error_log();
  std::lock_guard<std::mutex> lock(errors.mutex);
  t_cleared = errors.seq;
  errors.scoped.push_back(std::this_thread::get_id());
}

ErrorScope::~ErrorScope() {
  ErrorLog& errors = error_log();
  std::lock_guard<std::mutex> lock(errors.mutex);
  auto it = std::find(errors.scoped.begin(), errors.scoped.end(), std::this_thread::get_id());
  if (it != errors.scoped.end()) errors.scoped.erase(it);
}

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
