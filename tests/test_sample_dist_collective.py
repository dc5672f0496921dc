"""sample_dist_collective, NVIDIA's sampleDistCollective on mdtrt's C++ core (issue 6).

The binary is the one `pip install .` put on PATH, or the one named by MDTRT_SAMPLE_DIST_COLLECTIVE
(e.g. build/sample/samples/sampleDistCollective/sample_dist_collective); without either the tests
skip. Argument checks run everywhere (they never touch CUDA); `multi_gpu` tests need two GPUs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

TIMEOUT_S = 180  # NCCL set-up of two ranks plus eight ops; the sample's own deadlines are shorter
DTYPES = ["float32", "float16", "bfloat16", "int32"]
OPS = ["all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "all_to_all", "gather", "scatter"]
# Checked outputs of `--op all` on 2 ranks: reduce and gather leave the non-root's output undefined.
PASSED_LINES_ALL_OPS_2_RANKS = 14


def _binary() -> str:
    found = shutil.which("sample_dist_collective") or os.environ.get("MDTRT_SAMPLE_DIST_COLLECTIVE")
    if not found:
        pytest.skip(
            "sample_dist_collective is not on PATH and MDTRT_SAMPLE_DIST_COLLECTIVE is not set "
            "(pip install . or build it with cmake and point the variable at it)"
        )
    if not os.access(found, os.X_OK):
        pytest.fail(f"MDTRT_SAMPLE_DIST_COLLECTIVE={found} is not an executable file")
    return found


def _nccl_wheel_lib() -> str | None:
    """The nvidia-nccl-cu13 wheel's lib folder of this Python, so a sample built outside the venv
    finds the same NCCL that the Python package uses."""
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(location) / "lib"
        if (lib / "libnccl.so.2").exists():
            return str(lib)
    return None


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRT_")}
    env["NCCL_NVLS_ENABLE"] = "0"
    lib = _nccl_wheel_lib()
    if lib:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_binary(), *args], env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _output(p) -> str:
    return p.stdout + p.stderr


def _without_backend() -> str:
    """The sample's "This build has no TensorRT backend: <why>" (its --help), "" when it has the backend."""
    found = re.search(r"This build has no TensorRT backend: (.*)\.\)$", _run(["--help"]).stdout, re.MULTILINE)
    return found.group(0)[:-2] if found else ""


# ---------------------------------------------------------------------------------------------
# Everywhere (CI has no GPU)


