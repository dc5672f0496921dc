// Bindings of the NCCL layer: library discovery, unique ids and their exchange through a file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "bindings/modules.h"
#include "nccl/communicator.h"
#include "nccl/nccl_library.h"
#include "nccl/unique_id_file.h"

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
        d["version"] = version_string(info->version);
        d["found_by"] = info->found_by;
        d["attempts"] = info->attempts;
        return d;
      },
      py::arg("extra_dirs") = std::vector<std::string>{},
      "Find and open NCCL (once per process); returns where it was found and every attempt.");
  m.def("nccl_required_symbols", &nccl::required_symbols);
  m.def("nccl_failed_attempts", &nccl::failed_attempts,
        "Every attempt of the last NCCL search that found no usable library (empty when none failed).");
  m.def(
      "nccl_loaded_copies",
      [] {
        py::list out;
        for (const auto& copy : nccl::loaded_copies()) {
          py::dict d;
          d["path"] = copy.path;
          d["version_code"] = copy.version;
          d["version"] = version_string(copy.version);
          out.append(d);
        }
        return out;
      },
      "Every NCCL library mapped into this process (by any library), with its version.");
  m.def("nccl_is_loaded", &nccl::is_loaded);

  m.def("nccl_unique_id", [] {
    nccl::UniqueId id = nccl_unique_id();
    return py::bytes(id.internal, sizeof(id.internal));
  });

  m.def("check_unique_id_file_path", &check_unique_id_file_path, py::arg("path"), py::arg("rank") = -1,
        "Raise InvalidArgumentError for an NCCL id file path rank 0 cannot write (a directory, a missing folder).");
  m.def(
      "exchange_unique_id_via_file",
      [](const std::string& path, int rank, double timeout, const std::string& run_token) {
        nccl::UniqueId id{};
        {
          py::gil_scoped_release release;
          id = exchange_unique_id_via_file(path, rank, Deadline::after_seconds(timeout), run_token);
        }
        return py::bytes(id.internal, sizeof(id.internal));
      },
      py::arg("path"), py::arg("rank"), py::arg("timeout"), py::arg("run_token") = "",
      "Rank 0 writes a new NCCL unique id to `path` (replacing an earlier run's file); other ranks wait for "
      "this run's id (`run_token`: the launcher's run id, or empty).");
  m.def(
      "remove_unique_id_file",
      [](const std::string& path, const py::bytes& id) {
        remove_unique_id_file(path, unique_id_from_bytes(std::string(id)));
      },
      py::arg("path"), py::arg("unique_id"), "Removes the id file when it still holds `unique_id`.");

  m.def(
      "publish_shared_bytes",
      [](const std::string& path, const py::bytes& run, const py::bytes& data) {
        std::string s = data;
        nccl::UniqueId id = unique_id_from_bytes(std::string(run));
        py::gil_scoped_release release;
        publish_shared_bytes(path, id, std::vector<uint8_t>(s.begin(), s.end()));
      },
      py::arg("path"), py::arg("run"), py::arg("data"),
      "Rank 0: write `data` to `path`, tagged with the run's NCCL id (through a temporary file and rename).");
  m.def(
      "try_read_shared_bytes",
      [](const std::string& path, const py::bytes& run) -> py::object {
        nccl::UniqueId id = unique_id_from_bytes(std::string(run));
        std::optional<std::vector<uint8_t>> data;
        {
          py::gil_scoped_release release;
          data = try_read_shared_bytes(path, id);
        }
        if (!data) return py::none();
        return py::bytes(reinterpret_cast<const char*>(data->data()), data->size());
      },
      py::arg("path"), py::arg("run"),
      "The bytes rank 0 published at `path` for this run, or None while they are not there.");
}

}  // namespace mdtrt::bindings
