#include "runtime/test_programs.h"

#include "common/error.h"

namespace mdtrt {

void BarrierBindProgram::bind(RankContext& ctx) {
  std::unique_lock<std::mutex> lock(mutex_);
  ++arrived_;
  changed_.notify_all();
  bool released = changed_.wait_until(lock, ctx.deadline.at(), [&] { return aborted_ || arrived_ >= num_ranks_; });
  if (aborted_) throw Error(ErrorKind::kGeneric, "barrier aborted", ctx.rank, "bind");
  if (!released) throw Error(ErrorKind::kTimeout, "barrier not reached by every rank", ctx.rank, "bind");
}

void BarrierBindProgram::abort() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
  }
  changed_.notify_all();
}

int BarrierBindProgram::arrived() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return arrived_;
}

void FailingBindProgram::bind(RankContext& ctx) {
  if (ctx.rank == fail_rank_) throw Error(ErrorKind::kGeneric, message_, -1, "bind");
}

}  // namespace mdtrt
