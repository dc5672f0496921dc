// Bindings of the TensorRT backend (csrc/trt). Compiled with and without TensorRT headers: without
// them every entry point raises LibraryNotFoundError saying how to rebuild, while library discovery
// (which needs no header) stays available under _core.testing for the tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bindings/modules.h"
#include "common/error.h"
#include "runtime/dtype.h"
#include "trt/trt_library.h"

#ifdef MDTRT_HAVE_TENSORRT
#include <NvOnnxParser.h>

#include "runtime/collective_program.h"
#include "trt/engine_program.h"
#include "trt/logger.h"
#include "trt/network_builder.h"
#endif

namespace py = pybind11;

namespace mdtrt::bindings {
namespace {

py::dict library_dict(const trt::LibraryInfo& info) {
  py::dict d;
  d["path"] = info.path;
  d["version_code"] = info.version;
  d["version"] = version_string(info.version);
  d["found_by"] = info.found_by;
  d["lean"] = info.lean;
  d["attempts"] = info.attempts;
  d["header_version"] = trt::header_version() ? version_string(trt::header_version()) : std::string();
  return d;
}

py::dict load_tensorrt_dict(const std::vector<std::string>& extra_dirs, const std::vector<std::string>& lean_extra_dirs,
                            bool require_builder) {
  const trt::LibraryInfo* info = nullptr;
  {
    py::gil_scoped_release release;
    info = &trt::load_library(extra_dirs, lean_extra_dirs);
    if (require_builder) trt::require_builder();
  }
  return library_dict(*info);
}

#ifdef MDTRT_HAVE_TENSORRT

// Holds a Python progress callable for a build that runs with the GIL released. The C++ callback
// refers to the Python object without owning a reference, so copies of it never touch reference
// counts off the GIL; the caller keeps the object alive for the whole build.
trt::ProgressCallback python_progress(const py::object& progress) {
  PyObject* fn = progress.ptr();
  return [fn](trt::ProgressEvent event, const std::string& phase, const std::string& parent, int step,
              int nb_steps) {
    py::gil_scoped_acquire gil;
    const char* name = event == trt::ProgressEvent::kPhaseStart ? "start"
                       : event == trt::ProgressEvent::kStep     ? "step"
                                                                : "finish";
    py::object result = py::reinterpret_borrow<py::object>(fn)(name, phase, parent, step, nb_steps);
    return result.is_none() || result.cast<bool>();
  };
}

// progress: None/False = silent, True = C++ line log, a callable = forwarded.
trt::BuildOptions build_options(const py::object& progress, size_t workspace, const std::string& timing_cache,
                                int device, bool version_compatible, bool exclude_lean_runtime) {
  trt::BuildOptions options;
  options.workspace_bytes = workspace;
  options.timing_cache_path = timing_cache;
  options.device = device;
  options.version_compatible = version_compatible;
  options.exclude_lean_runtime = exclude_lean_runtime;
  if (progress.is_none() || (py::isinstance<py::bool_>(progress) && !progress.cast<bool>())) {
    options.show_progress = false;
  } else if (!py::isinstance<py::bool_>(progress)) {
    options.progress = python_progress(progress);
  }
  return options;
}

py::bytes to_bytes(const std::vector<uint8_t>& plan) {
  return py::bytes(reinterpret_cast<const char*>(plan.data()), plan.size());
}

std::vector<trt::EngineBytes> engines_from_python(const py::list& engines) {
  // The same Python object on several ranks becomes one shared buffer: a shared engine is copied
  // once, not once per rank.
  std::map<PyObject*, trt::EngineBytes> seen;
  std::vector<trt::EngineBytes> out;
  for (const py::handle& e : engines) {
    auto it = seen.find(e.ptr());
    if (it == seen.end()) {
      py::buffer_info buf = py::reinterpret_borrow<py::buffer>(e).request();
      const auto* begin = static_cast<const uint8_t*>(buf.ptr);
      auto bytes = std::make_shared<const std::vector<uint8_t>>(begin, begin + buf.size * buf.itemsize);
      it = seen.emplace(e.ptr(), std::move(bytes)).first;
    }
    out.push_back(it->second);
  }
  return out;
}

py::dict tensor_dict(const trt::EngineTensor& t) {
  py::dict d;
  d["name"] = t.name;
  d["is_input"] = t.is_input;
  d["dtype"] = dtype_name(t.dtype);
  d["shape"] = py::tuple(py::cast(t.shape));
  d["profile_min"] = t.is_input ? py::object(py::tuple(py::cast(t.profile_min))) : py::object(py::none());
  d["profile_max"] = t.is_input ? py::object(py::tuple(py::cast(t.profile_max))) : py::object(py::none());
  return d;
}

void bind_backend(py::module_& m) {
  m.def("load_tensorrt", &load_tensorrt_dict, py::arg("extra_dirs") = std::vector<std::string>{},
        py::arg("lean_extra_dirs") = std::vector<std::string>{}, py::arg("require_builder") = false,
        "Find and open TensorRT (once per process); returns where it was found and every attempt.");
  m.def(
      "load_onnx_parser",
      [](const std::vector<std::string>& extra_dirs) {
        const trt::ParserInfo* info = nullptr;
        {
          py::gil_scoped_release release;
          info = &trt::load_onnx_parser(extra_dirs);
        }
        py::dict d;
        d["path"] = info->path;
        d["version_code"] = info->version;
        d["found_by"] = info->found_by;
        d["note"] = info->note;
        d["attempts"] = info->attempts;
        return d;
      },
      py::arg("extra_dirs") = std::vector<std::string>{});
  m.def("tensorrt_nccl_warning", &trt::nccl_warning);

  m.def("tensorrt_drain_log", [] {
    py::list out;
    for (auto& msg : trt::logger().drain()) out.append(py::make_tuple(static_cast<int>(msg.severity), msg.text));
    return out;
  });
  m.def("tensorrt_set_log_severity", [](int severity) {
    if (severity < 0 || severity > static_cast<int>(nvinfer1::ILogger::Severity::kVERBOSE))
      throw_invalid_argument("TensorRT log severities are 0 (internal error) to 4 (verbose), got " + std::to_string(severity));
    trt::logger().set_min_severity(static_cast<nvinfer1::ILogger::Severity>(severity));
  });

  m.def(
      "tensorrt_build_dist_collective",
      [](const std::string& op, const std::string& reduce, int root, const std::vector<int>& groups, int nb_ranks,
         const std::string& dtype, const Shape& shape, bool transpose, const py::object& progress, size_t workspace,
         const std::string& timing_cache, int device, bool version_compatible, bool exclude_lean_runtime) {
        CollectiveSpec spec;
        spec.op = collective_op_from_name(op);
        spec.reduce = op_reduces(spec.op) ? reduce_op_from_name(reduce) : ReduceOp::kNone;
        spec.root = root;
        spec.groups = groups;
        const DType type = dtype_from_name(dtype);
        trt::BuildOptions options =
            build_options(progress, workspace, timing_cache, device, version_compatible, exclude_lean_runtime);
        std::vector<uint8_t> plan;
        {
          py::gil_scoped_release release;
          plan = trt::build_dist_collective_engine(spec, type, shape, nb_ranks, transpose, options);
        }
        return to_bytes(plan);
      },
      py::arg("op"), py::arg("reduce"), py::arg("root"), py::arg("groups"), py::arg("nb_ranks"), py::arg("dtype"),
      py::arg("shape"), py::arg("transpose"), py::arg("progress"), py::arg("workspace") = 0,
      py::arg("timing_cache") = "", py::arg("device") = -1, py::arg("version_compatible") = false,
      py::arg("exclude_lean_runtime") = false);

  m.def(
      "tensorrt_build_from_onnx",
      [](const py::bytes& model, const std::string& model_path,
         const std::map<std::string, std::tuple<Shape, Shape, Shape>>& profiles, const py::object& progress,
         size_t workspace, const std::string& timing_cache, const std::vector<std::string>& parser_extra_dirs,
         int device, bool version_compatible, bool exclude_lean_runtime) {
        std::string bytes = model;
        trt::BuildOptions options =
            build_options(progress, workspace, timing_cache, device, version_compatible, exclude_lean_runtime);
        std::vector<uint8_t> plan;
        {
          py::gil_scoped_release release;
          plan = trt::build_engine_from_onnx(bytes, model_path, profiles, options, parser_extra_dirs);
        }
        return to_bytes(plan);
      },
      py::arg("model"), py::arg("model_path"), py::arg("profiles"), py::arg("progress"), py::arg("workspace") = 0,
      py::arg("timing_cache") = "", py::arg("parser_extra_dirs") = std::vector<std::string>{},
      py::arg("device") = -1, py::arg("version_compatible") = false, py::arg("exclude_lean_runtime") = false);

  m.def(
      "tensorrt_inspect_engine",
      [](const py::buffer& engine, int device, bool allow_host_code) {
        py::buffer_info buf = engine.request();
        std::vector<trt::EngineTensor> tensors;
        {
          py::gil_scoped_release release;
          tensors = trt::inspect_engine(buf.ptr, static_cast<size_t>(buf.size * buf.itemsize), device, allow_host_code);
        }
        py::list out;
        for (const auto& t : tensors) out.append(tensor_dict(t));
        return out;
      },
      py::arg("engine"), py::arg("device") = 0, py::arg("allow_host_code") = false,
      "Deserialize a plan on `device` (no DeviceGroup) and list its IO tensors; raises if it does not load.");

  py::class_<trt::EngineProgram, RankProgram, std::shared_ptr<trt::EngineProgram>>(m, "EngineProgram")
      .def(py::init([](const py::list& engines, bool multi_device, bool allow_host_code) {
             return std::make_shared<trt::EngineProgram>(engines_from_python(engines), multi_device, allow_host_code);
           }),
           py::arg("engines"), py::arg("multi_device") = true, py::arg("allow_host_code") = false,
           "One serialized engine per local rank (the same bytes object for a shared engine).")
      .def_property_readonly("multi_device", &trt::EngineProgram::multi_device)
      .def_property_readonly("allow_host_code", &trt::EngineProgram::allow_host_code)
      .def_property_readonly("shape_changes", &trt::EngineProgram::shape_changes)
      .def_property_readonly("num_engines", &trt::EngineProgram::num_engines);
}

#else  // no TensorRT headers

[[noreturn]] void no_backend() {
  throw Error(ErrorKind::kLibraryNotFound,
              std::string("mdtrt was built without the TensorRT backend: ") + MDTRT_TENSORRT_REASON +
                  "; rebuild with TensorRT 11 headers (TensorRT_ROOT or TensorRT_INCLUDE_DIR)",
              -1, "TensorRT backend");
}

void bind_backend(py::module_& m) {
  // Same names as the real entry points, so that callers fail with the reason, not AttributeError.
  for (const char* name : {"load_tensorrt", "load_onnx_parser", "tensorrt_build_dist_collective",
                           "tensorrt_build_from_onnx", "tensorrt_inspect_engine", "EngineProgram",
                           "tensorrt_nccl_warning", "tensorrt_set_log_severity"}) {
    m.def(name, [](py::args, py::kwargs) { no_backend(); });
  }
  m.def("tensorrt_drain_log", [] { return py::list(); });
}

#endif

}  // namespace

void bind_trt(py::module_& m) {
  bind_backend(m);
  // The pip commands the library errors name, for the Python layer's own messages (one wording).
  m.attr("TENSORRT_INSTALL_FULL") = trt::kInstallFull;
  m.attr("TENSORRT_INSTALL_LEAN") = trt::kInstallLean;
  m.attr("TENSORRT_FULL_FROM_NVIDIA_INDEX") = trt::kFullFromNvidiaIndex;
  // Discovery is compiled in every build: what the last failed search tried, for the doctor.
  m.def("tensorrt_failed_attempts", &trt::failed_attempts,
        "Every attempt of the last TensorRT search that found no usable library (empty when none failed).");
}

void bind_trt_testing(py::module_& testing) {
  testing.def("load_tensorrt", &load_tensorrt_dict, py::arg("extra_dirs") = std::vector<std::string>{},
              py::arg("lean_extra_dirs") = std::vector<std::string>{}, py::arg("require_builder") = false,
              "TensorRT discovery alone (built with or without the backend): the tests' fake libraries.");
  testing.def("tensorrt_required_symbols", &trt::required_symbols);
  testing.def("tensorrt_builder_symbol", [] { return std::string(trt::builder_symbol()); });
  testing.def("tensorrt_header_major", &trt::header_major);
  testing.def("tensorrt_header_version", &trt::header_version);
  testing.def("onnx_parser_header_version", &trt::parser_header_version);
#ifdef MDTRT_HAVE_TENSORRT
  testing.def(
      "tensorrt_error_text",
      [](const std::string& message, bool from_other_thread) {
        // A call in an ErrorScope during which `message` is logged as an error, on the calling
        // thread or on a thread of its own (as TensorRT's worker threads do): what its exception says.
        py::gil_scoped_release release;
        trt::ErrorScope scope;
        auto log = [&] { trt::logger().log(nvinfer1::ILogger::Severity::kERROR, message.c_str()); };
        if (from_other_thread) {
          std::thread worker(log);
          worker.join();
        } else {
          log();
        }
        return trt::with_trt_error("the call");
      },
      py::arg("message"), py::arg("from_other_thread"));
#endif
}

}  // namespace mdtrt::bindings
