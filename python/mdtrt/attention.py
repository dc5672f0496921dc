"""The multi-device attention sample: model creation, sharding, CPU verification and GPU run.

The model is one self-attention block, ``(sequence, batch, hidden) -> (sequence, batch, hidden)``:
Q/K/V projections, RMSNorm on Q and K over each head, scaled dot-product attention over
``heads x head_dim`` and an output projection. Sharded with :data:`DEFAULT_HINTS` (context
parallelism), each rank keeps ``sequence / ranks`` query rows and all-gathers K and V.

``python -m mdtrt attention`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

__all__ = [
    "AttentionConfig",
    "DEFAULT_HINTS",
    "create_attention_model",
    "default_hints",
    "random_inputs",
    "verify_on_cpu",
    "main",
]

#: Name of the Q tensor feeding the attention's first MatMul (what the hints point at).
Q_TENSOR_NAME = "q_scaled"
INPUT_NAME = "input"
OUTPUT_NAME = "output"

#: Hints for ``polygraphy multi-device shard``: reduce-scatter the input along the sequence
#: (axis 0), all-gather K (sequence at axis 3 of ``(batch, heads, head_dim, sequence)``) and V
#: (axis 2 of ``(batch, heads, sequence, head_dim)``) before attention, all-gather the output.
DEFAULT_HINTS = {
    "parallelism": "CP",
    "attention_layers": [
        {
            "q": Q_TENSOR_NAME,
            "gather_kv": True,
            "gather_q": False,
            "replace": None,
            "polygraphy_class": "AttentionLayerHint",
        }
    ],
    "dist_collectives": {
        "group_size": 0,
        "root": -1,
        "nb_rank": 2,
        # Every rank holds the whole input, so max over identical copies is the input itself:
        # the reduce-scatter only scatters.
        "reduce_op": "max",
        "groups": [],
        "polygraphy_class": "DistCollective",
    },
    "inputs": [{"name": INPUT_NAME, "seq_len_idx": 0, "rank": 3, "polygraphy_class": "ShardTensor"}],
    "outputs": [{"name": OUTPUT_NAME, "seq_len_idx": 0, "rank": 3, "polygraphy_class": "ShardTensor"}],
    "k_seq_len_idx": 3,
    "v_seq_len_idx": 2,
    "kv_rank": 4,
    "polygraphy_class": "ShardHints",
}


def default_hints(ranks: int = 2) -> dict:
    """A copy of :data:`DEFAULT_HINTS` for ``ranks`` devices."""
    hints = json.loads(json.dumps(DEFAULT_HINTS))
    hints["dist_collectives"]["nb_rank"] = ranks
    return hints


_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes of the attention model; the defaults are those of NVIDIA's sample."""

    hidden: int = 4096
    heads: int = 32
    head_dim: int = 128
    dtype: str = "float16"
    seed: int = 0
    opset: int = 17

    def __post_init__(self):
        for name in ("hidden", "heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype])


def create_attention_model(config: AttentionConfig | None = None, **sizes) -> onnx.ModelProto:
    """Build the single-device attention model with onnx-graphsurgeon.

    ``create_attention_model(hidden=64, heads=4, head_dim=16, dtype="float32")`` or with an
    :class:`AttentionConfig`. Weights are random from ``config.seed``, scaled by
    ``1/sqrt(fan_in)`` so that activations stay of order one (float16 does not overflow).
    Input ``input`` and output ``output`` have shape ``(sequence_length, batch_size, hidden)``.
    """
    if config is None:
        config = AttentionConfig(**sizes)
    elif sizes:
        raise TypeError("give either an AttentionConfig or sizes as keywords, not both")
    try:
        import onnx_graphsurgeon as gs
    except ImportError as error:
        raise ImportError(
            f"creating the attention model needs onnx-graphsurgeon: pip install onnx-graphsurgeon ({error})"
        ) from error

    rng = np.random.default_rng(config.seed)
    dtype = config.numpy_dtype
    inner = config.heads * config.head_dim
    graph = gs.Graph(opset=config.opset, name="attention")
    counter = iter(range(1 << 30))

    def op(op_type, inputs, attrs=None, name=None, dtype_out=None):
        """Add a node with one output and return that output."""
        out = gs.Variable(name or f"{op_type.lower()}_{next(counter)}", dtype=dtype_out)
        graph.nodes.append(gs.Node(op_type, inputs=list(inputs), outputs=[out], attrs=attrs or {}))
        return out

    def constant(name, values):
        return gs.Constant(name, np.asarray(values))

    def weight(name, fan_in, shape):
        return constant(name, (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(dtype))

    x = gs.Variable(INPUT_NAME, dtype=dtype, shape=["sequence_length", "batch_size", config.hidden])
    graph.inputs = [x]
    to_heads = constant("heads_shape", np.array([0, 0, config.heads, config.head_dim], np.int64))

    def project_to_heads(which):
        projected = op("MatMul", [x, weight(f"w_{which}", config.hidden, (config.hidden, inner))])
        # Reshape's 0 keeps the (dynamic) sequence and batch sizes: (S, B, heads, head_dim).
        return op("Reshape", [projected, to_heads], name=f"{which}_heads")

    def rms_norm(which, tensor):
        # Normalised in float32 whatever the model dtype, as the float16 square would overflow.
        wide = op("Cast", [tensor], {"to": onnx.TensorProto.FLOAT}) if dtype != np.float32 else tensor
        mean_square = op("ReduceMean", [op("Mul", [wide, wide])], {"axes": [-1], "keepdims": 1})
        root_mean = op("Sqrt", [op("Add", [mean_square, constant(f"{which}_eps", np.float32(1e-6))])])
        normalised = op("Div", [wide, root_mean])
        if dtype != np.float32:
            normalised = op("Cast", [normalised], {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)})
        gain = (1.0 + 0.1 * rng.standard_normal(config.head_dim)).astype(dtype)
        return op("Mul", [normalised, constant(f"{which}_norm_weight", gain)], name=f"{which}_normed")

    q = rms_norm("q", project_to_heads("q"))
    k = rms_norm("k", project_to_heads("k"))
    v = project_to_heads("v")

    # Attention layout: (batch, heads, sequence, head_dim); K as (batch, heads, head_dim, sequence).
    q = op("Transpose", [q], {"perm": [1, 2, 0, 3]})
    k_transposed = op("Transpose", [k], {"perm": [1, 2, 3, 0]}, name="k_transposed")
    v = op("Transpose", [v], {"perm": [1, 2, 0, 3]}, name="v_attention")
    scale = constant("attention_scale", np.array(1.0 / math.sqrt(config.head_dim), dtype))
    q_scaled = op("Mul", [q, scale], name=Q_TENSOR_NAME)

    # The MatMul -> Softmax -> MatMul chain is the pattern polygraphy's shard tool matches.
    scores = op("MatMul", [q_scaled, k_transposed], name="attention_scores")
    probabilities = op("Softmax", [scores], {"axis": -1}, name="attention_probabilities")
    context = op("MatMul", [probabilities, v], name="attention_context")

    context = op("Transpose", [context], {"perm": [2, 0, 1, 3]})  # (S, B, heads, head_dim)
    context = op("Reshape", [context, constant("merge_heads_shape", np.array([0, 0, inner], np.int64))])
    output = op("MatMul", [context, weight("w_out", inner, (inner, config.hidden))], name=OUTPUT_NAME)
    output.dtype = dtype
    output.shape = ["sequence_length", "batch_size", config.hidden]
    graph.outputs = [output]

    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    # IR 8 is read by every onnxruntime and TensorRT parser we target (opset 17 needs IR >= 8).
    model.ir_version = 8
    return model


def random_inputs(
    model: onnx.ModelProto, dims: dict[str, int] | None = None, *, seed: int = 1
) -> dict[str, np.ndarray]:
    """Standard-normal inputs for every graph input of ``model``, symbolic dimensions taken from
    ``dims`` (e.g. ``{"sequence_length": 128, "batch_size": 1}``)."""
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif dim.dim_param in dims:
                shape.append(int(dims[dim.dim_param]))
            else:
                raise ValueError(
                    f"input {value.name!r} axis {axis} is symbolic ({dim.dim_param or 'unnamed'}); "
                    f"give its size in dims (have {sorted(dims)})"
                )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        inputs[value.name] = rng.standard_normal(shape).astype(dtype)
    return inputs


# Pass criteria, as max|md - sd| <= atol + rtol * max|sd|. Both runs do the same arithmetic on
# the same rows, so float32 agrees to rounding; float16 kernels block their sums differently
# for different row counts, which moves results by a few float16 ulps.
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2)}

