#include "nccl/communicator.h"

#include <cstring>
#include <thread>

#include "common/concurrently.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "common/scoped_device.h"
#include "nccl/nccl_library.h"

namespace mdtrt {
namespace {

void poll_pause(int& sleep_us) {
  std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
  if (sleep_us < 2000) sleep_us *= 2;
}

std::string list_ranks(const std::vector<int>& ranks) {
  std::string s;
  for (int r : ranks) s += (s.empty() ? "" : ", ") + std::to_string(r);
  return s;
}

}  // namespace

void nccl_check(nccl::Result r, const char* call, nccl::Comm comm) {
  if (r == nccl::kSuccess || r == nccl::kInProgress) return;
  const auto& api = nccl::api();
  std::string message = api.GetErrorString(r);
  const char* last = api.GetLastError(comm);
  if (last != nullptr && last[0] != '\0') message += ": " + std::string(last);
  throw Error(ErrorKind::kNccl, message, -1, call);
}

nccl::UniqueId nccl_unique_id() {
  nccl::UniqueId id{};
  MDTRT_NCCL_CHECK(GetUniqueId, &id);
  return id;
}

nccl::UniqueId unique_id_from_bytes(const std::string& s) {
  if (s.size() != sizeof(nccl::UniqueId))
    throw_invalid_argument("a NCCL unique id is " + std::to_string(sizeof(nccl::UniqueId)) + " bytes, got " +
                           std::to_string(s.size()));
  nccl::UniqueId id{};
  std::memcpy(id.internal, s.data(), sizeof(id.internal));
  return id;
}

Communicator::Communicator(nccl::Comm comm, int rank, int size, int device)
    : comm_(comm), rank_(rank), size_(size), device_(device) {}

std::vector<std::unique_ptr<Communicator>> Communicator::create(const nccl::UniqueId& id, int world_size,
                                                                const std::vector<int>& ranks,
                                                                const std::vector<int>& devices,
                                                                const Deadline& deadline) {
  const auto& api = nccl::api();
  std::vector<nccl::Comm> comms(ranks.size(), nullptr);
  std::vector<std::unique_ptr<Communicator>> out;
  {
    ScopedDevice restore(-1);
    MDTRT_NCCL_CHECK(GroupStart);
    for (size_t i = 0; i < ranks.size(); ++i) {
      MDTRT_CUDA_CHECK(cudaSetDevice(devices[i]));
      nccl::Config config;
      config.blocking = 0;
      nccl::Result r = api.CommInitRankConfig(&comms[i], world_size, id, ranks[i], &config);
      if (r != nccl::kSuccess && r != nccl::kInProgress) {
        MDTRT_NCCL_IGNORE(GroupEnd);
        nccl_check(r, "ncclCommInitRankConfig");
      }
    }
    MDTRT_NCCL_CHECK(GroupEnd);
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    out.emplace_back(new Communicator(comms[i], ranks[i], world_size, devices[i]));
  }
  // Poll every communicator until initialised; on the deadline abort them all and say which
  // ranks were still waiting.
  std::vector<bool> ready(out.size(), false);
  int sleep_us = 50;
  auto next_interrupt_check = Deadline::Clock::now() + kInterruptPollInterval;
  for (;;) {
    bool all = true;
    for (size_t i = 0; i < out.size(); ++i) {
      if (ready[i]) continue;
      nccl::Result state = nccl::kSuccess;
      MDTRT_NCCL_CHECK_COMM(out[i]->comm_, CommGetAsyncError, out[i]->comm_, &state);
      if (state == nccl::kInProgress) {
        all = false;
      } else {
        nccl_check(state, "ncclCommInitRankConfig", out[i]->comm_);
        ready[i] = true;
      }
    }
    if (all) return out;
    if (deadline.passed()) {
      std::vector<int> waiting;
      for (size_t i = 0; i < out.size(); ++i)
        if (!ready[i]) waiting.push_back(ranks[i]);
      for (auto& c : out) c->abort();
      throw Error(ErrorKind::kTimeout,
                  "NCCL communicator set-up did not complete before the deadline; rank(s) " + list_ranks(waiting) +
                      " of " + std::to_string(world_size) +
                      " were still waiting for their peers. Check that every rank was started (world size " +
                      std::to_string(world_size) +
                      "), that they share one unique id, or raise the timeout.",
                  -1, "ncclCommInitRankConfig");
    }
    if (Deadline::Clock::now() >= next_interrupt_check) {
      if (interrupt_requested()) {
        for (auto& c : out) c->abort();
        throw_interrupted("ncclCommInitRankConfig");
      }
      next_interrupt_check = Deadline::Clock::now() + kInterruptPollInterval;
    }
    poll_pause(sleep_us);
  }
}

Communicator::~Communicator() {
  if (comm_ == nullptr) return;
  const auto& api = nccl::api();
  if (aborted_.load()) return;  // abort() already released it
  // Finalize flushes outstanding work; in non-blocking mode it may return ncclInProgress, so poll
  // with a bounded wait and fall back to abort rather than hang in a destructor.
  nccl::Result r = api.CommFinalize(comm_);
  if (r == nccl::kSuccess || r == nccl::kInProgress) {
    Deadline deadline = Deadline::after_seconds(10.0);
    int sleep_us = 50;
    nccl::Result state = nccl::kInProgress;
    while (api.CommGetAsyncError(comm_, &state) == nccl::kSuccess && state == nccl::kInProgress &&
           !deadline.passed()) {
      poll_pause(sleep_us);
    }
    if (state == nccl::kSuccess) {
      MDTRT_NCCL_IGNORE(CommDestroy, comm_);
      comm_ = nullptr;
      return;
    }
  }
  abort();
}

void Communicator::abort() {
  std::lock_guard<std::mutex> lock(abort_mutex_);
  if (aborted_.exchange(true) || comm_ == nullptr) return;
  MDTRT_NCCL_IGNORE(CommAbort, comm_);
}

void abort_concurrently(const std::vector<Communicator*>& communicators) {
  std::vector<std::function<void()>> steps;
  for (Communicator* c : communicators)
    if (c != nullptr && !c->aborted()) steps.emplace_back([c] { c->abort(); });
  run_concurrently(steps);
}

void Communicator::wait_ready(const Deadline& deadline, const char* call) {
  // Enqueued collectives leave ncclInProgress within microseconds: spin first, so that a small
  // collective does not pay a sleep, and only back off to sleeping for slow steps (init, split).
  const auto spin_until = Deadline::Clock::now() + std::chrono::microseconds(200);
  int sleep_us = 20;
  for (;;) {
    if (aborted_.load())
      throw Error(ErrorKind::kNccl, "the communicator was aborted (a deadline passed or another rank failed)",
                  rank_, call);
    nccl::Result state = nccl::kSuccess;
    MDTRT_NCCL_CHECK_COMM(comm_, CommGetAsyncError, comm_, &state);
    if (state != nccl::kInProgress) {
      nccl_check(state, call, comm_);
      return;
    }
    if (deadline.passed()) {
      abort();
      throw Error(ErrorKind::kTimeout, "NCCL operation still in progress at the deadline; communicator aborted",
                  rank_, call);
    }
    if (Deadline::Clock::now() < spin_until) {
      std::this_thread::yield();
    } else {
      poll_pause(sleep_us);
    }
  }
}

void Communicator::check(nccl::Result r, const char* call, const Deadline& deadline) {
  if (r == nccl::kInProgress) {
    wait_ready(deadline, call);
    return;
  }
  nccl_check(r, call, comm_);
}

std::unique_ptr<Communicator> Communicator::split(int color, int key, const Deadline& deadline, bool blocking) {
  nccl::Comm child = nullptr;
  nccl::Config config;
  config.blocking = blocking ? 1 : 0;
  ScopedDevice on(device_);
  MDTRT_NCCL_CHECK_ON(*this, deadline, CommSplit, comm_, color, key, &child, &config);
  wait_ready(deadline, "ncclCommSplit");
  if (child == nullptr) return nullptr;
  std::unique_ptr<Communicator> out(new Communicator(child, 0, 0, device_));
  out->wait_ready(deadline, "ncclCommSplit");
  MDTRT_NCCL_CHECK_COMM(child, CommUserRank, child, &out->rank_);
  MDTRT_NCCL_CHECK_COMM(child, CommCount, child, &out->size_);
  return out;
}

}  // namespace mdtrt
