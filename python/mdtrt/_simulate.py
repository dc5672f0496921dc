"""Run a sharded ONNX model on simulated ranks on the CPU, with no GPU and no TensorRT.

The graph is cut at its ``DistCollective`` nodes into segments. Each segment is an ordinary
ONNX graph, run once per rank by onnxruntime (or onnx's reference evaluator); between segments
the collectives are computed across the ranks by :func:`mdtrt.reference.collective`, the same
semantics the native NCCL ops are checked against.

A node's *stage* is the number of collectives on the longest path from the graph inputs to it;
segment ``s`` holds the ordinary nodes of stage ``s``, and the collectives whose input is of
stage ``s`` run right after it. Ordinary nodes that do not depend on a collective therefore all
land in one segment, however the node list interleaves them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
from onnx import helper

from ._progress import stderr_is_terminal
from . import arguments
from .errors import InvalidArgumentError, MdtrtError
from .onnx_graph import load_model, node_inputs, save_model, too_large_to_serialize, toposort_nodes
from .reference import collective

__all__ = ["simulate", "run_on_cpu"]

DIST_COLLECTIVE = "DistCollective"
_BACKENDS = ("auto", "onnxruntime", "reference")
# Element types ONNX Runtime's CPU kernels mostly lack (and whose numpy arrays, from ml_dtypes, it
# cannot take as feeds): "auto" runs segments that touch them with onnx's reference evaluator.
_REFERENCE_ONLY_TYPES = {
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
}


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


@dataclass
class _Collective:
    node: onnx.NodeProto
    operation: str
    reduce: str
    root: int
    groups: list[int]
    nb_rank: int

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "_Collective":
        name = node.name or node.output[0]
        operation = _attribute(node, "collective_operation")
        if operation is None:
            raise InvalidArgumentError(f"DistCollective node {name!r} has no collective_operation attribute")
        if len(node.input) != 1 or len(node.output) != 1:
            raise InvalidArgumentError(f"DistCollective node {name!r} must have one input and one output")
        return cls(
            node=node,
            operation=str(operation).lower(),
            reduce=str(_attribute(node, "reduce_op", "none")).lower(),
            root=int(_attribute(node, "root", -1)),
            groups=[int(g) for g in _attribute(node, "groups", []) or []],
            nb_rank=int(_attribute(node, "nb_rank", 0)),
        )

    def run(self, rank_inputs: list[np.ndarray]) -> list[np.ndarray]:
        name = self.node.name or self.node.output[0]
        try:
            outputs = collective(
                self.operation, rank_inputs, reduce=self.reduce, root=self.root, groups=self.groups or None
            )
        except ValueError as error:
            raise InvalidArgumentError(f"DistCollective node {name!r} ({self.operation}): {error}") from None
        # Ranks that get no defined output (non-root ranks of reduce/gather, ranks outside the
        # group) see NaN in floats and zeros in integers, so that using it shows up downstream.
        defined = next(o for o in outputs if o is not None)
        filler = np.nan if defined.dtype.kind == "f" or str(defined.dtype) == "bfloat16" else 0
        return [o if o is not None else np.full_like(defined, filler) for o in outputs]


@dataclass
class _Segment:
    stage: int
    nodes: list[onnx.NodeProto]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    runner: object = None


class _Plan:
    """The segments and collectives of a model, in execution order."""

    def __init__(self, model: onnx.ModelProto):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        graph = self.model.graph
        toposort_nodes(graph)
        self.initializers = {init.name: init for init in graph.initializer}
        self.input_names = [v.name for v in graph.input if v.name not in self.initializers]
        self.input_types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
        self.input_shapes = {
            v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]
            for v in graph.input if v.type.tensor_type.HasField("shape")
        }
        self.output_names = [v.name for v in graph.output]

        stage_of: dict[str, int] = {name: 0 for name in self.input_names}
        stage_of.update({name: 0 for name in self.initializers})
        segments: dict[int, list[onnx.NodeProto]] = {}
        self.collectives: dict[int, list[_Collective]] = {}
        for node in graph.node:
            # A subgraph's reads of this graph (If branches, Loop bodies) are inputs of its node.
            stage = max((stage_of.get(name, 0) for name in node_inputs(node)), default=0)
            if node.op_type == DIST_COLLECTIVE:
                self.collectives.setdefault(stage, []).append(_Collective.from_node(node))
                stage_of[node.output[0]] = stage + 1
            else:
                segments.setdefault(stage, []).append(node)
                for name in node.output:
                    stage_of[name] = stage
        self.stages = max([*segments, *(s + 1 for s in self.collectives)], default=0) + 1

        # When each tensor is last read, in steps: segment s runs at step 2s, the collectives
        # after it at step 2s + 1. A segment hands on what is read after its own step.
        last_read: dict[str, int] = {name: 2 * self.stages for name in self.output_names}
        for stage, nodes in segments.items():
            for node in nodes:
                for name in node_inputs(node):
                    last_read[name] = max(last_read.get(name, -1), 2 * stage)
        for stage, collectives in self.collectives.items():
            for item in collectives:
                last_read[item.node.input[0]] = max(last_read.get(item.node.input[0], -1), 2 * stage + 1)
        self.last_read = last_read

        self.segments: list[_Segment | None] = []
        for stage in range(self.stages):
            nodes = segments.get(stage)
            if not nodes:
                self.segments.append(None)
                continue
            produced = {name for node in nodes for name in node.output if name}
            inputs, initializers, seen = [], [], set()
            for node in nodes:
                for name in node_inputs(node):
                    if name in produced or name in seen:
                        continue
                    seen.add(name)
                    if name in self.initializers:
                        initializers.append(self.initializers[name])
                    else:
                        inputs.append(name)
            outputs = []
            for node in nodes:
                for name in node.output:
                    if name and last_read.get(name, -1) > 2 * stage:
                        outputs.append(name)
            self.segments.append(_Segment(stage, nodes, inputs, outputs, initializers))

    def check_ranks(self, ranks: int) -> None:
        for collectives in self.collectives.values():
            for item in collectives:
                if item.nb_rank and item.nb_rank != ranks:
                    raise InvalidArgumentError(
                        f"the model was sharded for {item.nb_rank} ranks (DistCollective "
                        f"{item.node.name!r} has nb_rank={item.nb_rank}) but {ranks} {'was' if ranks == 1 else 'were'} asked for; "
                        + (f"run it with mdtrt.simulate(model, inputs, {item.nb_rank}) (run_on_cpu is for "
                           "single-device models)" if ranks == 1 else
                           f"simulate {item.nb_rank} ranks, or shard the model again for {ranks}")
                    )

    def segment_model(self, segment: _Segment, feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        """An ONNX model of one segment, its inputs typed from the values it will be fed."""
        inputs = [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype), list(feeds[name].shape)
            )
            for name in segment.inputs
        ]
        graph = helper.make_graph(
            segment.nodes,
            f"segment_{segment.stage}",
            inputs,
            [helper.make_empty_tensor_value_info(name) for name in segment.outputs],
            initializer=segment.initializers,
        )
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        # onnxruntime reads IR versions up to its own; 8 covers opset <= 17, 10 up to opset 22.
        opset = max((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default=17)
        model.ir_version = min(self.model.ir_version or 8, 8 if opset <= 17 else 10)
        inferred = onnx.shape_inference.infer_shapes(_without_large_weights(model))
        types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for output in model.graph.output:
            inferred_type = types.get(output.name)
            if inferred_type is None or not inferred_type.tensor_type.elem_type:
                raise InvalidArgumentError(
                    f"cannot infer the type of tensor {output.name!r} in segment {segment.stage}; "
                    "run onnx shape inference on the model or give it value_info"
                )
            output.type.tensor_type.elem_type = inferred_type.tensor_type.elem_type
        return model


def _without_large_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for shape inference, which serializes it: past protobuf's limit, large
    initializers are replaced by external-data stubs of the same type and shape (shape inference
    only reads the values of small ones, such as Reshape's target shape)."""
    if not too_large_to_serialize(model):
        return model
    light = onnx.ModelProto()
    light.CopyFrom(model)  # the caller's copy keeps its weights (segments are small next to weights)
    for init in light.graph.initializer:
        if init.ByteSize() > 1024:
            stub = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="not-read-by-shape-inference")
            init.CopyFrom(stub)
    return light


