// Bindings of the rank runtime: DeviceGroup, programs, ProgramRunner, and test-only helpers.
// Arguments are converted while holding the GIL; every blocking call releases it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>

#include "bindings/modules.h"
#include "common/error.h"
#include "nccl/unique_id_file.h"
#include "runtime/collective_program.h"
#include "runtime/device_group.h"
#include "runtime/program_runner.h"
#include "runtime/test_programs.h"

namespace py = pybind11;

namespace mdtrt::bindings {
namespace {

nccl::UniqueId unique_id_from_bytes(const py::bytes& b) {
  std::string s = b;
  if (s.size() != sizeof(nccl::UniqueId))
    throw_invalid_argument("a NCCL unique id is " + std::to_string(sizeof(nccl::UniqueId)) + " bytes, got " +
                           std::to_string(s.size()));
  nccl::UniqueId id{};
  std::memcpy(id.internal, s.data(), sizeof(id.internal));
  return id;
}

InferOptions infer_options(const std::string& replication, bool poison_outputs, const std::vector<int>& fetch_ranks,
                           bool device_outputs, double timeout, std::vector<std::vector<OutputArg>> outputs) {
  InferOptions options;
  options.replication = replication_from_name(replication);
  options.poison_outputs = poison_outputs;
  options.fetch_ranks = fetch_ranks;
  options.device_outputs = device_outputs;
  options.timeout_seconds = timeout;
  options.outputs = std::move(outputs);
  return options;
}

py::list specs_to_list(const std::vector<TensorSpec>& specs) {
  py::list out;
  for (const auto& s : specs) out.append(py::make_tuple(s.name, dtype_name(s.dtype), py::tuple(py::cast(s.shape))));
  return out;
}

// Holds a RankRuntime without GPUs, for the CPU tests of the runtime.
void run_bind_test(int num_ranks, const std::string& program, bool sequential, double timeout, int fail_rank) {
  std::vector<int> devices(num_ranks, -1), ranks(num_ranks);
  for (int i = 0; i < num_ranks; ++i) ranks[i] = i;
  RankRuntime runtime(devices, ranks, num_ranks);
  std::vector<std::shared_ptr<RankProgram>> programs;
  if (program == "barrier") {
    auto barrier = std::make_shared<BarrierBindProgram>(num_ranks);
    programs.assign(num_ranks, barrier);
  } else if (program == "fail") {
    programs.assign(num_ranks, std::make_shared<FailingBindProgram>(fail_rank, "injected failure"));
  } else {
    throw_invalid_argument("unknown test program " + program);
  }
  bind_programs(runtime, programs, timeout, sequential);
}

}  // namespace

void bind_runtime(py::module_& m) {
  m.def("nccl_unique_id", [] {
    nccl::UniqueId id = nccl_unique_id();
    return py::bytes(id.internal, sizeof(id.internal));
  });

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
      [](const std::string& path, const py::bytes& id) { remove_unique_id_file(path, unique_id_from_bytes(id)); },
      py::arg("path"), py::arg("unique_id"), "Removes the id file when it still holds `unique_id`.");

