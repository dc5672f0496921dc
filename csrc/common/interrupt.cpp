#include "common/interrupt.h"

#include <memory>
#include <mutex>

#include "common/error.h"

namespace mdtrt {
namespace {
std::mutex& check_mutex() {
  static std::mutex m;
  return m;
}
// Shared, so that a wait keeps calling a check that is being replaced without holding the lock.
std::shared_ptr<const std::function<bool()>>& check_slot() {
  static std::shared_ptr<const std::function<bool()>> slot;
  return slot;
}
}  // namespace

void set_interrupt_check(std::function<bool()> check) {
  auto next = check ? std::make_shared<const std::function<bool()>>(std::move(check)) : nullptr;
  std::lock_guard<std::mutex> lock(check_mutex());
  check_slot() = std::move(next);
}

bool interrupt_requested() {
  std::shared_ptr<const std::function<bool()>> check;
  {
    std::lock_guard<std::mutex> lock(check_mutex());
    check = check_slot();
  }
  return check && (*check)();
}

void throw_interrupted(const std::string& what, int rank) {
  throw Error(ErrorKind::kInterrupted, "interrupted (Ctrl-C or a signal) while waiting in '" + what + "'", rank, what);
}

}  // namespace mdtrt
