#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings/modules.h"
#include "common/cuda_check.h"
#include "runtime/devices.h"
#include "runtime/gpu_links.h"
#include "runtime/rank_runtime.h"

namespace py = pybind11;

namespace mdtrt::bindings {

void bind_info(py::module_& m) {
  m.def("build_info", [] {
    py::dict d;
    d["version"] = MDTRT_VERSION;
    d["compiler"] = MDTRT_COMPILER;
    d["cuda_version"] = CUDART_VERSION;
#ifdef MDTRT_HAVE_TENSORRT
    d["tensorrt_backend"] = true;
    d["tensorrt_include_dir"] = MDTRT_TENSORRT_INCLUDE_DIR;
#else
    d["tensorrt_backend"] = false;
    d["tensorrt_include_dir"] = "";
#endif
    d["tensorrt_reason"] = MDTRT_TENSORRT_REASON;
    return d;
  });

  m.def("query_cuda", [] {
    CudaInfo info;
    {
      py::gil_scoped_release release;
      info = query_cuda();
    }
    py::dict d;
    d["driver_version"] = info.driver_version;
    d["runtime_version"] = info.runtime_version;
    d["error"] = info.error;
    py::list gpus;
    for (const auto& g : info.gpus) {
      py::dict gd;
      gd["index"] = g.index;
      gd["name"] = g.name;
      gd["compute_capability"] = py::make_tuple(g.cc_major, g.cc_minor);
      gd["total_memory"] = g.total_memory;
      gd["pci_bus_id"] = g.pci_bus_id;
      gpus.append(gd);
    }
    d["gpus"] = gpus;
    d["peer_access"] = info.peer_access;
    d["peer_links"] = link_kind_names(info.peer_links.kinds);
    d["peer_links_reason"] = info.peer_links.unknown_reason;
    return d;
  });
  m.def(
      "nvml_status",
      [] {
        NvmlStatus status;
        {
          py::gil_scoped_release release;
          status = nvml_status();  // the first call opens and initializes NVML
        }
        py::dict d;
        d["available"] = status.available;
        d["path"] = status.path;
        d["found_by"] = status.found_by;
        d["error"] = status.error;
        return d;
      },
      "NVML in this process (opened once, on first use): available, path, found_by, error (why not).");
  m.def("visible_gpu_count", &visible_gpu_count);
  m.def("describe_cuda_problem", &describe_cuda_problem, py::arg("error"), py::arg("driver_version"),
        py::arg("runtime_version"), "What stops CUDA, in words (query_cuda's error and versions); '' when nothing.");
  m.def("describe_no_gpu", &describe_no_gpu, py::arg("error"), py::arg("driver_version"), py::arg("runtime_version"),
        "Why no GPU is visible, in words (query_cuda's error and versions, CUDA_VISIBLE_DEVICES).");
  m.def(
      "rank_runtime_settings",
      [](int local_ranks) {
        const RankRuntimeSettings s = rank_runtime_settings(local_ranks);
        py::dict d;
        d["spin_us"] = s.spin_micros;
        d["poll_us"] = s.poll_micros;
        d["stream_priority"] = s.high_priority_streams ? "high" : "normal";
        return d;
      },
      py::arg("local_ranks"),
      "The rank threads' settings a group of local_ranks GPUs created now takes from MDTRT_RANK_SPIN_US, "
      "MDTRT_RANK_POLL_US and MDTRT_STREAM_PRIORITY (the spin defaults depend on local_ranks); InvalidArgumentError "
      "for a value a group would refuse.");

  m.def(
      "pointer_device", [](uintptr_t ptr) { return pointer_device(reinterpret_cast<const void*>(ptr)); },
      "-1 for host memory (pageable or pinned), else the CUDA device that owns the allocation.");
  // The calling thread's current device (DLPack producers export for the current device's streams).
  m.def("current_device", [] {
    int device = 0;
    MDTRT_CUDA_CHECK(cudaGetDevice(&device));
    return device;
  });
  m.def("set_current_device", [](int device) { MDTRT_CUDA_CHECK(cudaSetDevice(device)); });
  m.def("copy_device_to_host", [](uintptr_t ptr, int device, size_t nbytes) {
    py::array_t<uint8_t> out(static_cast<py::ssize_t>(nbytes));
    void* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      copy_device_to_host(dst, reinterpret_cast<const void*>(ptr), device, nbytes);
    }
    return out;
  });
}

}  // namespace mdtrt::bindings