def _element_types(model: onnx.ModelProto) -> set[int]:
    types = {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    return types | {init.data_type for init in model.graph.initializer}


def _reference_runner(model: onnx.ModelProto):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    return lambda feeds: evaluator.run(None, feeds)


def _make_runner(model: onnx.ModelProto, backend: str, threads: int | None, what: str):
    if backend == "reference" or backend == "auto" and _element_types(model) & _REFERENCE_ONLY_TYPES:
        return _reference_runner(model)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the segments are legitimate, warnings are noise
    # onnxruntime 1.32's layout optimizations (ORT_ENABLE_ALL, its default) crash session creation
    # (segmentation fault) on float16 segments that start with a Transpose feeding MatMuls, as the
    # sequence-sharded batch-first attention has; they bring nothing to a CPU check.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads:
        options.intra_op_num_threads = threads
    workdir = None
    if too_large_to_serialize(model):
        # Past protobuf's 2 GiB limit ONNX Runtime reads the segment from a file whose weights sit
        # in a data file beside it.
        workdir = tempfile.TemporaryDirectory(prefix="mdtrt-segment-")
        source = os.path.join(workdir.name, "segment.onnx")
        save_model(model, source)
    else:
        source = model.SerializeToString()
    try:
        session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:
        if "NOT_IMPLEMENTED" not in str(error):
            raise
        if backend == "auto":  # a type or operator ONNX Runtime has no CPU kernel for
            return _reference_runner(model)
        raise InvalidArgumentError(
            f"ONNX Runtime cannot run {what}: {error}. Use backend='reference' (onnx's reference evaluator, "
            "slower, covers every type), or backend='auto', which picks it where ONNX Runtime has no kernel"
        ) from None
    if workdir is not None:
        session._mdtrt_workdir = workdir  # the data file lives as long as the session
    return lambda feeds: session.run(None, feeds)


def _as_array(name: str, value) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, RuntimeError) as error:  # e.g. torch refuses to hand bfloat16 to numpy
        raise InvalidArgumentError(
            f"inputs[{name!r}]: cannot be turned into a numpy array ({error}); pass numpy arrays, for "
            "bfloat16 ones of ml_dtypes.bfloat16 (from torch: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16))"
        ) from None


