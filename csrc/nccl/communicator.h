// RAII ownership of NCCL communicators, created without ever blocking past a deadline.
//
// Communicators are initialised non-blocking (ncclCommInitRankConfig with blocking = 0) and
// polled with ncclCommGetAsyncError, so that a rank that never arrives becomes a timeout error
// instead of a hang; abort() (ncclCommAbort) tears one down from any thread.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/deadline.h"
#include "nccl/nccl_api.h"

namespace mdtrt {

// Throws mdtrt::Error(kNccl) with NCCL's error string and last-error text when r is a failure.
void nccl_check(nccl::Result r, const char* call, nccl::Comm comm = nullptr);

}  // namespace mdtrt

// Calls NCCL's `fn` through the loaded library and checks it, in the style of NCCL's NCCLCHECK:
// the error names the call from its own text ("nccl" #fn), so the name cannot drift from the call.
// MDTRT_NCCL_CHECK(GroupStart) runs ncclGroupStart(); the _COMM form also reports `comm`'s last
// error text.
#define MDTRT_NCCL_CHECK(fn, ...) ::mdtrt::nccl_check(::mdtrt::nccl::api().fn(__VA_ARGS__), "nccl" #fn)
#define MDTRT_NCCL_CHECK_COMM(comm, fn, ...) \
  ::mdtrt::nccl_check(::mdtrt::nccl::api().fn(__VA_ARGS__), "nccl" #fn, comm)
// The same through Communicator::check, for calls on a communicator that may return ncclInProgress
// (non-blocking): waits for it until `deadline`, aborting the communicator when it passes.
#define MDTRT_NCCL_CHECK_ON(communicator, deadline, fn, ...) \
  (communicator).check(::mdtrt::nccl::api().fn(__VA_ARGS__), "nccl" #fn, deadline)
// For clean-up paths (an error already being thrown, a destructor, an abort): the call's failure
// can be neither acted on nor reported without hiding the error that led here, so its result is
// dropped, explicitly and in one place, instead of silently at each call site.
#define MDTRT_NCCL_IGNORE(fn, ...) static_cast<void>(::mdtrt::nccl::api().fn(__VA_ARGS__))

namespace mdtrt {

nccl::UniqueId nccl_unique_id();
// A unique id from its bytes (as Python holds it); throws kInvalidArgument on a wrong length.
nccl::UniqueId unique_id_from_bytes(const std::string& bytes);

class Communicator {
 public:
  // One communicator per local device, ranks `ranks[i]` of `world_size`, all from one unique id,
  // created together (the equivalent of ncclCommInitAll, also for part of a multi-process world).
  static std::vector<std::unique_ptr<Communicator>> create(const nccl::UniqueId& id, int world_size,
                                                           const std::vector<int>& ranks,
                                                           const std::vector<int>& devices,
                                                           const Deadline& deadline);

  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  nccl::Comm handle() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }

  // Waits until no operation is pending on the communicator (non-blocking mode returns
  // ncclInProgress from many calls). On the deadline, aborts the communicator and throws kTimeout.
  void wait_ready(const Deadline& deadline, const char* call);

  // Checks a call's result, waiting out ncclInProgress.
  void check(nccl::Result r, const char* call, const Deadline& deadline);

  // Collective over every rank of this communicator: ranks with the same color form a new
  // communicator, ordered by key. Returns nullptr for color kSplitNoColor. A `blocking` child
  // enqueues its collectives directly (non-blocking ones go through NCCL's asynchronous path and
  // must be polled, tens of microseconds per call); on a non-blocking parent the split itself
  // still respects the deadline.
  std::unique_ptr<Communicator> split(int color, int key, const Deadline& deadline, bool blocking);

  // Tears the communicator down now, from any thread; pending and later operations fail.
  void abort();
  bool aborted() const { return aborted_.load(); }

 private:
  Communicator(nccl::Comm comm, int rank, int size, int device);

  nccl::Comm comm_ = nullptr;
  int rank_ = 0;
  int size_ = 0;
  int device_ = -1;
  std::atomic<bool> aborted_{false};
  std::mutex abort_mutex_;
};

// Aborts every communicator given (null and already aborted ones are skipped) at once, each on a
// thread of its own (run_concurrently), and returns once all are torn down: a Ctrl-C or a deadline
// should answer within a fraction of a second. NCCL calls on different communicators may run on
// different threads at once.
void abort_concurrently(const std::vector<Communicator*>& communicators);

}  // namespace mdtrt