  m.def(
      "publish_shared_bytes",
      [](const std::string& path, const py::bytes& run, const py::bytes& data) {
        std::string s = data;
        nccl::UniqueId id = unique_id_from_bytes(run);
        py::gil_scoped_release release;
        publish_shared_bytes(path, id, std::vector<uint8_t>(s.begin(), s.end()));
      },
      py::arg("path"), py::arg("run"), py::arg("data"),
      "Rank 0: write `data` to `path`, tagged with the run's NCCL id (through a temporary file and rename).");
  m.def(
      "try_read_shared_bytes",
      [](const std::string& path, const py::bytes& run) -> py::object {
        nccl::UniqueId id = unique_id_from_bytes(run);
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

  py::class_<DeviceGroup, std::shared_ptr<DeviceGroup>>(m, "DeviceGroup")
      .def_static(
          "create_local",
          [](const std::vector<int>& devices, double timeout) {
            py::gil_scoped_release release;
            return std::shared_ptr<DeviceGroup>(DeviceGroup::create_local(devices, timeout));
          },
          py::arg("devices"), py::arg("timeout"))
      .def_static(
          "create_member",
          [](const std::vector<int>& devices, const std::vector<int>& ranks, int world_size, const py::bytes& id,
             double timeout) {
            nccl::UniqueId uid = unique_id_from_bytes(id);
            py::gil_scoped_release release;
            return std::shared_ptr<DeviceGroup>(DeviceGroup::create_member(devices, ranks, world_size, uid, timeout));
          },
          py::arg("devices"), py::arg("ranks"), py::arg("world_size"), py::arg("unique_id"), py::arg("timeout"))
      .def_property_readonly("num_local_ranks", &DeviceGroup::num_local_ranks)
      .def_property_readonly("world_size", &DeviceGroup::world_size)
      .def_property_readonly("timeout", &DeviceGroup::timeout)
      .def_property_readonly("devices", [](DeviceGroup& g) { return g.runtime().devices(); })
      .def_property_readonly("ranks", [](DeviceGroup& g) { return g.runtime().ranks(); })
      .def_property_readonly("all_peer_access", &DeviceGroup::all_peer_access)
      .def("peer_access", &DeviceGroup::peer_access)
      .def_property_readonly("broken", [](DeviceGroup& g) { return g.runtime().broken(); })
      .def_property_readonly("broken_reason", [](DeviceGroup& g) { return g.runtime().broken_reason(); })
      .def("comm_ptr", [](DeviceGroup& g, int local) { return reinterpret_cast<uintptr_t>(g.world(local).handle()); })
      .def("comm_capsule",
           [](DeviceGroup& g, int local) {
             // The form TensorRT's Python IExecutionContext.set_communicator takes. The capsule holds
             // the communicator (its context): TensorRT requires it to outlive the contexts it is
             // given to, so it lives as long as the capsule does, also after the group is closed.
             std::shared_ptr<Communicator> comm = g.world_shared(local);
             py::capsule capsule(static_cast<void*>(comm->handle()), "ncclComm_t", [](PyObject* o) {
               delete static_cast<std::shared_ptr<Communicator>*>(PyCapsule_GetContext(o));
             });
             PyCapsule_SetContext(capsule.ptr(), new std::shared_ptr<Communicator>(std::move(comm)));
             return capsule;
           })
      .def("stream_ptr",
           [](DeviceGroup& g, int local) { return reinterpret_cast<uintptr_t>(g.runtime().context(local).stream); })
      .def("abort",
           [](DeviceGroup& g) {
             py::gil_scoped_release release;
             g.abort();
           })
      .def("close", [](DeviceGroup& g) {
        py::gil_scoped_release release;  // waits for a step in flight
        g.close();
      });

  py::class_<RankProgram, std::shared_ptr<RankProgram>>(m, "RankProgram").def("describe", &RankProgram::describe);

  py::class_<CollectiveProgram, RankProgram, std::shared_ptr<CollectiveProgram>>(m, "CollectiveProgram")
      .def(py::init([](const std::string& op, const std::string& reduce, int root, const std::vector<int>& groups,
                       const std::string& dtype, int world_size, int num_local_ranks) {
             CollectiveSpec spec;
             spec.op = collective_op_from_name(op);
             spec.reduce = reduce_op_from_name(reduce);
             spec.root = root;
             spec.groups = groups;
             return std::make_shared<CollectiveProgram>(spec, dtype_from_name(dtype), world_size, num_local_ranks);
           }),
           py::arg("op"), py::arg("reduce"), py::arg("root"), py::arg("groups"), py::arg("dtype"),
           py::arg("world_size"), py::arg("num_local_ranks"));

  py::enum_<DType> dtypes(m, "DType", "Element types, one table (csrc/runtime/dtype.cpp) for Python, NCCL and TensorRT.");
  for (DType t : all_dtypes()) dtypes.value(dtype_name(t), t);
  m.def(
      "dtype_sizes",
      [] {
        py::dict out;
        for (DType t : all_dtypes()) out[py::str(dtype_name(t))] = dtype_size(t);
        return out;
      },
      "Bytes per element of every dtype mdtrt moves, by name.");

  m.def("collective_output_shape", [](const std::string& op, const Shape& shape, int group_size) {
    CollectiveSpec spec;
    spec.op = collective_op_from_name(op);
    return collective_output_shape(spec, shape, group_size);
  });

  // An output handed to the caller: pooled device memory, returned to the pool (stream-ordered)
  // when the last Python reference goes.
  py::class_<PooledBuffer, std::shared_ptr<PooledBuffer>>(m, "PooledBuffer")
      .def_property_readonly("ptr", [](const PooledBuffer& b) { return reinterpret_cast<uintptr_t>(b.get()); })
      .def_property_readonly("nbytes", &PooledBuffer::size)
      .def_property_readonly("device", &PooledBuffer::device);

  // The typed arguments of ProgramRunner.infer. They only carry values: every check is made once,
  // in C++ (plan_call and the ranks' checks), whichever way the arguments came in.
  py::class_<InputArg>(m, "InputArg")
      .def(py::init([](uintptr_t ptr, int device, const std::string& dtype, Shape shape, uintptr_t stream) {
             InputArg a;
             a.data = reinterpret_cast<const void*>(ptr);
             a.device = device;
             a.dtype = dtype_from_name(dtype);
             a.shape = std::move(shape);
             a.stream = stream;
             return a;
           }),
           py::arg("ptr"), py::arg("device"), py::arg("dtype"), py::arg("shape"), py::arg("stream") = 0)
      .def_property_readonly("ptr", [](const InputArg& a) { return reinterpret_cast<uintptr_t>(a.data); })
      .def_readonly("device", &InputArg::device)
      .def_property_readonly("dtype", [](const InputArg& a) { return dtype_name(a.dtype); })
      .def_property_readonly("shape", [](const InputArg& a) { return py::tuple(py::cast(a.shape)); })
      .def_readonly("stream", &InputArg::stream)
      .def_property_readonly("nbytes", &InputArg::nbytes);
  py::class_<OutputArg>(m, "OutputArg")
      .def(py::init([](std::string name, uintptr_t ptr, size_t nbytes, int device, uintptr_t stream) {
             return OutputArg{std::move(name), reinterpret_cast<void*>(ptr), nbytes, device, stream};
           }),
           py::arg("name"), py::arg("ptr"), py::arg("nbytes"), py::arg("device"), py::arg("stream") = 0)
      .def_readonly("name", &OutputArg::name)
      .def_property_readonly("ptr", [](const OutputArg& a) { return reinterpret_cast<uintptr_t>(a.data); })
      .def_readonly("nbytes", &OutputArg::nbytes)
      .def_readonly("device", &OutputArg::device)
      .def_readonly("stream", &OutputArg::stream);

  // One rank's result of a call: what the program put out, the bytes fetched to host memory
  // (numpy views that keep this result alive), the device buffers handed to the caller.
  py::class_<RankResult>(m, "RankResult")
      .def_property_readonly("outputs", [](const RankResult& r) { return specs_to_list(r.outputs); })
      .def_property_readonly("host",
                             [](py::object self) {
                               auto& r = self.cast<RankResult&>();
                               py::list out;
                               for (auto& h : r.host) {
                                 if (h.empty()) {
                                   out.append(py::array_t<uint8_t>(0));
                                   continue;
                                 }
                                 out.append(py::array_t<uint8_t>({static_cast<py::ssize_t>(h.size())}, {1}, h.data(),
                                                                 self));
                               }
                               return out;
                             })
      .def_property_readonly("device", [](const RankResult& r) { return r.device; });

  py::class_<ProgramRunner, std::shared_ptr<ProgramRunner>>(m, "ProgramRunner")
      .def(py::init([](std::shared_ptr<DeviceGroup> group, std::vector<std::shared_ptr<RankProgram>> programs,
                       bool sequential_bind) {
             py::gil_scoped_release release;
             return std::make_shared<ProgramRunner>(std::move(group), std::move(programs), sequential_bind);
           }),
           py::arg("group"), py::arg("programs"), py::arg("sequential_bind") = false)
      .def("input_specs", [](ProgramRunner& r, int local) { return specs_to_list(r.input_specs(local)); })
      .def_property_readonly("last_replication", [](ProgramRunner& r) { return replication_name(r.last_replication()); })
      .def_property(
          "cuda_graphs", &ProgramRunner::cuda_graphs,
          [](ProgramRunner& r, bool on) {
            py::gil_scoped_release release;  // waits for a call in flight
            r.set_cuda_graphs(on);
          })
      .def_property_readonly("graph_captures", &ProgramRunner::graph_captures)
      .def_property_readonly("graph_fallback", &ProgramRunner::graph_fallback)
      .def(
          "infer",
          [](ProgramRunner& r, const std::vector<std::vector<InputArg>>& args, const std::string& replication,
             bool poison_outputs, const std::vector<int>& fetch_ranks, bool device_outputs, double timeout,
             std::vector<std::vector<OutputArg>> outputs) {
            InferOptions options = infer_options(replication, poison_outputs, fetch_ranks, device_outputs, timeout,
                                                 std::move(outputs));
            std::vector<RankResult> results;
            {
              py::gil_scoped_release release;
              results = r.infer(args, options);
            }
            return results;
          },
          py::arg("inputs"), py::arg("replication") = "auto", py::arg("poison_outputs") = false,
          py::arg("fetch_ranks") = std::vector<int>{}, py::arg("device_outputs") = false,
          py::arg("timeout") = 0.0,
          py::arg("outputs") = std::vector<std::vector<OutputArg>>{})
      .def(
          "prepare",
          [](std::shared_ptr<ProgramRunner> r, std::vector<std::vector<InputArg>> args, const std::string& replication,
             bool poison_outputs, const std::vector<int>& fetch_ranks, bool device_outputs, double timeout,
             std::vector<std::vector<OutputArg>> outputs) {
            return std::make_shared<PreparedInfer>(
                r, std::move(args),
                infer_options(replication, poison_outputs, fetch_ranks, device_outputs, timeout, std::move(outputs)));
          },
          py::arg("inputs"), py::arg("replication") = "auto", py::arg("poison_outputs") = false,
          py::arg("fetch_ranks") = std::vector<int>{}, py::arg("device_outputs") = false,
          py::arg("timeout") = 0.0, py::arg("outputs") = std::vector<std::vector<OutputArg>>{},
          "infer's arguments checked and planned once: the returned call runs it again.");

  py::class_<PreparedInfer, std::shared_ptr<PreparedInfer>>(m, "PreparedInfer")
      .def("__call__",
           [](PreparedInfer& p) {
             std::vector<RankResult> results;
             {
               py::gil_scoped_release release;
               results = p.run();
             }
             return results;
           })
      .def(
          "__call__",
          [](PreparedInfer& p, std::vector<std::vector<OutputArg>> outputs) {
            std::vector<RankResult> results;
            {
              py::gil_scoped_release release;
              results = p.run(std::move(outputs));
            }
            return results;
          },
          py::arg("outputs"), "The same call, writing into these output buffers.");

  py::module_ testing = m.def_submodule("testing", "Test-only entry points of the rank runtime (no GPU needed).");
  py::class_<CopyProgram, RankProgram, std::shared_ptr<CopyProgram>>(testing, "CopyProgram")
      .def(py::init([](const std::string& dtype) { return std::make_shared<CopyProgram>(dtype_from_name(dtype)); }),
           py::arg("dtype"));
  py::class_<SynchronizingCopyProgram, RankProgram, std::shared_ptr<SynchronizingCopyProgram>>(
      testing, "SynchronizingCopyProgram")
      .def(py::init([](const std::string& dtype) {
             return std::make_shared<SynchronizingCopyProgram>(dtype_from_name(dtype));
           }),
           py::arg("dtype"));
  py::class_<RankSynchronizingAllReduceProgram, RankProgram, std::shared_ptr<RankSynchronizingAllReduceProgram>>(
      testing, "RankSynchronizingAllReduceProgram")
      .def(py::init([](int sync_rank) { return std::make_shared<RankSynchronizingAllReduceProgram>(sync_rank); }),
           py::arg("sync_rank"));
  py::class_<AlignedCopyProgram, RankProgram, std::shared_ptr<AlignedCopyProgram>>(testing, "AlignedCopyProgram")
      .def(py::init([](const std::string& dtype) {
             return std::make_shared<AlignedCopyProgram>(dtype_from_name(dtype));
           }),
           py::arg("dtype"));
  testing.def(
      "rank_result",
      [](const std::vector<std::string>& host) {
        RankResult r;
        for (size_t i = 0; i < host.size(); ++i) {
          r.outputs.push_back(TensorSpec{"output" + std::to_string(i), DType::kUInt8, {static_cast<int64_t>(host[i].size())}});
          r.host.emplace_back(host[i].begin(), host[i].end());
        }
        return r;
      },
      py::arg("host"), "A RankResult holding these host bytes (tests the conversion on any machine).");
  testing.def(
      "run_checked_launch_test",
      [](int num_ranks, int fail_rank, double slow_check_seconds, double timeout) {
        py::gil_scoped_release release;
        return run_checked_launch_test(num_ranks, fail_rank, slow_check_seconds, timeout);
      },
      py::arg("num_ranks"), py::arg("fail_rank") = -1, py::arg("slow_check_seconds") = 0.0,
      py::arg("timeout") = 10.0,
      "(per rank: did its launch run, the call's error or '') after the check step on CPU-only ranks; "
      "fail_rank's check fails, or takes slow_check_seconds.");
  py::class_<SinkProgram, RankProgram, std::shared_ptr<SinkProgram>>(testing, "SinkProgram")
      .def(py::init([](const std::string& dtype) { return std::make_shared<SinkProgram>(dtype_from_name(dtype)); }),
           py::arg("dtype"));
  testing.def(
      "bare_copy_loop",
      [](int device, size_t nbytes, int iterations) {
        py::gil_scoped_release release;
        return bare_copy_loop_us(device, nbytes, iterations);
      },
      py::arg("device"), py::arg("nbytes"), py::arg("iterations"),
      "Microseconds per cudaMemcpyAsync + cudaStreamSynchronize from one thread: the bare baseline.");
  testing.def(
      "peer_copy_bandwidth",
      [](int src, int dst, size_t nbytes, int iterations) {
        py::gil_scoped_release release;
        return peer_copy_bandwidth_gbps(src, dst, nbytes, iterations);
      },
      py::arg("src"), py::arg("dst"), py::arg("nbytes"), py::arg("iterations"));
  testing.def(
      "h2d_bandwidth",
      [](int device, size_t nbytes, int iterations, bool pinned) {
        py::gil_scoped_release release;
        return host_to_device_bandwidth_gbps(device, nbytes, iterations, pinned);
      },
      py::arg("device"), py::arg("nbytes"), py::arg("iterations"), py::arg("pinned"));
  testing.def(
      "run_bind_test",
      [](int num_ranks, const std::string& program, bool sequential, double timeout, int fail_rank) {
        py::gil_scoped_release release;
        run_bind_test(num_ranks, program, sequential, timeout, fail_rank);
      },
      py::arg("num_ranks"), py::arg("program"), py::arg("sequential") = false, py::arg("timeout") = 10.0,
      py::arg("fail_rank") = -1);
}

}  // namespace mdtrt::bindings
