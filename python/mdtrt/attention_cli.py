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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# argparse types: a bad number is an argparse error (usage, one line naming the option, exit 2).
# samples/attention_mdtrt/create_model.py uses them too.
def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts)."""
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds: numpy's generators take no negative seed)."""
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (tolerances)."""
    value = _number(text, float, "a number")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def prepare_output_dir(path: str, option: str) -> str:
    """Creates ``path`` (a directory to write models to) if needed and checks that it can be
    written, before anything is built.

    Raises
    ------
    InvalidArgumentError
        ``path`` is an existing file, cannot be created, or is not writable (``option`` named).
    """
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgumentError(f"{option} {path} is a file, not a directory: give a directory to write the models to")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise InvalidArgumentError(
            f"{option} {path} cannot be created ({error.strerror}): give a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{option} {path} is not writable: give a writable directory")
    return path


def _gpu_run_blocker(ranks: int) -> str | None:
    """Why the GPU run cannot happen here, or None when it can: every reason at once (a machine
    with neither a GPU nor the TensorRT backend hears of both, not of the backend alone, and a
    rebuild then ends at "no GPU")."""
    from . import _core, build_info
    from . import tensorrt as mdtrt_tensorrt
    from .cuda_state import why_no_gpu

    reasons = []
    try:
        gpus = int(_core.visible_gpu_count())
    except Exception as error:  # noqa: BLE001 - no driver reads as no GPU
        reasons.append(f"no CUDA GPU is usable ({error})")
    else:
        if gpus < 1:
            reasons.append(f"no CUDA GPU is visible ({why_no_gpu()})")
        elif gpus < ranks and detect_launch() is None:
            reasons.append(f"{ranks} ranks need {ranks} GPUs; only {_plural(gpus, 'GPU')} visible")
    info = build_info()
    if not info["tensorrt_backend"]:
        reason = info.get("tensorrt_reason") or ""
        # The GPU run builds engines: the advice of the builders (the full TensorRT, not the lean runtime).
        reasons.append("TensorRT is needed for the GPU run, and this mdtrt has no TensorRT backend" + (
            f" ({reason})" if reason else "") + f": {mdtrt_tensorrt.REBUILD_TO_BUILD_ENGINES}")
    else:
        report = mdtrt_tensorrt.library_report()
        if not report["library_found"]:
            reasons.append(f"TensorRT is needed for the GPU run and was not found: {report['error']}")
        elif report["lean"]:
            reasons.append(f"the GPU run builds engines, which needs the full TensorRT; only the lean runtime was "
                           f"found ({report['path']}): {_core.TENSORRT_INSTALL_FULL} "
                           f"({_core.TENSORRT_FULL_FROM_NVIDIA_INDEX})")
    return "; ".join(reasons) or None


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
    counts). Calls on torch tensors in and out are stream-ordered (each orders itself after the
    current streams and they wait for it), so the host queues them ahead and the events bracket
    the engines and their stream waits on the GPU, not the host's per-call hand-off. Returns the
    times and rank 0's outputs (numpy)."""
    per_rank = [{name: torch.as_tensor(value, device=f"cuda:{gpu}") for name, value in inputs.items()}
                for gpu in gpus]
    # Device arrays out: their shapes and dtypes. Poisoned (NaN) first: an engine that wrote nothing
    # fails the comparison instead of matching another one's untouched memory.
    first = runner.infer(per_rank, all_ranks=True, poison_outputs=True)
    outputs = {name: [rank_outputs[name] for rank_outputs in first] for name in first[0]}
    call = runner.prepare(per_rank, all_ranks=True, outputs=outputs)
    times = event_times_ms(torch, gpus, call, iterations, warmup=3)
    result = {name: arrays[0].cpu().numpy() if hasattr(arrays[0], "cpu") else arrays[0].numpy()
              for name, arrays in outputs.items()}
    return times, result