def _dtype_spelling(dtype: np.dtype) -> str:
    """How user code names ``dtype``: ``np.float32``, or ``ml_dtypes.bfloat16`` for the types
    numpy does not have (bfloat16, the float8 types), which ONNX maps to ml_dtypes' types."""
    own = getattr(np, dtype.name, None)
    if isinstance(own, type) and issubclass(own, np.generic) and np.dtype(own) == dtype:
        return f"np.{dtype.name}"
    return f"ml_dtypes.{dtype.name}"


def _check_inputs(plan: _Plan, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        raise InvalidArgumentError(
            f"inputs must be a dict of input name to numpy array, got {type(inputs).__name__}")
    missing = [name for name in plan.input_names if name not in inputs]
    unknown = [name for name in inputs if name not in plan.input_names]
    if missing or unknown:
        raise InvalidArgumentError(
            f"inputs must name exactly the model inputs {plan.input_names}; "
            f"missing {missing}, unknown {unknown}"
        )
    checked = {}
    symbols: dict[str, tuple[int, str]] = {}
    for name in plan.input_names:
        value = _as_array(name, inputs[name])
        expected = plan.input_types.get(name)
        if expected:
            want = helper.tensor_dtype_to_np_dtype(expected)
            if value.dtype != want:
                given = inputs[name]
                # A list or scalar became float64/int64 in _as_array: name what was given, and the fix.
                spelt = _dtype_spelling(want)
                what = (f"{value.dtype}; pass x.astype({spelt})"
                        if isinstance(given, np.ndarray) or hasattr(given, "__array_interface__")
                        else f"a {type(given).__name__} (read as {value.dtype}); pass np.asarray(..., dtype={spelt})")
                raise InvalidArgumentError(f"inputs[{name!r}] must be {want}, got {what}")
        declared = plan.input_shapes.get(name)
        if declared is not None:
            if len(declared) != value.ndim:
                raise InvalidArgumentError(
                    f"inputs[{name!r}] has shape {value.shape} but the model declares {_shape_text(declared)} "
                    f"({len(declared)} dimensions)")
            for axis, (want_dim, got) in enumerate(zip(declared, value.shape)):
                if isinstance(want_dim, int) and want_dim > 0 and want_dim != got:
                    raise InvalidArgumentError(
                        f"inputs[{name!r}] has shape {value.shape} but the model declares "
                        f"{_shape_text(declared)}: dimension {axis} must be {want_dim}")
                if isinstance(want_dim, str):
                    first = symbols.setdefault(want_dim, (got, f"{name}[{axis}]"))
                    if first[0] != got:
                        raise InvalidArgumentError(
                            f"inputs[{name!r}] dimension {axis} ({want_dim!r}) is {got} but {first[1]}, the same "
                            f"symbolic dimension, is {first[0]}")
        checked[name] = value
    return checked


def _model_text(model: onnx.ModelProto | str | os.PathLike) -> str:
    """The model as a message names it: its path, else its graph's name."""
    if isinstance(model, onnx.ModelProto):
        return f"the model (graph {model.graph.name!r})" if model.graph.name else "the model"
    return f"model {os.fspath(model)}"


def _shape_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def simulate(
    model: onnx.ModelProto | str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    ranks: int,
    *,
    backend: str = "auto",
    progress: bool = True,
    threads: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run a sharded model on ``ranks`` simulated ranks on the CPU.

    Parameters
    ----------
    model : onnx.ModelProto or path
        The sharded model, as ``mdtrt.shard`` or ``polygraphy multi-device shard`` write it. A
        model without DistCollective nodes runs too (every rank computes the same thing), with a
        warning for more than one rank. A path may carry external data (weights in files beside
        it), also past protobuf's 2 GiB.
    inputs : dict of str to numpy.ndarray
        Input name to the *full* array, of the model's declared dtype (bfloat16 as
        ``ml_dtypes.bfloat16``) and shape (symbolic dimensions consistent across inputs); every
        rank receives the same full inputs, as the sharded graph expects.
    ranks : int
        Number of simulated ranks; must match the ``nb_rank`` the model was sharded for.
    backend : {"auto", "onnxruntime", "reference"}
        ``"onnxruntime"`` (fast), ``"reference"`` (onnx's reference evaluator, every type) or
        ``"auto"``: ONNX Runtime, and the reference evaluator for segments with types ONNX Runtime
        has no CPU kernels for (bfloat16, float8, int4).
    progress : bool
        Show a tqdm progress bar on stderr when stderr is a terminal (never into a file or pipe).
    threads : int, optional
        ONNX Runtime intra-op threads (default: ONNX Runtime's choice).

    Returns
    -------
    list of dict
        One dict per rank, output name to numpy array.

    Raises
    ------
    InvalidArgumentError
        A bad argument (named in the message), inputs that do not match the model's inputs, dtypes
        or shapes, a model sharded for another number of ranks, or a segment ONNX Runtime cannot
        run with ``backend="onnxruntime"``.
    MdtrtError
        A segment failed while running on a simulated rank (the message names segment and rank).

    Other errors ONNX Runtime raises while creating a segment's session (anything but a missing
    kernel, NOT_IMPLEMENTED) propagate unchanged.

    Warns
    -----
    UserWarning
        ``ranks`` is more than 1 and the model has no DistCollective nodes: the ranks exchange
        nothing, so a comparison with the single-device model passes whatever the sharding does
        (the single-device model passed instead of the sharded one?).
    """
    arguments.rank_count(ranks)
    arguments.choice(backend, "backend", _BACKENDS)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise InvalidArgumentError(f"threads must be None or a non-negative integer, got {threads!r}")
    plan = _Plan(load_model(model))
    plan.check_ranks(ranks)
    if ranks > 1 and not plan.collectives:
        warnings.warn(f"{_model_text(model)} has no DistCollective nodes, so the {ranks} simulated ranks exchange "
                      "nothing and each computes the whole model (a comparison with the single-device model then "
                      "checks no sharding): did you pass the single-device model instead of the sharded one?",
                      UserWarning, stacklevel=2)
    feeds = _check_inputs(plan, inputs)
    values = [dict(feeds) for _ in range(ranks)]

    steps = sum(ranks for s in plan.segments if s) + sum(len(c) for c in plan.collectives.values())
    from tqdm.auto import tqdm

    # A bar only on a terminal (see _progress.py); elsewhere the run is silent.
    with tqdm(total=steps, desc="simulate", unit="step", file=sys.stderr, disable=not (progress and stderr_is_terminal()),
              leave=False) as bar:
        for stage, segment in enumerate(plan.segments):
            if segment is not None:
                for rank in range(ranks):
                    segment_feeds = {name: values[rank][name] for name in segment.inputs}
                    what = f"segment {stage} ({len(segment.nodes)} nodes from {segment.nodes[0].name!r})"
                    if segment.runner is None:
                        bar.set_postfix_str(f"building segment {stage}")
                        segment.runner = _make_runner(plan.segment_model(segment, segment_feeds), backend, threads,
                                                      what)
                    bar.set_postfix_str(f"segment {stage}, rank {rank}")
                    try:
                        results = segment.runner(segment_feeds)
                    except Exception as error:
                        raise MdtrtError(f"{what} failed on simulated rank {rank}: {error}", rank=rank,
                                         call="simulate", detail=str(error)) from error
                    values[rank].update(zip(segment.outputs, results))
                    bar.update(1)
            for item in plan.collectives.get(stage, []):
                bar.set_postfix_str(f"{item.operation} {item.node.input[0]}")
                outputs = item.run([values[rank][item.node.input[0]] for rank in range(ranks)])
                for rank in range(ranks):
                    values[rank][item.node.output[0]] = outputs[rank]
                bar.update(1)
            # Drop what no later stage reads, to keep memory at one stage's worth.
            for rank_values in values:
                for name in [n for n in rank_values if plan.last_read.get(n, -1) <= 2 * stage + 1]:
                    del rank_values[name]
    return [{name: rank_values[name] for name in plan.output_names} for rank_values in values]

def run_on_cpu(
    model: onnx.ModelProto | str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    *,
    backend: str = "auto",
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Run a single-device model on the CPU (the reference for :func:`simulate`).

    Parameters
    ----------
    model, inputs, backend, progress, threads
        As for :func:`simulate` (which this is, with one rank).

    Returns
    -------
    dict of str to numpy.ndarray
        Output name to array, shapes and dtypes as the model defines them.

    Raises
    ------
    InvalidArgumentError, MdtrtError
        As :func:`simulate` does.
    """
    return simulate(model, inputs, 1, backend=backend, progress=progress, threads=threads)[0]
