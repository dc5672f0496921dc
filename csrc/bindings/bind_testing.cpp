// _core.testing: test programs and benchmark probes (csrc/testing), and each layer's test-only
// hooks (bind_trt_testing). Nothing here is public API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "bindings/modules.h"
#include "bindings/while_ranks_run.h"
#include "common/error.h"
#include "runtime/call_barrier.h"
#include "runtime/call_plan.h"
#include "runtime/device_group.h"
#include "runtime/gpu_links.h"
#include "runtime/program_runner.h"
#include "testing/test_programs.h"

namespace py = pybind11;

namespace mdtrt::bindings {

void bind_testing(py::module_& m) {
  py::module_ testing = m.def_submodule("testing", "Test-only entry points (no GPU needed).");
  py::class_<CopyProgram, RankProgram, std::shared_ptr<CopyProgram>>(testing, "CopyProgram")
      .def(py::init([](const std::string& dtype) { return std::make_shared<CopyProgram>(dtype_from_name(dtype)); }),
           py::arg("dtype"));
  py::class_<PairCopyProgram, RankProgram, std::shared_ptr<PairCopyProgram>>(testing, "PairCopyProgram")
      .def(py::init([](const std::string& dtype) { return std::make_shared<PairCopyProgram>(dtype_from_name(dtype)); }),
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
  testing.def(
      "run_while_ranks_run_test",
      [](int num_ranks, bool callback_throws) {
        py::gil_scoped_release release;
        return run_while_ranks_run_test(num_ranks, callback_throws);
      },
      py::arg("num_ranks"), py::arg("callback_throws") = false,
      "(the caller's while_ranks_run ran while every rank checked and no launch came before it returned, "
      "the number of ranks that launched, the call's error or '') on CPU-only ranks whose checks wait for "
      "that callback to start; it throws when callback_throws.");
  testing.def(
      "run_reentering_test",
      [](int num_ranks) {
        py::gil_scoped_release release;
        return run_reentering_test(num_ranks);
      },
      py::arg("num_ranks"),
      "[run_on_all inside the callback of another runtime's call, that call, run_on_all, mark_unusable] inside "
      "a call's while_ranks_run on CPU-only ranks, then run_on_all after it: each one's error, or ''.");
  testing.def("broken_by_failure_test", &broken_by_failure_test, py::arg("num_ranks"), py::arg("how"),
              "Whether a CPU-only runtime broke by a failure after how: 'close', 'abort', 'abort, then close' or "
              "'close, then abort'.");
  testing.def(
      "run_calling_back_test",
      [](int num_ranks, bool fail_check, const py::object& callback, py::list launches) {
        // The binding's own path (AddressedRun.__call__'s): a check-then-launch call on CPU-only
        // rank threads, rank 0's check failing when fail_check, calling `callback` while they run.
        const std::unique_ptr<RankRuntime> runtime = cpu_only_runtime(num_ranks);
        auto launched = std::make_shared<std::atomic<int>>(0);  // shared with the tasks (see run_on_all)
        try {
          run_calling_back(callback, [&](const std::function<void()>& meanwhile) {
            run_checked_then_launched(
                *runtime,
                [fail_check](RankContext& ctx) {
                  if (fail_check && ctx.local_index == 0) throw_invalid_argument("injected bad argument");
                },
                [launched](RankContext&) { launched->fetch_add(1); }, 10.0, "infer", meanwhile);
          });
        } catch (...) {
          launches.append(launched->load());
          throw;
        }
        launches.append(launched->load());
      },
      py::arg("num_ranks"), py::arg("fail_check"), py::arg("callback"), py::arg("launches"),
      "Runs bindings/while_ranks_run.h's run_calling_back over a call on CPU-only ranks; appends the number "
      "of ranks that launched to `launches`, also when it raises; returns None.");
  testing.def(
      "run_abandoned_rank_test",
      [](int num_ranks, int stuck_rank, double stuck_seconds, double timeout, double grace, const std::string& step) {
        py::gil_scoped_release release;
        return run_abandoned_rank_test(num_ranks, stuck_rank, stuck_seconds, timeout, grace, step);
      },
      py::arg("num_ranks"), py::arg("stuck_rank"), py::arg("stuck_seconds"), py::arg("timeout"), py::arg("grace"),
      py::arg("step") = "launch",
      "The step's error after stuck_rank's task ('launch' of a call, or 'bind') ignored the abort for "
      "stuck_seconds, past timeout and the grace; that task returns later, into state it owns (see "
      "abandoned_rank_report).");
  testing.def("abandoned_rank_report", &abandoned_rank_report,
              "(late tasks of run_abandoned_rank_test that returned, those that found their state intact).");
  testing.def(
      "set_abort_grace",
      [](DeviceGroup& group, double seconds) { group.runtime().set_abort_grace_for_testing(seconds); },
      py::arg("group"), py::arg("seconds"),
      "How long a timed-out call waits for aborted ranks before giving them up (default 10 s).");
  py::class_<StubbornCopyProgram, RankProgram, std::shared_ptr<StubbornCopyProgram>>(testing, "StubbornCopyProgram")
      .def(py::init([](const std::string& dtype, int stuck_rank, double seconds) {
             return std::make_shared<StubbornCopyProgram>(dtype_from_name(dtype), stuck_rank, seconds);
           }),
           py::arg("dtype"), py::arg("stuck_rank"), py::arg("seconds"));
  py::class_<SinkProgram, RankProgram, std::shared_ptr<SinkProgram>>(testing, "SinkProgram")
      .def(py::init([](const std::string& dtype) { return std::make_shared<SinkProgram>(dtype_from_name(dtype)); }),
           py::arg("dtype"));
  testing.def(
      "concurrent_meeting",
      [](int steps, double timeout) {
        py::gil_scoped_release release;
        return concurrent_meeting(steps, timeout);
      },
      py::arg("steps"), py::arg("timeout"),
      "How many of `steps` steps run through run_concurrently (aborts use it) met all the others, each "
      "waiting at most `timeout` seconds: `steps` when they run at once.");
  testing.def(
      "stop_idle_worker",
      [](int spin_micros, int poll_micros) {
        py::gil_scoped_release release;
        stop_idle_worker(spin_micros, poll_micros);
      },
      py::arg("spin_micros"), py::arg("poll_micros"),
      "Destroys a CPU-only rank worker while it idles (spinning spin_micros, or waking every poll_micros); "
      "returns once it is gone.");
  py::class_<BareCopies>(testing, "BareCopies")
      .def(py::init<const std::vector<int>&, size_t>(), py::arg("devices"), py::arg("nbytes"))
      .def("launch", &BareCopies::launch,
           "Queues one device-to-device copy of nbytes on a stream of each device (returns at once).")
      .def("synchronize", &BareCopies::synchronize, py::call_guard<py::gil_scoped_release>());
  testing.def(
      "bare_copy_loop",
      [](const std::vector<int>& devices, size_t nbytes, int iterations) {
        py::gil_scoped_release release;
        return bare_copy_loop_us(devices, nbytes, iterations);
      },
      py::arg("devices"), py::arg("nbytes"), py::arg("iterations"),
      "Microseconds per iteration of cudaMemcpyAsync on each device, then cudaStreamSynchronize of each, "
      "from one thread: the bare baseline of a fan-out to these GPUs.");
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
  testing.def(
      "classify_peer_links",
      [](const std::vector<std::string>& pci_bus_ids, const std::vector<std::vector<bool>>& peer_access) {
        PeerLinks links;
        {
          py::gil_scoped_release release;
          links = classify_peer_links(pci_bus_ids, peer_access);
        }
        return py::make_tuple(link_kind_names(links.kinds), links.unknown_reason);
      },
      py::arg("pci_bus_ids"), py::arg("peer_access"),
      "(n x n link kind names, why some are 'unknown') for GPUs named by PCI bus id, as DeviceGroup finds them "
      "(NVML through MDTRT_NVML_LIBRARY or libnvidia-ml.so.1); no GPU needed.");
  testing.def(
      "choose_replication",
      [](const std::string& requested, size_t nbytes, bool all_nvlink, bool pageable) {
        bool asked = false;
        const Replication mode = choose_replication(replication_from_name(requested), nbytes, all_nvlink, [&] {
          asked = true;
          return pageable;
        });
        return py::make_tuple(replication_name(mode), asked);
      },
      py::arg("requested"), py::arg("nbytes"), py::arg("all_nvlink"), py::arg("pageable"),
      "(the mode a replicated host input of nbytes travels by, whether the pageability query was made) with "
      "`pageable` standing in for CUDA's answer.");
  bind_trt_testing(testing);
}

}  // namespace mdtrt::bindings