#: Sizes of the CPU verification when no GPU run is possible: the sample's model, short sequence.
CPU_DEFAULT_SEQUENCE_LENGTH = 256
#: Sequence length of the GPU run, as in NVIDIA's sample.
GPU_DEFAULT_SEQUENCE_LENGTH = 56320


def _say(message: str) -> None:
    print(message, flush=True)


def _gpu_run_blocker(ranks: int) -> str | None:
    """Why the GPU run cannot happen here, or None when it can."""
    try:
        import mdtrt
        from mdtrt import _core
    except ImportError as error:  # pragma: no cover - the extension is part of the package
        return f"the mdtrt extension does not load ({error})"
    info = mdtrt.build_info()
    if not info.get("tensorrt_backend"):
        reason = info.get("tensorrt_backend_reason") or info.get("tensorrt_reason") or ""
        return "TensorRT is needed for the GPU run, and this mdtrt has no TensorRT backend" + (
            f" ({reason})" if reason else ""
        )
    try:
        gpus = int(_core.visible_gpu_count())
    except Exception as error:  # noqa: BLE001 - no driver reads as no GPU
        return f"no CUDA GPU is usable ({error})"
    if gpus < 1:
        return "no CUDA GPU is visible"
    if gpus < ranks and not _launched_by_launcher():
        return f"{ranks} ranks need {ranks} GPUs, {gpus} are visible"
    for name in ("DeviceGroup", "EngineRunner"):
        if not hasattr(mdtrt, name):
            return f"this mdtrt has no {name} yet"
    import importlib.util

    if importlib.util.find_spec("mdtrt.tensorrt") is None:
        return "this mdtrt has no mdtrt.tensorrt module (engine builder) yet"
    from . import tensorrt as mdtrt_tensorrt

    report = mdtrt_tensorrt.library_report()
    if not report["library_found"]:
        return f"TensorRT is needed for the GPU run and was not found: {report['error']}"
    if report["lean"]:
        return (f"the GPU run builds engines, which needs the full TensorRT; only the lean runtime was found "
                f"({report['path']}): pip install 'mdtrt[tensorrt]' where NVIDIA's index is reachable")
    return None


