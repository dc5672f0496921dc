#include "bindings/errors.h"

#include "bindings/modules.h"
#include "common/error.h"

namespace py = pybind11;

namespace mdtrt::bindings {
namespace {
const char* python_class_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return "InvalidArgumentError";
    case ErrorKind::kLibraryNotFound: return "LibraryNotFoundError";
    case ErrorKind::kNccl: return "NcclError";
    case ErrorKind::kCuda: return "CudaError";
    case ErrorKind::kTensorRT: return "TensorRTError";
    case ErrorKind::kTimeout: return "RankTimeoutError";
    case ErrorKind::kInterrupted:  // raised as the signal handler's exception instead
    case ErrorKind::kGeneric: break;
  }
  return "MdtrtError";
}
}  // namespace

void register_error_translator(py::module_& m) {
  (void)m;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::gil_scoped_acquire gil;
      if (e.kind() == ErrorKind::kInterrupted) {
        raise_interrupt();
        return;
      }
      py::object errors = py::module_::import("mdtrt.errors");
      py::object cls = errors.attr(python_class_name(e.kind()));
      py::object rank = e.rank() >= 0 ? py::object(py::int_(e.rank())) : py::object(py::none());
      py::object exc = cls(e.what(), py::arg("rank") = rank, py::arg("call") = e.call(),
                           py::arg("detail") = e.detail());
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });
}
}  // namespace mdtrt::bindings
