"""Command line of the attention sample: ``python -m mdtrt attention`` and
``samples/attention_mdtrt/attention_mdtrt.py`` (which calls :func:`main`).

It lives in the package because the wheel carries only ``python/mdtrt`` (not ``samples/``) and the
installed ``mdtrt attention`` command must work; the model and its CPU verification are in
:mod:`mdtrt.attention`, the sharding strategies in :mod:`mdtrt.context_parallel`.

With TensorRT and GPUs it builds the single-device and the sharded engine, runs the sharded one on
every GPU of the group and the single-device one on the first, checks one against the other and
times both on device-resident buffers with CUDA events; otherwise it verifies the sharded model
on simulated ranks on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import sys
from typing import Sequence

from . import attention
from .context_parallel import STRATEGIES, traffic_per_rank
from .cuda_timing import event_times_ms
from .errors import InvalidArgumentError, MdtrtError
from .launch import detect_launch

__all__ = ["main", "CPU_DEFAULT_SEQUENCE_LENGTH", "GPU_DEFAULT_SEQUENCE_LENGTH"]

#: Sequence length of the CPU verification (the sample's model, short sequence).
CPU_DEFAULT_SEQUENCE_LENGTH = 256
#: Sequence length of the GPU run, as in NVIDIA's sample.
GPU_DEFAULT_SEQUENCE_LENGTH = 56320
_MiB = 1 << 20


def _say(message: str) -> None:
    print(message, flush=True)


def _gpu_run_blocker(ranks: int) -> str | None:
    """Why the GPU run cannot happen here, or None when it can."""
    from . import _core, build_info
    from . import tensorrt as mdtrt_tensorrt

    info = build_info()
    if not info["tensorrt_backend"]:
        reason = info.get("tensorrt_reason") or ""
        return "TensorRT is needed for the GPU run, and this mdtrt has no TensorRT backend" + (
            f" ({reason})" if reason else "")
    try:
        gpus = int(_core.visible_gpu_count())
    except Exception as error:  # noqa: BLE001 - no driver reads as no GPU
        return f"no CUDA GPU is usable ({error})"
    if gpus < 1:
        return "no CUDA GPU is visible"
    if gpus < ranks and detect_launch() is None:
        return f"{ranks} ranks need {ranks} GPUs, {gpus} are visible"
    report = mdtrt_tensorrt.library_report()
    if not report["library_found"]:
        return f"TensorRT is needed for the GPU run and was not found: {report['error']}"
    if report["lean"]:
        return (f"the GPU run builds engines, which needs the full TensorRT; only the lean runtime was found "
                f"({report['path']}): pip install 'mdtrt[tensorrt]' where NVIDIA's index is reachable")
    return None


def _build_engine(model, profiles: dict, gpu: int) -> bytes:
    """Build on ``gpu`` where the builder takes ``device=`` (#15 item 7); older builders build on
    the current GPU."""
    from . import tensorrt as mdtrt_tensorrt

    build = mdtrt_tensorrt.build_engine_from_onnx
    extra = {"device": gpu} if "device" in inspect.signature(build).parameters else {}
    return build(model.SerializeToString(), profiles=profiles, **extra)


def _device_timer():
    """CUDA events through torch, which the GPU machines have; None without torch."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch if torch.cuda.is_available() else None


def _time_on_device(runner, inputs: dict, gpus: list[int], iterations: int, torch) -> tuple[list[float], dict]:
    """Milliseconds of each of ``iterations`` calls of ``runner`` on device-resident inputs and
    outputs (one copy per GPU, made before timing: no host copy inside the loop), measured with
    CUDA events recorded on each GPU's current stream before and after the call (the slowest GPU
    counts). A call waits for work queued on those streams and returns when every rank has
    finished, so the events bracket the engines plus mdtrt's per-call hand-off (tens of us).
    Returns the times and rank 0's outputs (numpy)."""
    per_rank = [{name: torch.as_tensor(value, device=f"cuda:{gpu}") for name, value in inputs.items()}
                for gpu in gpus]
    first = runner.infer(per_rank, all_ranks=True)  # device arrays out: their shapes and dtypes
    outputs = {name: [rank_outputs[name] for rank_outputs in first] for name in first[0]}
    call = runner.prepare(per_rank, all_ranks=True, outputs=outputs)
    times = event_times_ms(torch, gpus, call, iterations, warmup=3)
    result = {name: arrays[0].cpu().numpy() if hasattr(arrays[0], "cpu") else arrays[0].numpy()
              for name, arrays in outputs.items()}
    return times, result


def _gpu_run(args, config: attention.AttentionConfig, hints, ranks: int, strategy: str | None) -> int:
    from .device_group import DeviceGroup
    from .runner import EngineRunner
    from . import compare_outputs  # the public function

    sequence = args.sequence_length or GPU_DEFAULT_SEQUENCE_LENGTH
    if sequence % ranks:
        raise InvalidArgumentError(f"--sequence-length {sequence} must be divisible by --ranks {ranks}")
    single, multi = attention.build_models(config, hints, ranks, strategy=strategy, save_dir=args.save_dir, say=_say)
    inputs = attention.random_inputs(single, {"sequence_length": sequence, "batch_size": args.batch_size},
                                     seed=config.seed + 1)
    shape = inputs[attention.INPUT_NAME].shape
    # Every rank receives the whole input (the first collective scatters it), so one fixed
    # profile at the full shape serves both engines.
    profiles = {attention.INPUT_NAME: (shape, shape, shape)}
    launched = detect_launch() is not None
    group = DeviceGroup.from_env() if launched else DeviceGroup(gpus=list(range(ranks)), timeout=60.0)
    torch = _device_timer()
    with group:
        if group.world_size != ranks:
            raise InvalidArgumentError(f"--ranks is {ranks} but the launcher started {group.world_size} ranks")
        leads = 0 in group.ranks  # under a launcher each process holds some ranks; rank 0's reports
        gpus = group.gpus
        talk = _say if leads else (lambda message: None)
        talk(f"building the {ranks}-rank engine on GPU {gpus[0]} (sequence {sequence}, batch {args.batch_size})")
        multi_engine = _build_engine(multi, profiles, gpus[0])
        multi_runner = EngineRunner(group, multi_engine)
        if torch is not None:
            multi_times, multi_outputs = _time_on_device(multi_runner, inputs, gpus, args.iterations, torch)
        else:
            multi_outputs = multi_runner.infer(inputs)
            multi_times = multi_runner.time_infer(inputs, args.iterations)
    if not leads:
        return 0
    talk(f"building the single-device engine on GPU {gpus[0]}")
    single_engine = _build_engine(single, profiles, gpus[0])
    with DeviceGroup(gpus=[gpus[0]], timeout=60.0) as single_group:
        single_runner = EngineRunner(single_group, single_engine, multi_device=False)
        if torch is not None:
            single_times, single_outputs = _time_on_device(single_runner, inputs, [gpus[0]], args.iterations, torch)
        else:
            single_outputs = single_runner.infer(inputs)
            single_times = single_runner.time_infer(inputs, args.iterations)
    atol, rtol = args.atol, args.rtol
    if atol is None or rtol is None:
        atol, rtol = (2 * t for t in attention.TOLERANCES[config.dtype])  # TensorRT tactics differ per engine
    report = compare_outputs(single_outputs, multi_outputs, atol=atol, rtol=rtol)
    _say(report.format(f"GPU: {ranks}-rank engine vs single-device engine"))
    single_ms, multi_ms = statistics.median(single_times), statistics.median(multi_times)
    how = ("CUDA events around each call on device-resident inputs and outputs" if torch is not None else
           "host clock around each complete call, inputs copied from the host (install torch for CUDA-event timing "
           "on device-resident buffers)")
    _say(f"median of {args.iterations} iterations ({how}): single-device {single_ms:.3f} ms, "
         f"{ranks} GPUs {multi_ms:.3f} ms, speedup {single_ms / multi_ms:.2f}x")
    return 0 if report.passed else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mdtrt attention",
        description="Multi-device self-attention with context parallelism: shard (allgather_kv with polygraphy, "
        "ulysses or ring), verify the sharded model against the single-device one on simulated CPU ranks, and with "
        "GPUs and TensorRT run and time it on several GPUs.",
    )
    parser.add_argument("--ranks", type=int, default=None,
                        help="number of devices (default: the launcher's world size, else the hints' nb_rank, else 2)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="context-parallel strategy (default: the hints' \"strategy\" field, else allgather_kv)")
    parser.add_argument(
        "--sequence-length", type=int, default=None,
        help=f"sequence length (default {GPU_DEFAULT_SEQUENCE_LENGTH} on GPUs, "
        f"{CPU_DEFAULT_SEQUENCE_LENGTH} for the CPU verification)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (inputs use seed + 1)")
    parser.add_argument("--hint", default=None, help="sharding hints JSON (default: the sample's hint.json for --ranks)")
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


def _ranks(args, hints: dict | None) -> int:
    """--ranks, which must agree with the launcher's world size and the hints' rank count."""
    launch = detect_launch()
    declared = (hints or {}).get("dist_collectives", {}).get("nb_rank")
    ranks = args.ranks
    if ranks is None:
        ranks = launch.world_size if launch else declared if isinstance(declared, int) else 2
    if ranks < 1:
        raise InvalidArgumentError(f"--ranks must be at least 1, got {ranks}")
    if launch is not None and launch.world_size != ranks:
        raise InvalidArgumentError(f"--ranks is {ranks} but {launch.launcher} started a world of {launch.world_size}")
    if declared is not None and declared != ranks:
        raise InvalidArgumentError(
            f"--ranks is {ranks} but the hints are for {declared} ranks (dist_collectives.nb_rank in {args.hint}); "
            f"give --ranks {declared} or hints for {ranks} ranks")
    return ranks


def _print_traffic(config: attention.AttentionConfig, strategy: str, ranks: int, sequence: int, batch: int) -> None:
    sizes = dict(sequence=sequence, batch=batch, heads=config.heads, head_dim=config.head_dim,
                 itemsize=config.numpy_dtype.itemsize, ranks=ranks)
    traffic = traffic_per_rank(strategy, **sizes)
    _say(f"{strategy}: per rank and attention layer, receives {traffic['received_bytes'] / _MiB:.2f} MiB, holds "
         f"{traffic['kv_bytes'] / _MiB:.2f} MiB of K and V (single device: "
         f"{traffic_per_rank('allgather_kv', **dict(sizes, ranks=1))['kv_bytes'] / _MiB:.2f} MiB)")
    if traffic["scores_bytes"]:
        _say(f"{strategy}: each step also holds {traffic['scores_bytes'] / _MiB:.2f} MiB of float32 scores (TensorRT does "
             "not fuse the online softmax into flash attention); ulysses or allgather_kv avoid them")


def _run(args) -> int:
    from .sharding import load_hints

    hints = load_hints(args.hint) if args.hint else None
    ranks = _ranks(args, hints)
    if hints is None:
        hints = attention.default_hints(ranks)
    strategy = args.strategy or hints.get("strategy") or "allgather_kv"
    config = attention.AttentionConfig(args.hidden, args.heads, args.head_dim, args.dtype, args.seed)

    blocker = None if args.mode == "cpu" else _gpu_run_blocker(ranks)
    if args.mode == "gpu" and blocker:
        _say(f"cannot run on GPUs: {blocker}")
        return 2
    if args.mode != "cpu" and blocker is None:
        _print_traffic(config, strategy, ranks, args.sequence_length or GPU_DEFAULT_SEQUENCE_LENGTH, args.batch_size)
        return _gpu_run(args, config, hints, ranks, args.strategy)
    if blocker:
        _say(f"GPU run skipped: {blocker}. Running the CPU verification instead.")

    sequence = args.sequence_length or CPU_DEFAULT_SEQUENCE_LENGTH
    if sequence % ranks:
        raise InvalidArgumentError(f"--sequence-length {sequence} must be divisible by --ranks {ranks}")
    tolerance = None
    if args.atol is not None or args.rtol is not None:
        default_atol, default_rtol = attention.TOLERANCES[config.dtype]
        tolerance = (args.atol if args.atol is not None else default_atol,
                     args.rtol if args.rtol is not None else default_rtol)
    _say(f"CPU verification: hidden {config.hidden}, {config.heads} heads x {config.head_dim}, {config.dtype}, "
         f"sequence {sequence}, batch {args.batch_size}, {ranks} simulated ranks, strategy {strategy}")
    _print_traffic(config, strategy, ranks, sequence, args.batch_size)
    report, worst_rank = attention.verify_on_cpu(
        config, ranks=ranks, sequence_length=sequence, batch_size=args.batch_size, hints=hints, tolerance=tolerance,
        progress=not args.no_progress, save_dir=args.save_dir, strategy=args.strategy, say=_say,
    )
    _say(report.format(f"CPU: {ranks} simulated ranks vs single device (worst: rank {worst_rank})"))
    _say("PASSED" if report.passed else "FAILED: the sharded model does not compute what the single-device model does")
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mdtrt attention``; returns the exit status: 0 when the check passes, 1 when it
    fails, 2 for bad arguments or hints (one line on stdout, no traceback)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (MdtrtError, ValueError, RuntimeError, ImportError) as error:
        # Bad hints, sizes or ranks, a simulated segment or collective that cannot run, what
        # mdtrt's native layers refuse: one line, exit 2.
        _say(f"error: {error}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
