// Bindings of the rank runtime: DeviceGroup, programs, ProgramRunner.
// Arguments are converted while holding the GIL; every blocking call releases it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "bindings/modules.h"
#include "bindings/while_ranks_run.h"
#include "common/error.h"
#include "common/name_table.h"
#include "runtime/collective_program.h"
#include "runtime/device_group.h"
#include "runtime/program_runner.h"

namespace py = pybind11;

namespace mdtrt::bindings {
namespace {

InferOptions infer_options(const std::string& replication, bool poison_outputs, const std::vector<int>& fetch_ranks,
                           bool device_outputs, double timeout, std::vector<std::vector<OutputArg>> outputs,
                           bool stream_ordered) {
  InferOptions options;
  options.stream_ordered = stream_ordered;
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

}  // namespace

void bind_runtime(py::module_& m) {
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
            nccl::UniqueId uid = unique_id_from_bytes(std::string(id));
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
      .def("peer_link", [](DeviceGroup& g, int a, int b) { return link_kind_name(g.peer_link(a, b)); })
      .def_property_readonly("peer_links_reason", &DeviceGroup::peer_links_reason)
      .def_property_readonly("all_nvlink", &DeviceGroup::all_nvlink)
      .def_property_readonly("broken", [](DeviceGroup& g) { return g.runtime().broken(); })
      .def_property_readonly("broken_reason", [](DeviceGroup& g) { return g.runtime().broken_reason(); })
      .def(
          "synchronize",
          [](DeviceGroup& g) {
            py::gil_scoped_release release;
            g.runtime().synchronize();
          },
          "Waits for every stream-ordered call of the group to finish on every rank.")
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
  // The native tables of each name mdtrt accepts (Python derives its lists from these).
  m.def("collective_ops", &collective_op_names, "The eight DistCollective operations, in TensorRT's order.");
  m.def("reduce_ops", &reduce_op_names, "Reduce op names; 'none' is for the ops that do not reduce.");
  m.def("replication_modes", &replication_names, "How an input every rank needs reaches every GPU.");
  m.def("did_you_mean", &did_you_mean, py::arg("name"), py::arg("known"),
        "\" (did you mean 'x'?)\" when name is close to one of known, else \"\" (mdtrt.vocabulary.did_you_mean).");
  m.def("op_reduces", [](const std::string& op) { return op_reduces(collective_op_from_name(op)); });
  m.def("op_has_root", [](const std::string& op) { return op_has_root(collective_op_from_name(op)); });

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
      .def_property_readonly("graph_captures",
                             [](ProgramRunner& r) {
                               py::gil_scoped_release release;  // waits for a call in flight
                               return r.graph_captures();
                             })
      .def_property_readonly("graph_fallback", &ProgramRunner::graph_fallback)
      .def(
          "infer",
          [](ProgramRunner& r, const std::vector<std::vector<InputArg>>& args, const std::string& replication,
             bool poison_outputs, const std::vector<int>& fetch_ranks, bool device_outputs, double timeout,
             std::vector<std::vector<OutputArg>> outputs, bool stream_ordered) {
            InferOptions options = infer_options(replication, poison_outputs, fetch_ranks, device_outputs, timeout,
                                                 std::move(outputs), stream_ordered);
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
          py::arg("outputs") = std::vector<std::vector<OutputArg>>{}, py::arg("stream_ordered") = false)
      .def(
          "prepare",
          [](std::shared_ptr<ProgramRunner> r, std::vector<std::vector<InputArg>> args, const std::string& replication,
             bool poison_outputs, const std::vector<int>& fetch_ranks, bool device_outputs, double timeout,
             std::vector<std::vector<OutputArg>> outputs) {
            // Planned waiting; each run says whether it is stream-ordered.
            return std::make_shared<PreparedInfer>(
                r, std::move(args),
                infer_options(replication, poison_outputs, fetch_ranks, device_outputs, timeout, std::move(outputs),
                              false));
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
          [](PreparedInfer& p, std::vector<std::vector<OutputArg>> outputs, bool stream_ordered) {
            std::vector<RankResult> results;
            {
              py::gil_scoped_release release;
              results = p.run(std::move(outputs), stream_ordered);
            }
            return results;
          },
          py::arg("outputs"), py::arg("stream_ordered") = false,
          "The same call, writing into these output buffers; stream_ordered: return once it is queued.")
      .def(
          "run_stream_ordered",
          [](PreparedInfer& p) {
            py::gil_scoped_release release;
            p.run_stream_ordered();  // the caller holds every output: nothing of the result is returned
          },
          "The call as prepared, into the outputs given when it was prepared, stream-ordered (returns once "
          "it is queued, the caller streams waiting for it); returns None.")
      .def(
          "run_at",
          [](PreparedInfer& p, const std::vector<std::vector<std::pair<uintptr_t, uintptr_t>>>& addresses,
             const std::vector<std::vector<std::tuple<std::string, uintptr_t, size_t, int, uintptr_t>>>& outputs,
             bool stream_ordered) {
            // Plain tuples: converting them costs a fraction of constructing OutputArg objects per call.
            std::vector<std::vector<InputAddress>> at(addresses.size());
            for (size_t i = 0; i < addresses.size(); ++i)
              for (const auto& [data, stream] : addresses[i])
                at[i].push_back(InputAddress{reinterpret_cast<const void*>(data), stream});
            std::vector<std::vector<OutputArg>> out(outputs.size());
            for (size_t i = 0; i < outputs.size(); ++i)
              for (const auto& [name, data, nbytes, device, stream] : outputs[i])
                out[i].push_back(OutputArg{name, reinterpret_cast<void*>(data), nbytes, device, stream});
            std::vector<RankResult> results;
            {
              py::gil_scoped_release release;
              results = p.run_at(at, std::move(out), stream_ordered);
            }
            return results;
          },
          py::arg("addresses"), py::arg("outputs"), py::arg("stream_ordered") = false,
          "The same call on other arrays of the same dtypes, shapes and devices: addresses[i] lists local "
          "rank i's inputs as (pointer, producer stream); outputs[i] local rank i's preallocated outputs as "
          "(name, pointer, bytes, device, caller stream) (empty lists: the runner allocates them); "
          "stream_ordered: return once the call is queued, its caller streams waiting for it.")
      .def_property_readonly("arrays_may_be_in_use", &PreparedInfer::arrays_may_be_in_use,
                             "After a run raised: whether work of it may still use its arrays (a rank was given "
                             "up on, or the group broke with work queued): they must never be freed then.")
      .def(
          "addressed",
          [](std::shared_ptr<PreparedInfer> p, const std::vector<std::string>& names, const std::vector<size_t>& nbytes,
             const std::vector<int>& devices, bool stream_ordered) {
            return std::make_shared<AddressedRun>(std::move(p), names, nbytes, devices, stream_ordered);
          },
          py::arg("names"), py::arg("nbytes"), py::arg("devices"), py::arg("stream_ordered") = false,
          "run_at with every output given and these fixed: names (each rank's outputs, the same on every rank), "
          "nbytes and devices (every output's size and GPU, rank by rank in the order of names) and "
          "stream_ordered. The AddressedRun returned is called with only the addresses.");

  py::class_<AddressedRun, std::shared_ptr<AddressedRun>>(m, "AddressedRun")
      .def(
          "__call__",
          [](AddressedRun& run, const std::vector<uintptr_t>& pointers, const std::vector<uintptr_t>& streams,
             const py::object& while_ranks_run) {
            // Two flat lists of ints: what a one-shot call converts per run.
            if (while_ranks_run.is_none()) {
              py::gil_scoped_release release;
              run.run(pointers, streams);
              return;
            }
            // Called with the GIL while the ranks check the call (bindings/while_ranks_run.h).
            run_calling_back(while_ranks_run, [&](const std::function<void()>& meanwhile) {
              run.run(pointers, streams, meanwhile);
            });
          },
          py::arg("pointers"), py::arg("streams"), py::arg("while_ranks_run") = py::none(),
          "Runs the call on other arrays: pointers and streams name each local rank's inputs in turn (data, "
          "producer stream; the same number on every rank), then each rank's outputs in turn (data, caller "
          "stream), in the order of the names it was made with. while_ranks_run: a callable without arguments "
          "called (on this thread, with the GIL) while the ranks check the call (none launches before it "
          "returned: GPU memory allocated there must not come between two ranks' NCCL launches), for work of the "
          "caller's that need not wait for them; it must not wait for the ranks nor call into this group (a call, "
          "close() or cuda_graphs from it raises InvalidArgumentError). What escapes it (Ctrl-C) cancels the run: "
          "no rank launches, and it is raised once the ranks returned; when a rank's checks failed too, with that "
          "error as its __context__. "
          "Returns None (the outputs are the caller's).")
      .def_property_readonly("arrays_may_be_in_use", &AddressedRun::arrays_may_be_in_use,
                             "As PreparedInfer's: after a run raised, whether work of it may still use its arrays.");
}

}  // namespace mdtrt::bindings
