// Ctrl-C for the native waits: the check csrc/common/interrupt.h polls runs Python's signal
// handlers (PyErr_CheckSignals, with the GIL taken for that moment only). The exception a handler
// raised (KeyboardInterrupt for Ctrl-C) is kept and raised again when the interrupted call returns
// to Python.
#include <pybind11/pybind11.h>

#include <mutex>

#include "bindings/modules.h"
#include "common/interrupt.h"

namespace py = pybind11;

namespace mdtrt::bindings {
namespace {
std::mutex pending_mutex;
PyObject* pending_type = nullptr;  // the handler's exception, owned references
PyObject* pending_value = nullptr;
PyObject* pending_traceback = nullptr;

bool interpreter_running() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsInitialized() && !Py_IsFinalizing();
#else
  return Py_IsInitialized() && !_Py_IsFinalizing();
#endif
}

bool python_signal_pending() {
  if (!interpreter_running()) return false;
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() == 0) return false;
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  std::lock_guard<std::mutex> lock(pending_mutex);
  Py_XDECREF(pending_type);
  Py_XDECREF(pending_value);
  Py_XDECREF(pending_traceback);
  pending_type = type;
  pending_value = value;
  pending_traceback = traceback;
  return true;
}
}  // namespace

void raise_interrupt() {
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  {
    std::lock_guard<std::mutex> lock(pending_mutex);
    std::swap(type, pending_type);
    std::swap(value, pending_value);
    std::swap(traceback, pending_traceback);
  }
  if (type != nullptr) {
    PyErr_Restore(type, value, traceback);  // steals the references
  } else {
    PyErr_SetNone(PyExc_KeyboardInterrupt);
  }
}

void install_interrupt_check() { set_interrupt_check(python_signal_pending); }

}  // namespace mdtrt::bindings
