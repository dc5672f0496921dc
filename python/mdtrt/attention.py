"""The multi-device attention model: creation, sharding hints and CPU verification.

The model is one self-attention block, ``(sequence, batch, hidden) -> (sequence, batch, hidden)``:
Q/K/V projections, RMSNorm on Q and K over each head, scaled dot-product attention over
``heads x head_dim`` and an output projection. Sharded with :data:`DEFAULT_HINTS` (context
parallelism), each rank keeps ``sequence / ranks`` query rows and sees the whole sequence's keys
and values through the strategy's collectives (:mod:`mdtrt.context_parallel`).

The command line and the GPU run (``python -m mdtrt attention``, the sample's
``attention_mdtrt.py``) are in :mod:`mdtrt.attention_cli`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import arguments
from .errors import InvalidArgumentError

__all__ = [
    "AttentionConfig",
    "DEFAULT_HINTS",
    "create_attention_model",
    "default_hints",
    "random_inputs",
    "verify_on_cpu",
    "build_models",
    "TOLERANCES",
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
    """A copy of :data:`DEFAULT_HINTS` for ``ranks`` devices.

    Parameters
    ----------
    ranks : int, optional
        Number of devices (``dist_collectives.nb_rank``); default 2.

    Returns
    -------
    dict
        The hints, in polygraphy's ShardHints JSON schema.

    Raises
    ------
    InvalidArgumentError
        ``ranks`` is not a positive integer.
    """
    hints = json.loads(json.dumps(DEFAULT_HINTS))
    hints["dist_collectives"]["nb_rank"] = arguments.rank_count(ranks)
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
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        arguments.choice(self.dtype, "dtype", tuple(_DTYPES))

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of ``dtype`` (float16 or float32)."""
        return np.dtype(_DTYPES[self.dtype])


def create_attention_model(config: AttentionConfig | None = None, **sizes) -> onnx.ModelProto:
    """Build the single-device attention model with onnx-graphsurgeon.

    Weights are random from ``config.seed``, scaled by ``1/sqrt(fan_in)`` so that activations stay
    of order one (float16 does not overflow).

    Parameters
    ----------
    config : AttentionConfig, optional
        The sizes, dtype and seed.
    **sizes
        Or the same as keywords: ``create_attention_model(hidden=64, heads=4, head_dim=16,
        dtype="float32")``.

    Returns
    -------
    onnx.ModelProto
        Input ``input`` and output ``output``, shape ``(sequence_length, batch_size, hidden)``
        (symbolic first two dimensions), dtype ``config.dtype``.

    Raises
    ------
    TypeError
        Both a config and keyword sizes.
    InvalidArgumentError
        Sizes or dtype out of range (from :class:`AttentionConfig`).
    ImportError
        onnx-graphsurgeon is not installed.
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
    """Standard-normal inputs for every graph input of ``model``.

    Parameters
    ----------
    model : onnx.ModelProto
        The model whose graph inputs (initializers excluded) get arrays.
    dims : dict of str to int, optional
        Sizes of the symbolic dimensions, e.g. ``{"sequence_length": 128, "batch_size": 1}``.
    seed : int
        Seed of numpy's default generator.

    Returns
    -------
    dict of str to numpy.ndarray
        Input name to array, of the input's shape and element type.

    Raises
    ------
    InvalidArgumentError
        A symbolic dimension that ``dims`` does not give.
    """
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
                raise InvalidArgumentError(
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

def build_models(config: AttentionConfig, hints, ranks: int, *, strategy: str | None = None,
                 save_dir: str | None = None, say=print):
    """The single-device model and its version sharded for ``ranks`` with ``strategy``
    (see :func:`mdtrt.shard`); both written to ``save_dir`` as ``attention_sd.onnx`` and
    ``attention_md.onnx`` when given. Raises what :func:`mdtrt.shard` raises."""
    from .sharding import shard

    single = create_attention_model(config)
    multi = shard(single, hints, ranks, strategy=strategy)
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        onnx.save(single, os.path.join(save_dir, "attention_sd.onnx"))
        onnx.save(multi, os.path.join(save_dir, "attention_md.onnx"))
        say(f"saved attention_sd.onnx and attention_md.onnx ({ranks} ranks) to {save_dir}")
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
    strategy: str | None = None,
    say=print,
):
    """Shard the attention model for ``ranks`` with ``strategy``, run it on simulated ranks on
    the CPU and compare every rank's output with the single-device model's.

    Returns
    -------
    tuple
        The :class:`~mdtrt.comparison.ComparisonReport` of the worst rank, and that rank.

    Raises
    ------
    InvalidArgumentError
        Bad hints or sizes (from :func:`mdtrt.shard` and :func:`mdtrt.simulate`).
    """
    from . import compare_outputs, run_on_cpu, simulate  # the public functions

    hints = default_hints(ranks) if hints is None else hints
    atol, rtol = tolerance or TOLERANCES[config.dtype]
    start = time.perf_counter()
    single, multi = build_models(config, hints, ranks, strategy=strategy, save_dir=save_dir, say=say)
    inputs = random_inputs(single, {"sequence_length": sequence_length, "batch_size": batch_size}, seed=config.seed + 1)
    say(f"built and sharded the model in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    expected = run_on_cpu(single, inputs, progress=progress)
    say(f"single-device run on the CPU: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    per_rank = simulate(multi, inputs, ranks, progress=progress)
    say(f"{ranks} simulated ranks on the CPU: {time.perf_counter() - start:.1f} s")
    reports = [compare_outputs(expected, outputs, atol=atol, rtol=rtol) for outputs in per_rank]
    worst = max(range(ranks), key=lambda r: (not reports[r].passed, max(o.max_abs_error for o in reports[r].outputs)))
    return reports[worst], worst