def test_help_documents_every_option_and_both_launch_styles():
    p = _run(["--help"])
    assert p.returncode == 0, _output(p)
    text = p.stdout
    for option in [
        "--op", "--gpus", "--backend", "--rows", "--cols", "--dtype", "--reduce", "--root", "--groups",
        "--iters", "--warmup", "--seed", "--original-vectors", "--timeout", "--inject-mismatch", "--help",
    ]:
        assert option in text, f"--help does not document {option}"
    for word in OPS + DTYPES + ["sum", "prod", "max", "min", "avg", "trt", "nccl"]:
        assert word in text
    for launch in ["--gpus 0,1,2,3", "TRT_MY_RANK", "TRT_WORLD_SIZE", "TRT_NCCL_ID_FILE", "mpirun", "srun"]:
        assert launch in text, f"--help does not show {launch}"
    assert "MDTRT_NCCL_LIBRARY" in text and "nvidia-nccl-cu13" in text  # how NCCL is found
    assert "MDTRT_TENSORRT_LIBRARY" in text and "tensorrt_libs" in text  # how TensorRT is found
    assert "busbw" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0,1"], "--op is required"),
        (["--op", "all_sum", "--gpus", "0,1"], "unknown --op 'all_sum'"),
        (["--op", "all", "--gpus", "0,0"], "lists GPU 0 twice"),
        (["--op", "all", "--gpus", "0"], "at least 2 GPUs"),
        (["--op", "all", "--gpus", "0,x"], "--gpus takes"),
        (["--op", "all", "--gpus", "0,1", "--rows", "0"], "--rows must be from 1 to 268435456 (2^28); got 0"),
        (["--op", "all", "--gpus", "0,1", "--cols", "-3"], "--cols must be from 1 to 268435456 (2^28); got -3"),
        (["--op", "all", "--gpus", "0,1", "--cols", "300000000"], "--cols must be from 1 to 268435456 (2^28); got 300000000"),
        (["--op", "all", "--gpus", "0,1", "--dtype", "int8"], "unknown --dtype 'int8'"),
        (["--op", "all", "--gpus", "0,1", "--reduce", "mean"], "unknown --reduce 'mean'"),
        (["--op", "all", "--gpus", "0,1", "--groups", "0,2"], "--groups lists rank 2, outside the world of 2"),
        (["--op", "all", "--gpus", "0,1", "--groups", "1,1"], "lists rank 1 twice"),
        (["--op", "broadcast", "--gpus", "0,1,2", "--groups", "0,2", "--root", "1"], "--root 1 is not in the group"),
        # Without --gpus the world size is known only from CUDA: checks that do not need it come first.
        (["--op", "all", "--groups", "0,0"], "lists rank 0 twice"),
        (["--op", "all", "--groups", "3"], "has one rank"),
        (["--op", "broadcast", "--groups", "0,2", "--root", "1"], "--root 1 is not in the group"),
        (["--op", "scatter", "--gpus", "0,1,2", "--cols", "4"], "make --cols a multiple of 3"),
        (["--op", "all", "--gpus", "0,1", "--iters", "many"], "--iters takes a whole number"),
        (["--op", "all", "--gpus", "0,1", "--backend", "onnx"], "unknown --backend 'onnx'"),
        (["--op", "all", "--gpus", "0,1,2", "--original-vectors"], "2-rank"),
        (["--op", "all", "--gpus", "0,1", "--original-vectors", "--dtype", "int32"], "drop --dtype"),
        (["--op", "all", "--gpus", "0,1", "--frobnicate"], "unknown argument '--frobnicate'"),
        (["--op"], "--op needs a value"),
    ],
)
def test_bad_arguments_fail_before_touching_cuda(args, message):
    # CUDA_VISIBLE_DEVICES="" makes the point also on a GPU machine: the checks need no GPU.
    p = _run(args, _env(CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 2, _output(p)
    assert message in p.stderr, p.stderr
    assert "--help" in p.stderr  # says where to look


@pytest.mark.parametrize(
    "launcher, message",
    [
        ({"TRT_WORLD_SIZE": "2", "TRT_MY_RANK": "0"}, "not set: TRT_NCCL_ID_FILE"),
        ({"TRT_WORLD_SIZE": "2"}, "not set: TRT_MY_RANK TRT_NCCL_ID_FILE"),
        ({"TRT_WORLD_SIZE": "1", "TRT_MY_RANK": "0", "TRT_NCCL_ID_FILE": "/tmp/x"}, "at least 2 ranks"),
        ({"TRT_WORLD_SIZE": "2", "TRT_MY_RANK": "2", "TRT_NCCL_ID_FILE": "/tmp/x"}, "must be 0..1"),
        ({"TRT_WORLD_SIZE": "two", "TRT_MY_RANK": "0", "TRT_NCCL_ID_FILE": "/tmp/x"}, "TRT_WORLD_SIZE takes"),
        # A path rank 0 cannot write: refused on every rank before CUDA, not after a wait.
        ({"TRT_WORLD_SIZE": "2", "TRT_MY_RANK": "1", "TRT_NCCL_ID_FILE": "/tmp"},
         "the NCCL id file /tmp (TRT_NCCL_ID_FILE) is a directory: name a file in it instead, e.g. /tmp/nccl_id"),
        ({"TRT_WORLD_SIZE": "2", "TRT_MY_RANK": "0", "TRT_NCCL_ID_FILE": "/nonexistent-mdtrt/nccl_id"},
         "its folder /nonexistent-mdtrt is unusable (No such file or directory); create that folder"),
    ],
)
def test_bad_launcher_environment_fails_with_what_to_set(launcher, message):
    p = _run(["--op", "all_reduce"], _env(CUDA_VISIBLE_DEVICES="", **launcher))
    assert p.returncode == 2, _output(p)
    assert message in p.stderr, p.stderr


def test_missing_gpu_is_a_clear_error():
    p = _run(["--op", "all_reduce", "--gpus", "0,1", "--backend", "nccl"], _env(CUDA_VISIBLE_DEVICES=""))
    assert p.returncode != 0
    assert "no CUDA GPU is visible" in p.stderr, _output(p)


def test_trt_backend_without_tensorrt_says_so():
    if not _without_backend():
        pytest.skip("this build has the TensorRT backend")
    p = _run(["--op", "all_reduce", "--gpus", "0,1", "--backend", "trt"], _env(CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 2, _output(p)
    assert "no TensorRT backend" in p.stderr and "--backend nccl" in p.stderr


def _fake_tensorrt(directory, builder: bool) -> str:
    """A library with TensorRT 11's entry points (the creators return NULL); without the builder
    entry point it is what the loader takes for the lean runtime."""
    from fakelib import CC, compile_shared_object

    if CC is None:
        pytest.skip("needs a C compiler to build a fake TensorRT library")
    lines = ["int getInferLibVersion(void) { return 110400; }",
             "void* createInferRuntime_INTERNAL(void* logger, int version) { return 0; }"]
    if builder:
        lines.append("void* createInferBuilder_INTERNAL(void* logger, int version) { return 0; }")
    return compile_shared_object(directory, "libnvinfer.so.11", lines)


def test_backend_auto_picks_nccl_when_only_the_lean_runtime_is_there(tmp_path):
    """The lean runtime cannot build the sample's engines: auto says so and uses NCCL (before the
    GPUs are even looked at); an explicit --backend trt is an error saying the same."""
    if _without_backend():
        pytest.skip(_without_backend())
    lean = _fake_tensorrt(tmp_path / "lean", builder=False)
    env = _env(CUDA_VISIBLE_DEVICES="", MDTRT_TENSORRT_LIBRARY=lean)
    p = _run(["--op", "all_reduce", "--gpus", "0,1"], env)
    assert "only the TensorRT lean runtime was found" in p.stdout and lean in p.stdout, _output(p)
    assert "using --backend nccl" in p.stdout
    assert "no CUDA GPU is visible" in p.stderr  # then the machine's own problem, as before
    p = _run(["--op", "all_reduce", "--gpus", "0,1", "--backend", "trt"], env)
    assert p.returncode == 3, _output(p)
    assert "--backend trt: only the TensorRT lean runtime was found" in p.stderr and "cannot build" in p.stderr
    full = _fake_tensorrt(tmp_path / "full", builder=True)
    p = _run(["--op", "all_reduce", "--gpus", "0,1"], _env(CUDA_VISIBLE_DEVICES="", MDTRT_TENSORRT_LIBRARY=full))
    assert "using --backend nccl" not in p.stdout, _output(p)  # a full TensorRT keeps auto on trt


def test_a_named_tensorrt_library_that_does_not_load_is_an_error(tmp_path):
    """MDTRT_TENSORRT_LIBRARY names the library the user wants: if it does not load, auto does not
    silently fall back to the NCCL backend (as a bad MDTRT_NCCL_LIBRARY is an error too)."""
    if _without_backend():
        pytest.skip(_without_backend())
    missing = str(tmp_path / "nope" / "libnvinfer.so.11")
    p = _run(["--op", "all_reduce", "--gpus", "0,1"], _env(CUDA_VISIBLE_DEVICES="", MDTRT_TENSORRT_LIBRARY=missing))
    assert p.returncode == 3, _output(p)
    assert "MDTRT_TENSORRT_LIBRARY: TensorRT could not be loaded" in p.stderr and missing in p.stderr, _output(p)
    assert "using --backend nccl" not in p.stdout
    p = _run(["--op", "all_reduce", "--gpus", "0,1", "--backend", "nccl"],
             _env(CUDA_VISIBLE_DEVICES="", MDTRT_TENSORRT_LIBRARY=missing))
    assert "MDTRT_TENSORRT_LIBRARY" not in p.stderr and "no CUDA GPU is visible" in p.stderr, _output(p)


# ---------------------------------------------------------------------------------------------
# Two GPUs


def _passed(text: str) -> int:
    return len(re.findall(r"^\[I\] Rank \d+ - [A-Z_]+ PASSED", text, flags=re.M))


def _run_process_per_rank(tmp_path: Path, args: list[str], world_size: int = 2) -> list[tuple[int, str]]:
    id_file = tmp_path / "nccl_id.txt"
    procs = [
        subprocess.Popen(
            [_binary(), *args],
            env=_env(TRT_MY_RANK=str(r), TRT_WORLD_SIZE=str(world_size), TRT_NCCL_ID_FILE=str(id_file)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return results


@pytest.mark.multi_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ops_thread_per_gpu(dtype):
    p = _run(["--backend", "nccl", "--op", "all", "--gpus", "0,1", "--dtype", dtype])
    out = _output(p)
    assert p.returncode == 0, out
    assert _passed(out) == PASSED_LINES_ALL_OPS_2_RANKS, out
    assert "FAILED" not in out


@pytest.mark.multi_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ops_process_per_rank(tmp_path, dtype):
    results = _run_process_per_rank(tmp_path, ["--backend", "nccl", "--op", "all", "--dtype", dtype])
    for rc, out in results:
        assert rc == 0, out
    rank0, rank1 = (out for _, out in results)
    assert "Rank 0 - Generated NCCL ID and wrote to file" in rank0
    assert "Rank 1 - Read NCCL ID from file" in rank1
    assert _passed(rank0) + _passed(rank1) == PASSED_LINES_ALL_OPS_2_RANKS, rank0 + rank1


@pytest.mark.multi_gpu
def test_trt_backend_builds_once_under_a_launcher_on_each_ranks_gpu(trt_double, tmp_path):
    """With TensorRT (the test double): rank 0 alone builds the engine and shares it beside the id
    file; rank 1 waits for it; both pass; TensorRT's own log is printed; no plan file is left.
    (Every op in both launch styles: tests/test_trt_double_sample.py.)"""
    results = _run_process_per_rank(tmp_path, ["--backend", "trt", "--op", "all_gather"])
    for rc, out in results:
        assert rc == 0, out
    rank0, rank1 = (out for _, out in results)
    assert "Rank 0 - built the ALL_GATHER engine and shared it" in rank0, rank0
    assert "Rank 1 - waiting for rank 0's ALL_GATHER engine" in rank1, rank1
    assert "built the ALL_GATHER engine" not in rank1
    assert _passed(rank0) + _passed(rank1) == 2, rank0 + rank1
    assert re.search(r"^\[I\] \[TRT\] ", rank0, flags=re.M), rank0  # TensorRT's log, as NVIDIA's sample prints it
    assert not list(tmp_path.glob("*.plan")), list(tmp_path.iterdir())


@pytest.mark.multi_gpu
def test_trt_backend_thread_per_gpu_prints_tensorrts_log(trt_double):
    p = _run(["--backend", "trt", "--op", "all_gather", "--gpus", "0,1", "--groups", "1,0"])
    assert p.returncode == 0, _output(p)
    assert _passed(p.stdout) == 2, _output(p)
    assert re.search(r"^\[I\] \[TRT\] ", p.stdout, flags=re.M), p.stdout


@pytest.mark.multi_gpu
@pytest.mark.parametrize("reduce", ["sum", "prod", "max", "min", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_ops(dtype, reduce):
    p = _run(["--backend", "nccl", "--op", "reduce_scatter", "--gpus", "0,1", "--dtype", dtype, "--reduce", reduce,
              "--rows", "5", "--cols", "64"])
    assert p.returncode == 0, _output(p)
    assert _passed(_output(p)) == 2


@pytest.mark.multi_gpu
def test_groups_reorder_ranks_and_root_is_a_world_rank():
    p = _run(["--backend", "nccl", "--op", "all", "--gpus", "0,1", "--groups", "1,0", "--root", "1"])
    out = _output(p)
    assert p.returncode == 0, out
    assert _passed(out) == PASSED_LINES_ALL_OPS_2_RANKS, out
    assert "Rank 0 - REDUCE not checked" in out  # rank 1 is the root now


@pytest.mark.multi_gpu
def test_original_vectors_reproduce_nvidias_expected_outputs():
    p = _run(["--backend", "nccl", "--op", "all", "--gpus", "0,1", "--original-vectors"])
    out = _output(p)
    assert p.returncode == 0, out
    assert out.count("matches NVIDIA's expected output") == PASSED_LINES_ALL_OPS_2_RANKS, out
    assert "[I] Rank 0 - ALL_REDUCE PASSED" in out


@pytest.mark.multi_gpu
def test_original_command_line_works_unchanged(tmp_path):
    """NVIDIA's launch: only the three variables and --op, no --gpus, no --backend."""
    results = _run_process_per_rank(tmp_path, ["--op", "all_reduce"])
    for rc, out in results:
        assert rc == 0, out
        assert "ALL_REDUCE PASSED" in out and "test completed successfully!" in out


@pytest.mark.multi_gpu
def test_injected_mismatch_is_caught():
    p = _run(["--backend", "nccl", "--op", "all", "--gpus", "0,1", "--inject-mismatch"])
    out = _output(p)
    assert p.returncode == 1, out
    assert "ALL_REDUCE FAILED: element [0, 0]" in out
    assert _passed(out) == 0


@pytest.mark.multi_gpu
def test_stale_nccl_id_file_is_replaced_not_read(tmp_path):
    # An earlier run's file (no run record: NVIDIA's format) is there when both ranks start: rank 1
    # must wait for rank 0's new id, the run passes, and rank 0 removes the file once all joined.
    id_file = tmp_path / "nccl_id.txt"
    id_file.write_text("0" * 256)
    results = _run_process_per_rank(tmp_path, ["--op", "all_reduce", "--backend", "nccl"])
    for rc, out in results:
        assert rc == 0, out
        assert "ALL_REDUCE PASSED" in out
    assert not id_file.exists()


@pytest.mark.multi_gpu
def test_timing_prints_latency_and_bus_bandwidth():
    p = _run(["--backend", "nccl", "--op", "all", "--gpus", "0,1", "--iters", "20", "--rows", "256", "--cols", "1024"])
    out = _output(p)
    assert p.returncode == 0, out
    assert "median(us)" in out and "busbw(GB/s)" in out
    for op in OPS:
        row = re.search(rf"^{op}\s+PASSED\s+\S+\s+\[[\d, ]+\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, flags=re.M)
        assert row, f"no timed summary row for {op}:\n{out}"
        latency_us, algbw, busbw = map(float, row.groups())
        assert latency_us > 0 and algbw > 0 and busbw > 0
