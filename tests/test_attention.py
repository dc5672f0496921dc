"""The attention sample: model creation, sharding with polygraphy and the simulated check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")
pytest.importorskip("polygraphy")
from onnx import numpy_helper  # noqa: E402

import mdtrt  # noqa: E402
from mdtrt import attention, attention_cli  # noqa: E402
from mdtrt.sharding import shard  # noqa: E402
from mdtrt import compare_outputs, run_on_cpu, simulate  # noqa: E402

SMALL = attention.AttentionConfig(hidden=48, heads=4, head_dim=8, dtype="float32", seed=3)
F32_ATOL, F32_RTOL = attention.TOLERANCES["float32"]
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "samples" / "attention_mdtrt"


@pytest.fixture(scope="module")
def small_model():
    return attention.create_attention_model(SMALL)


@pytest.fixture(scope="module")
def small_inputs(small_model):
    return attention.random_inputs(small_model, {"sequence_length": 8, "batch_size": 2}, seed=5)


def numpy_attention(model, x):
    """The attention block written directly in numpy (float64) from the model's weights."""
    w = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    s, b, _ = x.shape
    heads, head_dim = SMALL.heads, SMALL.head_dim

    def to_heads(t):
        return t.reshape(s, b, heads, head_dim)

    def rms(t, gain):
        return t / np.sqrt(np.mean(t * t, axis=-1, keepdims=True) + 1e-6) * gain

    x = x.astype(np.float64)
    q = rms(to_heads(x @ w["w_q"]), w["q_norm_weight"]).transpose(1, 2, 0, 3)  # (b, h, s, d)
    k = rms(to_heads(x @ w["w_k"]), w["k_norm_weight"]).transpose(1, 2, 0, 3)
    v = to_heads(x @ w["w_v"]).transpose(1, 2, 0, 3)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    context = (p @ v).transpose(2, 0, 1, 3).reshape(s, b, heads * head_dim)
    return context @ w["w_out"]


def test_model_matches_numpy_attention(small_model, small_inputs):
    assert [i.name for i in small_model.graph.input] == ["input"]
    out = run_on_cpu(small_model, small_inputs, progress=False)["output"]
    assert out.shape == (8, 2, 48) and out.dtype == np.float32
    np.testing.assert_allclose(out, numpy_attention(small_model, small_inputs["input"]), rtol=1e-4, atol=1e-5)


def test_model_is_seeded_and_float16_runs():
    a = attention.create_attention_model(hidden=32, heads=2, head_dim=16, dtype="float16", seed=1)
    b = attention.create_attention_model(hidden=32, heads=2, head_dim=16, dtype="float16", seed=1)
    c = attention.create_attention_model(hidden=32, heads=2, head_dim=16, dtype="float16", seed=2)
    weights = lambda m: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w_q"))  # noqa: E731
    np.testing.assert_array_equal(weights(a), weights(b))
    assert not np.array_equal(weights(a), weights(c)) and weights(a).dtype == np.float16
    x = attention.random_inputs(a, {"sequence_length": 4, "batch_size": 1})
    assert x["input"].dtype == np.float16
    assert np.isfinite(run_on_cpu(a, x, progress=False)["output"]).all()


def test_bad_sizes_are_refused():
    with pytest.raises(mdtrt.InvalidArgumentError, match="heads must be a positive integer"):
        attention.AttentionConfig(heads=0)
    with pytest.raises(ValueError, match=r"dtype is 'bfloat16'.*; it must be one of: float16, float32$"):
        attention.AttentionConfig(dtype="bfloat16")


@pytest.mark.parametrize("ranks", [0, -3, 2.0, True, "2"])
def test_default_hints_refuse_a_rank_count_that_is_not_a_positive_integer(ranks):
    """Refused when the hints are made, as shard refuses such ranks, not later with advice to
    "shard for 0 ranks"."""
    with pytest.raises(mdtrt.InvalidArgumentError, match=f"^ranks must be a positive integer, got {ranks!r}$"):
        attention.default_hints(ranks)
    with pytest.raises(mdtrt.InvalidArgumentError, match=f"^ranks must be a positive integer, got {ranks!r}$"):
        shard(attention.create_attention_model(SMALL), attention.default_hints(2), ranks)


