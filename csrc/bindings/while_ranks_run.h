#pragma once
// A native run that calls a Python callable back while its ranks run (AddressedRun.__call__'s
// while_ranks_run), shared with _core.testing so that a CPU test runs this very code.
#include <pybind11/pybind11.h>

#include <exception>
#include <functional>
#include <optional>
#include <utility>

namespace mdtrt::bindings {

// Runs run(meanwhile) with the GIL released; `meanwhile` calls `callback` with the GIL taken for
// it. A Python error the callback raises (mdtrt's callables drop only torch's out-of-memory error:
// what escapes is Ctrl-C while it ran, KeyboardInterrupt or what an application's SIGINT handler
// raises, or an allocation's other failure) makes `meanwhile` throw, so that no rank launches
// (run_checked_then_launched), and is raised once run returned, never while the ranks run. When
// run raised an error of its own first (a rank's failed check), the callback's error is still the
// one raised, with run's as its __context__: a Ctrl-C must not be lost to an error that a caller
// may catch and go on after.
inline void run_calling_back(const pybind11::object& callback,
                             const std::function<void(const std::function<void()>&)>& run) {
  namespace py = pybind11;
  struct CallbackRaised {};  // thrown through the native run, which carries no Python object
  std::optional<py::error_already_set> raised;
  const std::function<void()> meanwhile = [&] {
    py::gil_scoped_acquire gil;
    try {
      callback();
      return;
    } catch (py::error_already_set& e) {
      raised.emplace(std::move(e));
    }
    throw CallbackRaised{};
  };
  try {
    py::gil_scoped_release release;
    run(meanwhile);
  } catch (const CallbackRaised&) {
    throw std::move(*raised);
  } catch (...) {
    if (!raised) throw;
    // run's error as Python has it: a function that rethrows it, called through pybind11, comes
    // back translated (mdtrt's exception classes) as an error_already_set.
    const std::exception_ptr native = std::current_exception();
    try {
      py::cpp_function([native] { std::rethrow_exception(native); })();
    } catch (py::error_already_set& e) {
      PyException_SetContext(raised->value().ptr(), e.value().inc_ref().ptr());  // steals the reference
    }
    throw std::move(*raised);
  }
  if (raised) throw std::move(*raised);
}

}  // namespace mdtrt::bindings