def _gpu_run(args, config: attention.AttentionConfig, hints, ranks: int, strategy: str | None, sequence: int) -> int:
    from .device_group import DeviceGroup
    from .runner import EngineRunner
    from . import compare_outputs  # the public function

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
            multi_outputs = multi_runner.infer(inputs, poison_outputs=True)
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
            single_outputs = single_runner.infer(inputs, poison_outputs=True)
            single_times = single_runner.time_infer(inputs, args.iterations)
    # Each tolerance not given: twice the CPU check's (TensorRT's tactics differ per engine).
    default_atol, default_rtol = (2 * t for t in attention.TOLERANCES[config.dtype])
    atol = args.atol if args.atol is not None else default_atol
    rtol = args.rtol if args.rtol is not None else default_rtol
    report = compare_outputs(single_outputs, multi_outputs, atol=atol, rtol=rtol)
    _say(report.format(f"GPU: {ranks}-rank engine vs single-device engine"))
    single_ms, multi_ms = statistics.median(single_times), statistics.median(multi_times)
    how = ("CUDA events around each call on device-resident inputs and outputs" if torch is not None else
           "host clock around each complete call, inputs copied from the host (install torch for CUDA-event timing "
           "on device-resident buffers)")
    _say(f"median of {_plural(args.iterations, 'iteration')} ({how}): single-device {single_ms:.3f} ms, "
         f"{_plural(ranks, 'GPU')} {multi_ms:.3f} ms, speedup {single_ms / multi_ms:.2f}x")
    return 0 if report.passed else 1