def _launched_by_launcher() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE", "PMIX_RANK"))


def _build_models(config: AttentionConfig, hints, ranks: int, save_dir: str | None):
    from .sharding import shard

    single = create_attention_model(config)
    multi = shard(single, hints, ranks)
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        onnx.save(single, os.path.join(save_dir, "attention_sd.onnx"))
        onnx.save(multi, os.path.join(save_dir, "attention_md.onnx"))
        _say(f"saved attention_sd.onnx and attention_md.onnx ({ranks} ranks) to {save_dir}")
    return single, multi


def verify_on_cpu(
    config: AttentionConfig,
    *,
    ranks: int = 2,
    sequence_length: int = 256,
    batch_size: int = 1,
    hints=None,
    tolerance: tuple[float, float] | None = None,
    progress: bool = True,
    save_dir: str | None = None,
):
    """Shard the attention model for ``ranks``, run it on simulated ranks on the CPU and compare
    every rank's output with the single-device model's. Returns the
    :class:`~mdtrt._simulate.ComparisonReport` of the worst rank."""
    import time

    from ._simulate import compare_outputs, run_on_cpu, simulate

    hints = default_hints(ranks) if hints is None else hints
    atol, rtol = tolerance or TOLERANCES[config.dtype]
    start = time.perf_counter()
    single, multi = _build_models(config, hints, ranks, save_dir)
    inputs = random_inputs(single, {"sequence_length": sequence_length, "batch_size": batch_size}, seed=config.seed + 1)
    _say(f"built and sharded the model in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    expected = run_on_cpu(single, inputs, progress=progress)
    _say(f"single-device run on the CPU: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    per_rank = simulate(multi, inputs, ranks, progress=progress)
    _say(f"{ranks} simulated ranks on the CPU: {time.perf_counter() - start:.1f} s")
    reports = [compare_outputs(expected, outputs, atol=atol, rtol=rtol) for outputs in per_rank]
    worst = max(range(ranks), key=lambda r: (not reports[r].passed, max(o.max_abs_error for o in reports[r].outputs)))
    return reports[worst], worst


def _gpu_run(args, config: AttentionConfig, hints) -> int:
    import mdtrt
    from mdtrt import tensorrt as mdtrt_tensorrt

    from ._simulate import compare_outputs

    ranks = args.ranks
    sequence = args.sequence_length or GPU_DEFAULT_SEQUENCE_LENGTH
    if sequence % ranks:
        _say(f"error: --sequence-length {sequence} must be divisible by --ranks {ranks}")
        return 2
    single, multi = _build_models(config, hints, ranks, args.save_dir)
    inputs = random_inputs(single, {"sequence_length": sequence, "batch_size": args.batch_size}, seed=config.seed + 1)
    shape = inputs[INPUT_NAME].shape
    # Every rank receives the whole input (the first collective scatters it), so one fixed
    # profile at the full shape serves both engines.
    profiles = {INPUT_NAME: (shape, shape, shape)}
    fp16 = config.dtype == "float16"
    launched = _launched_by_launcher()
    group = mdtrt.DeviceGroup.from_env() if launched else mdtrt.DeviceGroup(gpus=list(range(ranks)), timeout=60.0)
    with group:
        # Under a launcher each process holds some ranks; the one holding rank 0 reports.
        leads = 0 in list(getattr(group, "ranks", [0]))
        first_gpu = list(getattr(group, "gpus", None) or [0])[0]
        talk = _say if leads else (lambda message: None)
        talk(f"building the single-device engine (sequence {sequence}, batch {args.batch_size})")
        single_engine = mdtrt_tensorrt.build_engine_from_onnx(single.SerializeToString(), profiles=profiles, fp16=fp16)
        talk(f"building the {ranks}-rank engine once, loading it on every GPU of the group")
        multi_engine = mdtrt_tensorrt.build_engine_from_onnx(multi.SerializeToString(), profiles=profiles, fp16=fp16)
        multi_runner = mdtrt.EngineRunner(group, multi_engine)
        multi_outputs = multi_runner.infer(inputs)
        multi_times = multi_runner.time_infer(inputs, args.iterations)
    if not leads:
        return 0
    with mdtrt.DeviceGroup(gpus=[first_gpu], timeout=60.0) as single_group:
        single_runner = mdtrt.EngineRunner(single_group, single_engine, multi_device=False)
        single_outputs = single_runner.infer(inputs)
        single_times = single_runner.time_infer(inputs, args.iterations)
    atol, rtol = args.atol, args.rtol
    if atol is None or rtol is None:
        atol, rtol = (2 * t for t in TOLERANCES[config.dtype])  # TensorRT tactics differ per engine
    report = compare_outputs(single_outputs, multi_outputs, atol=atol, rtol=rtol)
    _say(report.format(f"GPU: {ranks}-rank engine vs single-device engine"))
    single_ms, multi_ms = statistics.median(single_times), statistics.median(multi_times)
    _say(
        f"median of {args.iterations} iterations (CUDA events): single-device {single_ms:.3f} ms, "
        f"{ranks} GPUs {multi_ms:.3f} ms, speedup {single_ms / multi_ms:.2f}x"
    )
    return 0 if report.passed else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mdtrt attention",
        description="Multi-device self-attention: shard with polygraphy, verify the sharded model "
        "against the single-device one on simulated CPU ranks, and with GPUs and TensorRT run and "
        "time it on several GPUs.",
    )
    parser.add_argument("--ranks", type=int, default=2, help="number of devices (default 2)")
    parser.add_argument(
        "--sequence-length", type=int, default=None,
        help=f"sequence length (default {GPU_DEFAULT_SEQUENCE_LENGTH} on GPUs, "
        f"{CPU_DEFAULT_SEQUENCE_LENGTH} for the CPU verification)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (inputs use seed + 1)")
    parser.add_argument("--hint", default=None, help="sharding hints JSON (default: the sample's hint.json)")
    parser.add_argument("--iterations", type=int, default=50, help="timed GPU iterations (median reported)")
    parser.add_argument(
        "--mode", choices=("auto", "cpu", "gpu"), default="auto",
        help="auto: GPU run when GPUs and TensorRT are there, CPU verification otherwise",
    )
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance of the check")
    parser.add_argument("--rtol", type=float, default=None, help="tolerance relative to max |reference|")
    parser.add_argument("--save-dir", default=None, help="write attention_sd.onnx and attention_md.onnx here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mdtrt attention``; returns the exit status (0 when the check passes)."""
    args = _parser().parse_args(argv)
    if args.ranks < 1:
        _say("error: --ranks must be at least 1")
        return 2
    try:
        config = AttentionConfig(args.hidden, args.heads, args.head_dim, args.dtype, args.seed)
    except ValueError as error:
        _say(f"error: {error}")
        return 2
    from .sharding import load_hints

    hints = load_hints(args.hint) if args.hint else default_hints(args.ranks)

    blocker = None if args.mode == "cpu" else _gpu_run_blocker(args.ranks)
    if args.mode == "gpu" and blocker:
        _say(f"cannot run on GPUs: {blocker}")
        return 2
    if args.mode != "cpu" and blocker is None:
        return _gpu_run(args, config, hints)
    if blocker:
        _say(f"GPU run skipped: {blocker}. Running the CPU verification instead.")

    sequence = args.sequence_length or CPU_DEFAULT_SEQUENCE_LENGTH
    if sequence % args.ranks:
        _say(f"error: --sequence-length {sequence} must be divisible by --ranks {args.ranks}")
        return 2
    tolerance = None
    if args.atol is not None or args.rtol is not None:
        default_atol, default_rtol = TOLERANCES[config.dtype]
        tolerance = (args.atol if args.atol is not None else default_atol, args.rtol if args.rtol is not None else default_rtol)
    _say(
        f"CPU verification: hidden {config.hidden}, {config.heads} heads x {config.head_dim}, "
        f"{config.dtype}, sequence {sequence}, batch {args.batch_size}, {args.ranks} simulated ranks"
    )
    try:
        report, worst_rank = verify_on_cpu(
            config, ranks=args.ranks, sequence_length=sequence, batch_size=args.batch_size,
            hints=hints, tolerance=tolerance, progress=not args.no_progress, save_dir=args.save_dir,
        )
    except (ValueError, ImportError, RuntimeError) as error:
        _say(f"error: {error}")
        return 2
    _say(report.format(f"CPU: {args.ranks} simulated ranks vs single device (worst: rank {worst_rank})"))
    _say("PASSED" if report.passed else "FAILED: the sharded model does not compute what the single-device model does")
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