def test_shard_inserts_the_expected_collectives(small_model):
    sharded = shard(small_model, attention.default_hints(4), ranks=4)
    collectives = [n for n in sharded.graph.node if n.op_type == "DistCollective"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in collectives]
    assert [a["collective_operation"] for a in attrs] == [b"reduce_scatter", b"all_gather", b"all_gather", b"all_gather"]
    assert attrs[0]["reduce_op"] == b"max" and collectives[0].input[0] == "input"
    assert all(a["nb_rank"] == 4 and a["root"] == -1 and list(a["groups"]) == [] for a in attrs)
    assert all(n.domain == "" for n in collectives)
    # Outputs keep their names; the gathered tensor feeds them.
    assert [o.name for o in sharded.graph.output] == ["output"]
    assert collectives[-1].output[0] == "output" and collectives[-1].input[0] == "output.rank_local"


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_model_matches_single_device(small_model, small_inputs, ranks):
    expected = run_on_cpu(small_model, small_inputs, progress=False)
    sharded = shard(small_model, attention.default_hints(ranks), ranks)
    per_rank = simulate(sharded, small_inputs, ranks, progress=False)
    assert len(per_rank) == ranks
    for outputs in per_rank:
        report = compare_outputs(expected, outputs, atol=F32_ATOL, rtol=F32_RTOL)
        assert report.passed, report.format()


def test_float16_sharded_matches_within_tolerance():
    model = attention.create_attention_model(hidden=64, heads=4, head_dim=16, dtype="float16")
    x = attention.random_inputs(model, {"sequence_length": 16, "batch_size": 1})
    expected = run_on_cpu(model, x, progress=False)
    outputs = simulate(shard(model, attention.default_hints(2), 2), x, 2, progress=False)[1]
    report = compare_outputs(expected, outputs, atol=1e-2, rtol=1e-2)
    assert report.passed, report.format()


def test_wrong_hints_fail_the_check(small_model, small_inputs):
    expected = run_on_cpu(small_model, small_inputs, progress=False)
    # The batch axis given as the sequence axis of the input.
    hints = attention.default_hints(2)
    hints["inputs"][0]["seq_len_idx"] = 1
    outputs = simulate(shard(small_model, hints, 2), small_inputs, 2, progress=False)[0]
    report = compare_outputs(expected, outputs, atol=F32_ATOL, rtol=F32_RTOL)
    assert not report.passed and "shape" in report.format()


def test_hints_naming_nothing_are_refused(small_model):
    hints = attention.default_hints(2)
    hints["attention_layers"][0]["q"] = "q_scaled_typo"
    with pytest.raises(ValueError, match="q_scaled_typo"):
        shard(small_model, hints, 2)
    hints = attention.default_hints(2)
    hints["inputs"][0]["name"] = "x"
    with pytest.raises(ValueError, match="'x' is not a model input"):
        shard(small_model, hints, 2)


def test_sample_hint_file_is_the_default():
    assert json.loads((SAMPLE_DIR / "hint.json").read_text()) == attention.DEFAULT_HINTS