def _parser(prog: str = "python -m mdtrt attention") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Multi-device self-attention with context parallelism: shard (allgather_kv with polygraphy, "
        "ulysses or ring), verify the sharded model against the single-device one on simulated CPU ranks, and with "
        "GPUs and TensorRT run and time it on several GPUs.",
    )
    parser.add_argument("--ranks", type=positive_int, default=None,
                        help="number of devices (default: the launcher's world size, else the hints' nb_rank, else 2)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="context-parallel strategy (default: the hints' \"strategy\" field, else allgather_kv)")
    parser.add_argument(
        "--sequence-length", type=positive_int, default=None,
        help=f"sequence length (default {GPU_DEFAULT_SEQUENCE_LENGTH} on GPUs, "
        f"{CPU_DEFAULT_SEQUENCE_LENGTH} for the CPU verification)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size (default 1)")
    parser.add_argument("--hidden", type=positive_int, default=4096, help="hidden size (default 4096)")
    parser.add_argument("--heads", type=positive_int, default=32, help="attention heads (default 32)")
    parser.add_argument("--head-dim", type=positive_int, default=128, help="elements per head (default 128)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="(default float16)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights (inputs use seed + 1; default 0)")
    parser.add_argument("--hint", default=None, help="sharding hints JSON (default: the sample's hint.json for --ranks)")
    parser.add_argument("--iterations", type=positive_int, default=50, help="timed GPU iterations (median reported; default 50)")
    parser.add_argument(
        "--mode", choices=("auto", "cpu", "gpu"), default="auto",
        help="auto: GPU run when GPUs and TensorRT are there, CPU verification otherwise",
    )
    tolerances = ", ".join(f"{dtype} {a:g}" for dtype, (a, _) in attention.TOLERANCES.items())
    parser.add_argument("--atol", type=non_negative_float, default=None,
                        help=f"absolute tolerance of the check (default: CPU {tolerances}; twice that on GPUs)")
    rtolerances = ", ".join(f"{dtype} {r:g}" for dtype, (_, r) in attention.TOLERANCES.items())
    parser.add_argument("--rtol", type=non_negative_float, default=None,
                        help=f"tolerance relative to max |reference| (default: CPU {rtolerances}; twice that on GPUs)")
    parser.add_argument("--save-dir", default=None, help="write attention_sd.onnx and attention_md.onnx here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def ranks_for(args, hints: dict | None) -> int:
    """--ranks (``args.ranks``, None when not given), which must agree with the launcher's world
    size and the hints' rank count (a hints file must give ``dist_collectives.nb_rank``: hints are
    written for a number of ranks); not given: the launcher's world size, else the hints', else 2.
    Used by ``python -m mdtrt attention`` and the sample's ``create_model.py``.

    Raises
    ------
    InvalidArgumentError
        --ranks disagrees with the launcher or the hints (the message names the --ranks to give).
    """
    from .sharding import declared_ranks

    launch = detect_launch()
    declared = None if hints is None else declared_ranks(hints, f"the hints in {args.hint}")
    ranks = args.ranks
    if ranks is None:
        ranks = launch.world_size if launch else declared if declared is not None else 2
    if launch is not None and launch.world_size != ranks:
        raise InvalidArgumentError(f"--ranks is {ranks} but {launch.launcher} started a world of {launch.world_size}")
    if declared is not None and declared != ranks:
        raise InvalidArgumentError(
            f"--ranks is {ranks} but the hints are for {declared} ranks (dist_collectives.nb_rank in {args.hint}); "
            f"give --ranks {declared} or hints for {ranks} ranks")
    return ranks


def _sequence_length(args, ranks: int, default: int, run: str) -> int:
    """--sequence-length, or ``default`` for ``run``; it must split evenly across the ranks."""
    sequence = args.sequence_length or default
    if sequence % ranks:
        given = f"--sequence-length {sequence}" if args.sequence_length else \
            f"the {run}'s default sequence length {default}"
        suggestion = -(-sequence // ranks) * ranks
        raise InvalidArgumentError(f"{given} is not divisible by --ranks {ranks}: give --sequence-length {suggestion} "
                                   "(or another multiple of the ranks)")
    return sequence


def _check_strategy_fits(strategy: str, config: attention.AttentionConfig, ranks: int) -> None:
    """What :func:`mdtrt.shard` would refuse for these sizes, said before any model is built."""
    if strategy == "ulysses" and config.heads % ranks:
        raise InvalidArgumentError(
            f"ulysses shards the heads over the ranks: the model has {config.heads} heads (--heads), which "
            f"{ranks} ranks do not divide; use --ranks that divides {config.heads}, or --strategy ring or allgather_kv")


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
    from .sharding import check_hints, load_hints

    hints = load_hints(args.hint) if args.hint else None
    ranks = ranks_for(args, hints)
    if hints is None:
        hints = attention.default_hints(ranks)
    check_hints(hints, args.strategy)  # bad hints are refused before any model is built
    strategy = args.strategy or hints.get("strategy") or "allgather_kv"
    config = attention.AttentionConfig(args.hidden, args.heads, args.head_dim, args.dtype, args.seed)
    _check_strategy_fits(strategy, config, ranks)
    if args.save_dir:
        prepare_output_dir(args.save_dir, "--save-dir")

    blocker = None if args.mode == "cpu" else _gpu_run_blocker(ranks)
    blocker = blocker and blocker.rstrip(".")  # a library's message ends its sentence; ours goes on
    if args.mode == "gpu" and blocker:
        _say(f"cannot run on GPUs: {blocker}. --mode cpu (or auto) verifies the sharded model on simulated ranks "
             "on the CPU instead")
        return 2
    if args.mode != "cpu" and blocker is None:
        sequence = _sequence_length(args, ranks, GPU_DEFAULT_SEQUENCE_LENGTH, "GPU run")
        _print_traffic(config, strategy, ranks, sequence, args.batch_size)
        return _gpu_run(args, config, hints, ranks, args.strategy, sequence)
    sequence = _sequence_length(args, ranks, CPU_DEFAULT_SEQUENCE_LENGTH, "CPU verification")  # refused first
    if blocker:
        _say(f"GPU run skipped: {blocker}. Running the CPU verification instead.")
    tolerance = None
    if args.atol is not None or args.rtol is not None:
        default_atol, default_rtol = attention.TOLERANCES[config.dtype]
        tolerance = (args.atol if args.atol is not None else default_atol,
                     args.rtol if args.rtol is not None else default_rtol)
    simulated = _plural(ranks, "simulated rank")
    _say(f"CPU verification: hidden {config.hidden}, {config.heads} heads x {config.head_dim}, {config.dtype}, "
         f"sequence {sequence}, batch {args.batch_size}, {simulated}, strategy {strategy}")
    _print_traffic(config, strategy, ranks, sequence, args.batch_size)
    report, worst_rank = attention.verify_on_cpu(
        config, ranks=ranks, sequence_length=sequence, batch_size=args.batch_size, hints=hints, tolerance=tolerance,
        progress=not args.no_progress, save_dir=args.save_dir, strategy=args.strategy, say=_say,
    )
    _say(report.format(f"CPU: {simulated} vs single device (worst: rank {worst_rank})"))
    _say("PASSED" if report.passed else "FAILED: the sharded model does not compute what the single-device model does")
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None, prog: str = "python -m mdtrt attention") -> int:
    """``python -m mdtrt attention``; returns the exit status: 0 when the check passes, 1 when it
    fails, 2 for bad arguments or hints (one line on stdout, no traceback). ``prog``: the command
    name usage and errors show (the sample script passes its own)."""
    args = _parser(prog).parse_args(argv)
    try:
        return _run(args)
    except (MdtrtError, ValueError, RuntimeError, ImportError) as error:
        # Bad hints, sizes or ranks, a simulated segment or collective that cannot run, what
        # mdtrt's native layers refuse: one line, exit 2.
        _say(f"error: {error}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
