#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/modules.h"
#include "nccl/nccl_library.h"

namespace py = pybind11;

namespace mdtrt::bindings {

void bind_nccl(py::module_& m) {
  // One record type for every run-time library search (NCCL, TensorRT, the ONNX parser).
  py::class_<LoadAttempt>(m, "LoadAttempt")
      .def_readonly("rule", &LoadAttempt::rule)
      .def_readonly("candidate", &LoadAttempt::candidate)
      .def_readonly("loaded", &LoadAttempt::loaded)
      .def_readonly("message", &LoadAttempt::message)
      .def("__repr__", [](const LoadAttempt& a) {
        return "LoadAttempt(rule=" + a.rule + ", candidate=" + a.candidate + ", " + a.message + ")";
      });

  m.def(
      "load_nccl",
      [](const std::vector<std::string>& extra_dirs) {
        const nccl::LibraryInfo* info = nullptr;
        {
          py::gil_scoped_release release;
          info = &nccl::load_library(extra_dirs);
        }
        py::dict d;
        d["path"] = info->path;
        d["version_code"] = info->version;
        d["version"] = nccl::version_string(info->version);
        d["found_by"] = info->found_by;
        d["attempts"] = info->attempts;
        return d;
      },
      py::arg("extra_dirs") = std::vector<std::string>{},
      "Find and open NCCL (once per process); returns where it was found and every attempt.");
  m.def("nccl_required_symbols", &nccl::required_symbols);
  m.def(
      "nccl_loaded_copies",
      [] {
        py::list out;
        for (const auto& copy : nccl::loaded_copies()) {
          py::dict d;
          d["path"] = copy.path;
          d["version_code"] = copy.version;
          d["version"] = nccl::version_string(copy.version);
          out.append(d);
        }
        return out;
      },
      "Every NCCL library mapped into this process (by any library), with its version.");
  m.def("nccl_is_loaded", &nccl::is_loaded);
}

}  // namespace mdtrt::bindings