def test_cli_cpu_verification(capsys):
    status = attention_cli.main(
        ["--hidden", "32", "--heads", "2", "--head-dim", "16", "--dtype", "float32",
         "--sequence-length", "8", "--ranks", "4", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "PASSED" in out and "max abs error" in out
    import mdtrt

    if not mdtrt.build_info()["tensorrt_backend"]:
        assert "TensorRT is needed for the GPU run" in out


def test_cli_reports_a_wrong_hint(tmp_path, capsys):
    hints = attention.default_hints(2)
    hints["inputs"][0]["seq_len_idx"] = 1  # the batch axis: the sharded model computes something else
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(hints))
    status = attention_cli.main(
        ["--mode", "cpu", "--hidden", "32", "--heads", "2", "--head-dim", "16", "--dtype", "float32",
         "--sequence-length", "8", "--batch-size", "2", "--hint", str(path), "--no-progress"]
    )
    assert status == 1 and "FAILED" in capsys.readouterr().out


def test_cli_rejects_indivisible_sequence(capsys):
    assert attention_cli.main(["--mode", "cpu", "--ranks", "3", "--sequence-length", "8", "--no-progress"]) == 2
    assert "divisible" in capsys.readouterr().out


def test_cli_says_why_the_gpu_run_cannot_happen_and_still_verifies(monkeypatch, capsys):
    # As on a GPU machine whose only TensorRT is the lean runtime (it cannot build engines).
    monkeypatch.setattr(attention_cli, "_gpu_run_blocker", lambda ranks: "the GPU run builds engines, which needs the full TensorRT")
    code = attention_cli.main(["--ranks", "2", "--hidden", "64", "--heads", "4", "--head-dim", "16",
                           "--sequence-length", "16", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "needs the full TensorRT" in out and "PASSED" in out


@pytest.mark.parametrize("reason", ["no CUDA GPU is visible", "or set MDTRT_TENSORRT_LIBRARY=/path/to/libnvinfer.so.11."])
def test_cli_gpu_mode_that_cannot_run_points_to_the_cpu_mode(monkeypatch, capsys, reason):
    monkeypatch.setattr(attention_cli, "_gpu_run_blocker", lambda ranks: reason)
    assert attention_cli.main(["--mode", "gpu", "--ranks", "2", "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert f"cannot run on GPUs: {reason.rstrip('.')}. --mode cpu" in out  # one period, also after a library's


@pytest.mark.parametrize("gpus", [0, 1, 2])
@pytest.mark.parametrize("backend", [False, True])
def test_gpu_run_blocker_names_every_reason_at_once(monkeypatch, gpus, backend):
    """No GPU and no TensorRT backend: both are said (was: only the backend, so a user rebuilt
    with TensorRT headers and was then told there is no GPU); no GPU says why (the driver's answer);
    no backend says the rebuild command of the builders (the GPU run builds engines: the full
    TensorRT, as a plain `pip install` would drop the backend again)."""
    from mdtrt import _core, tensorrt

    monkeypatch.setattr(_core, "visible_gpu_count", lambda: gpus)
    monkeypatch.setattr(mdtrt, "build_info", lambda: {"tensorrt_backend": backend, "tensorrt_reason": "no headers"})
    monkeypatch.setattr(tensorrt, "library_report", lambda: {"library_found": False, "error": "no libnvinfer"})
    for name in ("RANK", "WORLD_SIZE", "TRT_MY_RANK", "TRT_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    blocker = attention_cli._gpu_run_blocker(2)
    expected = {0: f"no CUDA GPU is visible ({mdtrt.cuda_state.why_no_gpu()})", 1: "2 ranks need 2 GPUs; only 1 GPU",
                2: None}[gpus]
    trt = ("TensorRT is needed for the GPU run and was not found: no libnvinfer" if backend else
           "TensorRT is needed for the GPU run, and this mdtrt has no TensorRT backend (no headers): "
           + tensorrt.REBUILD_TO_BUILD_ENGINES)
    assert blocker is not None and trt in blocker, blocker
    assert (expected is None and blocker == trt) or (blocker.startswith(expected) and blocker.endswith("; " + trt))


def test_cli_bad_sequence_is_refused_before_saying_the_cpu_run_starts(monkeypatch, capsys):
    """With the GPU run impossible, a sequence the CPU run refuses is the only thing said."""
    monkeypatch.setattr(attention_cli, "_gpu_run_blocker", lambda ranks: "no CUDA GPU is visible")
    assert attention_cli.main(["--ranks", "2", "--sequence-length", "255", "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "divisible" in out and "Running the CPU verification" not in out, out


SMALL_CLI = ["--mode", "cpu", "--hidden", "32", "--heads", "4", "--head-dim", "8", "--dtype", "float32",
             "--sequence-length", "8", "--no-progress"]


@pytest.mark.parametrize("strategy", ["allgather_kv", "ulysses", "ring"])
def test_cli_strategies(strategy, capsys):
    assert attention_cli.main([*SMALL_CLI, "--ranks", "4", "--strategy", strategy]) == 0
    out = capsys.readouterr().out
    assert f"strategy {strategy}" in out and "PASSED" in out
    assert f"{strategy}: per rank and attention layer, receives" in out
    assert ("MiB of float32 scores" in out) == (strategy == "ring")


def _one_line_error(capsys, expected: str):
    out, err = capsys.readouterr()
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], out
    assert "Traceback" not in out + err and "polygraphy_class" not in out + err  # no polygraphy schema dump


def test_cli_bad_hint_files_are_one_line(tmp_path, capsys):
    assert attention_cli.main([*SMALL_CLI, "--hint", str(tmp_path / "missing.json")]) == 2
    _one_line_error(capsys, "missing.json does not exist")
    broken = tmp_path / "broken.json"
    broken.write_text('{"parallelism": "CP",')
    assert attention_cli.main([*SMALL_CLI, "--hint", str(broken)]) == 2
    _one_line_error(capsys, "is not valid JSON")
    hints = attention.default_hints(2)
    del hints["k_seq_len_idx"]
    no_key = tmp_path / "no_key.json"
    no_key.write_text(json.dumps(hints))
    assert attention_cli.main([*SMALL_CLI, "--hint", str(no_key)]) == 2
    _one_line_error(capsys, "'k_seq_len_idx' is missing; it must be the sequence axis of K")


def test_cli_bad_reduce_op_is_refused_before_any_build(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(attention_cli, "_gpu_run_blocker", lambda ranks: None)  # as on a GPU machine
    monkeypatch.setattr(attention_cli, "_build_engine", lambda *args: built.append(args))
    hints = attention.default_hints(2)
    hints["dist_collectives"]["reduce_op"] = "sum"
    path = tmp_path / "sum.json"
    path.write_text(json.dumps(hints))
    assert attention_cli.main([*SMALL_CLI[2:], "--hint", str(path)]) == 2
    _one_line_error(capsys, "reduce_op")
    assert built == []


def test_cli_ranks_must_match_hints_and_launcher(tmp_path, capsys, monkeypatch):
    path = tmp_path / "two.json"
    path.write_text(json.dumps(attention.default_hints(2)))
    assert attention_cli.main([*SMALL_CLI, "--ranks", "4", "--hint", str(path)]) == 2
    _one_line_error(capsys, "--ranks is 4 but the hints are for 2 ranks")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert attention_cli.main([*SMALL_CLI, "--ranks", "4"]) == 2
    _one_line_error(capsys, "--ranks is 4 but torchrun started a world of 2")


def test_cli_ulysses_heads_not_divisible(capsys):
    assert attention_cli.main([*SMALL_CLI, "--ranks", "3", "--sequence-length", "9", "--strategy", "ulysses"]) == 2
    _one_line_error(capsys, "4 heads")


def test_module_command_missing_hint_is_one_line(tmp_path):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    result = subprocess.run([sys.executable, "-m", "mdtrt", "attention", "--hint", str(tmp_path / "missing.json")],
                            capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "missing.json does not exist" in result.stdout


def test_sample_script_uses_the_package_cli_under_its_own_name():
    text = (SAMPLE_DIR / "attention_mdtrt.py").read_text()
    assert "from mdtrt.attention_cli import main" in text
    result = subprocess.run([sys.executable, str(SAMPLE_DIR / "attention_mdtrt.py"), "--help"], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
    assert result.returncode == 0 and result.stdout.startswith("usage: python attention_mdtrt.py"), result.stdout


def test_engines_are_built_on_the_ranks_gpu_when_the_builder_can(monkeypatch, small_model):
    from mdtrt import tensorrt

    calls = []

    def with_device(model, *, profiles=None, device=None):
        calls.append(("device", device))
        return b"plan"

    def without_device(model, *, profiles=None):
        calls.append(("no device", None))
        return b"plan"

    for builder in (with_device, without_device):
        monkeypatch.setattr(tensorrt, "build_engine_from_onnx", builder)
        assert attention_cli._build_engine(small_model, {"input": ((1, 1, 48),) * 3}, 1) == b"plan"
    assert calls == [("device", 1), ("no device", None)]


def test_gpu_run_compares_poisoned_outputs(monkeypatch):
    """The GPU run's device-resident outputs come from a first call with poisoned outputs: an engine
    that wrote nothing gives NaN, which fails the comparison, instead of memory that happens to
    match the other engine's (torch stands in as a namespace; no GPU needed)."""
    from types import SimpleNamespace

    class DeviceOutput:  # an output as mdtrt.DeviceArray hands it back
        def __init__(self, value):
            self.value = value

        def numpy(self):
            return self.value

    class Runner:
        def __init__(self):
            self.infer_options = []

        def infer(self, inputs, **options):
            self.infer_options.append(options)
            return [{"output": DeviceOutput(np.full(3, float(rank), np.float32))} for rank in range(len(inputs))]

        def prepare(self, inputs, **options):
            self.prepared_outputs = options["outputs"]
            return lambda: None

    monkeypatch.setattr(attention_cli, "event_times_ms", lambda torch, gpus, call, iterations, warmup: [1.0] * iterations)
    fake_torch = SimpleNamespace(as_tensor=lambda value, device: value)
    runner = Runner()
    times, result = attention_cli._time_on_device(runner, {"input": np.ones(3, np.float32)}, [0, 1], 2, fake_torch)
    assert runner.infer_options == [{"all_ranks": True, "poison_outputs": True}]
    assert [o.value.tolist() for o in runner.prepared_outputs["output"]] == [[0.0] * 3, [1.0] * 3]  # the first call's
    assert times == [1.0, 1.0] and list(result) == ["output"]
    np.testing.assert_array_equal(result["output"], np.zeros(3, np.float32))  # rank 0's output


@pytest.mark.multi_gpu
@pytest.mark.parametrize("strategy", ["allgather_kv", "ulysses", "ring"])
def test_gpu_run(strategy, capsys):  # pragma: no cover - needs GPUs and TensorRT
    import mdtrt

    from trt_double import without_backend

    if without_backend():
        pytest.skip(without_backend())
    from mdtrt import tensorrt

    report = tensorrt.library_report()
    if not report["library_found"] or report["lean"]:
        pytest.skip(f"the GPU run needs the full TensorRT (builder): {report['error'] or 'only the lean runtime'}")
    code = attention_cli.main(["--mode", "gpu", "--strategy", strategy, "--sequence-length", "1024",
                               "--iterations", "5", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    import importlib.util

    timed_on_device = importlib.util.find_spec("torch") is not None  # CUDA events come from torch
    assert ("CUDA events around each call on device-resident" in out) == timed_on_device and "speedup" in out


@pytest.mark.parametrize("option, value, says", [
    ("--sequence-length", "0", "must be a positive integer, got 0"),
    ("--batch-size", "0", "must be a positive integer, got 0"),
    ("--iterations", "-3", "must be a positive integer, got -3"),
    ("--ranks", "0", "must be a positive integer, got 0"),
    ("--hidden", "-8", "must be a positive integer, got -8"),
    ("--heads", "0", "must be a positive integer, got 0"),
    ("--head-dim", "0", "must be a positive integer, got 0"),
    ("--seed", "-1", "must be 0 or more, got -1"),
    ("--atol", "-1", "must be a finite number >= 0, got -1"),
    ("--rtol", "-0.5", "must be a finite number >= 0, got -0.5"),
    ("--rtol", "nan", "must be a finite number >= 0, got nan"),
    ("--batch-size", "two", "must be an integer, got 'two'"),
])
def test_cli_numbers_out_of_range_are_argparse_errors(option, value, says, capsys, monkeypatch):
    monkeypatch.setattr(attention, "create_attention_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_:
        attention_cli.main([*SMALL_CLI, option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"error: argument {option}: {says}" in err and "Traceback" not in err


def _no_model_built(monkeypatch):
    monkeypatch.setattr(attention, "create_attention_model", lambda *a, **k: pytest.fail("a model was built"))


def test_cli_ulysses_heads_not_divisible_is_refused_before_anything(capsys, monkeypatch):
    _no_model_built(monkeypatch)
    monkeypatch.setattr(attention_cli, "_gpu_run_blocker", lambda ranks: pytest.fail("looked for GPUs"))
    assert attention_cli.main([*SMALL_CLI, "--ranks", "3", "--sequence-length", "9", "--strategy", "ulysses"]) == 2
    out = capsys.readouterr().out
    assert "receives" not in out  # no traffic figures for a run that cannot happen
    _one_line_error(_Captured(out), "4 heads (--heads), which 3 ranks do not divide")


class _Captured:
    """A capsys stand-in for output already read."""

    def __init__(self, out: str, err: str = ""):
        self.out, self.err = out, err

    def readouterr(self):
        return self.out, self.err


@pytest.mark.parametrize("where", ["/proc/nope", "file"])
def test_cli_save_dir_that_cannot_be_written_is_refused_before_building(where, tmp_path, capsys, monkeypatch):
    _no_model_built(monkeypatch)
    path = where
    if where == "file":
        path = tmp_path / "a_file"
        path.write_text("")
    assert attention_cli.main([*SMALL_CLI, "--save-dir", str(path)]) == 2
    expected = "is a file, not a directory" if where == "file" else "/proc/nope cannot be created"
    _one_line_error(capsys, f"--save-dir {path} {expected}" if where == "file" else expected)


def test_cli_save_dir_is_created_and_written(tmp_path, capsys):
    target = tmp_path / "new" / "models"
    assert attention_cli.main([*SMALL_CLI, "--ranks", "2", "--save-dir", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["attention_md.onnx", "attention_sd.onnx"]


def test_create_model_help_describes_every_option_it_writes_to():
    result = subprocess.run([sys.executable, str(SAMPLE_DIR / "create_model.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help to the terminal's width
    assert ("--output-dir OUTPUT_DIR folder to write attention_sd.onnx and attention_md.onnx to, created if missing "
            "(default: the current folder, '.')") in text, result.stdout


def test_create_model_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    script = SAMPLE_DIR / "create_model.py"
    for target, expected in (("/proc/nope", "--output-dir /proc/nope cannot be created"),
                             (str(script), "is a file, not a directory")):
        result = subprocess.run([sys.executable, str(script), "--output-dir", target, "--hidden", "32", "--heads", "2",
                                 "--head-dim", "16"], capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and result.stdout.startswith("error: ") and expected in result.stdout, \
            result.stdout + result.stderr
    result = subprocess.run([sys.executable, str(script), "--ranks", "0"], capture_output=True, text=True, timeout=120,
                            env=env, cwd=str(tmp_path))
    assert result.returncode == 2 and "argument --ranks: must be a positive integer, got 0" in result.stderr


def test_cli_hint_that_is_a_directory(tmp_path, capsys):
    assert attention_cli.main([*SMALL_CLI, "--hint", str(tmp_path)]) == 2
    _one_line_error(capsys, f"{tmp_path} is a directory: give a ShardHints JSON file")


def test_cli_default_sequence_not_divisible_says_the_default_and_a_length(capsys, monkeypatch):
    _no_model_built(monkeypatch)
    args = ["--mode", "cpu", "--hidden", "32", "--heads", "3", "--head-dim", "8", "--no-progress"]
    assert attention_cli.main([*args, "--ranks", "3"]) == 2
    _one_line_error(capsys, f"default sequence length {attention_cli.CPU_DEFAULT_SEQUENCE_LENGTH} is not divisible by "
                            "--ranks 3: give --sequence-length 258")


@pytest.mark.parametrize("change, expected", [
    (lambda h: h["dist_collectives"].pop("nb_rank"), "have no dist_collectives.nb_rank"),
    (lambda h: h.update(stratgey="ring"), "unknown field 'stratgey'; the known ones are parallelism"),
    (lambda h: h["attention_layers"][0].update(gather_kvv=True), "unknown field 'gather_kvv'; the known ones are q,"),
])
def test_cli_hint_files_with_missing_or_unknown_fields(change, expected, tmp_path, capsys, monkeypatch):
    _no_model_built(monkeypatch)
    hints = attention.default_hints(2)
    change(hints)
    path = tmp_path / "hints.json"
    path.write_text(json.dumps(hints))
    assert attention_cli.main([*SMALL_CLI, "--hint", str(path)]) == 2
    _one_line_error(capsys, expected)


def test_cli_one_rank_is_said_in_the_singular(capsys):
    assert attention_cli.main([*SMALL_CLI, "--ranks", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 simulated rank," in out and "1 simulated rank vs" in out and "ranks" not in out.split("strategy")[0]


@pytest.mark.parametrize("command", [["attention", "--no-progress"], ["doctor"]])
def test_ctrl_c_in_a_command_is_one_line_and_status_130(command, monkeypatch, capsys):
    import mdtrt.__main__ as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attention_cli, "main", interrupted)
    monkeypatch.setattr("mdtrt.doctor.main", interrupted)
    assert cli.main(command) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "mdtrt: interrupted" and "Traceback" not in captured.out + captured.err


def test_create_model_takes_the_ranks_from_the_hints_as_the_cli_does(tmp_path):
    """create_model.py without --ranks shards for the hints' nb_rank (as `python -m mdtrt attention`
    does); a --ranks that disagrees names the --ranks to give."""
    import json as _json

    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    script = SAMPLE_DIR / "create_model.py"
    hints = _json.loads((SAMPLE_DIR / "hint.json").read_text())
    hints["dist_collectives"]["nb_rank"] = 4
    hint_file = tmp_path / "h4.json"
    hint_file.write_text(_json.dumps(hints))
    small = ["--hidden", "32", "--heads", "4", "--head-dim", "8", "--output-dir", str(tmp_path)]
    result = subprocess.run([sys.executable, str(script), "--hint", str(hint_file), *small], capture_output=True,
                            text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    import onnx

    md = onnx.load(str(tmp_path / "attention_md.onnx"))
    nb_ranks = {a.i for node in md.graph.node if node.op_type == "DistCollective" for a in node.attribute
                if a.name == "nb_rank"}
    assert nb_ranks == {4}, nb_ranks
    result = subprocess.run([sys.executable, str(script), "--hint", str(hint_file), "--ranks", "2", *small],
                            capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert result.returncode == 2 and "give --ranks 4" in result.stdout, result.stdout + result.stderr
