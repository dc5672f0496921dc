"""Context parallelism: every strategy of mdtrt.shard on simulated ranks against the single-device
model (mdtrt's attention model and one with the structure of NVIDIA's attention_mdtrt), the
DistCollective nodes as polygraphy writes them. Sharding's own checks (hints, the per-layer
collective check) are in test_sharding.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
gs = pytest.importorskip("onnx_graphsurgeon")
pytest.importorskip("polygraphy")

import mdtrt  # noqa: E402
from mdtrt import attention, simulate  # noqa: E402
from mdtrt.errors import InvalidArgumentError  # noqa: E402

STRATEGIES = ("allgather_kv", "ulysses", "ring")
HEADS = 6  # divisible by 2 and 3, not by 4: ulysses runs on 2 and 3 ranks and refuses 4
SEQUENCE = 12  # divisible by 2, 3 and 4


def nvidia_like_model(dtype: str, hidden=24, heads=HEADS, head_dim=4, seed=0, layers=1) -> onnx.ModelProto:
    """The structure of NVIDIA's attention_mdtrt: batch-first input (batch, sequence, hidden),
    RMSNorm on Q and K over each head, K stored transposed (batch, heads, head_dim, sequence)
    straight from (batch, sequence, heads, head_dim), the softmax scale folded into K. With
    ``layers`` > 1, blocks follow one another with a residual (Q tensors query, query1, ...)."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    graph = gs.Graph(opset=17, name="nvidia_like_attention")
    counter = iter(range(1 << 20))

    def op(op_type, inputs, attrs=None, name=None):
        out = gs.Variable(name or f"t{next(counter)}")
        graph.nodes.append(gs.Node(op_type, inputs=list(inputs), outputs=[out], attrs=attrs or {}))
        return out

    def const(values, dt=None):
        return gs.Constant(f"c{next(counter)}", np.asarray(values, dtype=dt or np_dtype))

    x = gs.Variable("hidden_states", dtype=np_dtype, shape=["batch", "sequence", hidden])
    graph.inputs = [x]
    split = const([0, 0, heads, head_dim], np.int64)

    def project(x, scale=1.0):
        w = (rng.standard_normal((hidden, heads * head_dim)) * scale / math.sqrt(hidden)).astype(np_dtype)
        return op("Reshape", [op("MatMul", [x, const(w)]), split])  # (B, S, H, D)

    def rms(t):
        # In float32, as NVIDIA's model does. (A float16 RMSNorm also crashes onnxruntime 1.32's
        # session creation at ORT_ENABLE_ALL in the simulated segments: a layout optimizer bug.)
        if np_dtype != np.float32:
            t = op("Cast", [t], {"to": onnx.TensorProto.FLOAT})
        mean_square = op("ReduceMean", [op("Mul", [t, t])], {"axes": [-1], "keepdims": 1})
        normed = op("Div", [t, op("Sqrt", [op("Add", [mean_square, const(1e-6, np.float32)])])])
        if np_dtype != np.float32:
            normed = op("Cast", [normed], {"to": onnx.helper.np_dtype_to_tensor_dtype(np_dtype)})
        gain = (1 + 0.1 * rng.standard_normal(head_dim)).astype(np_dtype)
        return op("Mul", [normed, const(gain)])

    def block(x, layer):
        suffix = str(layer) if layer else ""
        q = op("Transpose", [rms(project(x))], {"perm": [0, 2, 1, 3]}, name="query" + suffix)  # (B, H, S, D)
        k = op("Transpose", [rms(project(x))], {"perm": [0, 2, 3, 1]})  # (B, H, D, S)
        k = op("Mul", [k, const(1 / math.sqrt(head_dim))], name="key_t" + suffix)
        v = op("Transpose", [project(x)], {"perm": [0, 2, 1, 3]}, name="value" + suffix)
        probs = op("Softmax", [op("MatMul", [q, k])], {"axis": -1})
        context = op("Transpose", [op("MatMul", [probs, v])], {"perm": [0, 2, 1, 3]})
        context = op("Reshape", [context, const([0, 0, heads * head_dim], np.int64)])
        w_out = (rng.standard_normal((heads * head_dim, hidden)) / math.sqrt(heads * head_dim)).astype(np_dtype)
        return op("MatMul", [context, const(w_out)])

    for layer in range(layers):
        x = block(x, layer) if layer == 0 else op("Add", [x, block(x, layer)])
    out = op("Identity", [x], name="attention_output")
    out.dtype, out.shape = np_dtype, ["batch", "sequence", hidden]
    graph.outputs = [out]
    model = gs.export_onnx(graph.cleanup().toposort())
    model.ir_version = 8
    return model


def nvidia_like_hints(ranks: int) -> dict:
    hints = attention.default_hints(ranks)
    hints["attention_layers"][0]["q"] = "query"
    hints["inputs"] = [{"name": "hidden_states", "seq_len_idx": 1, "rank": 3}]
    hints["outputs"] = [{"name": "attention_output", "seq_len_idx": 1, "rank": 3}]
    return hints


MODELS = {
    "mdtrt": (lambda dtype: attention.create_attention_model(hidden=24, heads=HEADS, head_dim=4, dtype=dtype, seed=2),
              attention.default_hints, {"sequence_length": SEQUENCE, "batch_size": 2}),
    "nvidia_like": (nvidia_like_model, nvidia_like_hints, {"sequence": SEQUENCE, "batch": 2}),
}
_CACHE: dict = {}


def model_and_reference(kind: str, dtype: str):
    if (kind, dtype) not in _CACHE:
        build, hints, dims = MODELS[kind]
        model = build(dtype)
        inputs = attention.random_inputs(model, dims, seed=7)
        _CACHE[kind, dtype] = model, hints, inputs, mdtrt.run_on_cpu(model, inputs, progress=False)
    return _CACHE[kind, dtype]


def numpy_attention_reference(model, inputs):
    """The single-device model run by onnx's reference evaluator: numpy kernels, independent of
    onnxruntime's (which run_on_cpu and simulate use), in the model's own dtype (not float64)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, inputs)[0]


CASES = [(kind, dtype, strategy, ranks)
         for kind in MODELS for dtype in ("float32", "float16") for strategy in STRATEGIES for ranks in (2, 3, 4)
         if not (strategy == "ulysses" and HEADS % ranks)]


@pytest.mark.parametrize("kind,dtype,strategy,ranks", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_sharded_matches_single_device(kind, dtype, strategy, ranks):
    model, hints, inputs, expected = model_and_reference(kind, dtype)
    sharded = mdtrt.shard(model, hints(ranks), ranks, strategy=strategy)
    per_rank = simulate(sharded, inputs, ranks, progress=False)
    assert len(per_rank) == ranks  # every rank's outputs, so the loop below checks them all
    atol, rtol = attention.TOLERANCES[dtype]
    for rank, outputs in enumerate(per_rank):
        report = mdtrt.compare_outputs(expected, outputs, atol=atol, rtol=rtol)
        assert report.passed, f"rank {rank}: " + report.format()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_attention_layers(strategy):
    model = nvidia_like_model("float32", layers=2)
    inputs = attention.random_inputs(model, {"sequence": SEQUENCE, "batch": 1}, seed=4)
    expected = mdtrt.run_on_cpu(model, inputs, progress=False)
    hints = nvidia_like_hints(3)
    hints["attention_layers"].append(dict(hints["attention_layers"][0], q="query1"))
    sharded = mdtrt.shard(model, hints, 3, strategy=strategy)
    per_layer = {"allgather_kv": 2, "ulysses": 4, "ring": 6}[strategy]
    assert sum(n.op_type == "DistCollective" for n in sharded.graph.node) == 2 + 2 * per_layer
    per_rank = simulate(sharded, inputs, 3, progress=False)
    assert len(per_rank) == 3
    for outputs in per_rank:
        report = mdtrt.compare_outputs(expected, outputs, atol=1e-4, rtol=1e-4)
        assert report.passed, report.format()
    # Hinting only the first layer leaves the second local: the check catches the difference.
    hints["attention_layers"].pop()
    outputs = simulate(mdtrt.shard(model, hints, 3, strategy=strategy), inputs, 3, progress=False)[0]
    assert not mdtrt.compare_outputs(expected, outputs, atol=1e-4, rtol=1e-4).passed


def test_reference_is_not_trivial():
    # The comparison above can fail: the output depends on every key (a rank attending to its
    # own chunk only differs), and onnxruntime agrees with onnx's reference evaluator.
    model, _, inputs, expected = model_and_reference("nvidia_like", "float32")
    np.testing.assert_allclose(expected["attention_output"], numpy_attention_reference(model, inputs), rtol=1e-4,
                               atol=1e-5)
    x = dict(inputs)
    x["hidden_states"] = x["hidden_states"].copy()
    x["hidden_states"][:, -1] += 3.0  # change the last token only: every query's output moves
    moved = mdtrt.run_on_cpu(model, x, progress=False)["attention_output"]
    assert np.all(np.abs(moved - expected["attention_output"])[:, :-1].max(axis=-1) > 1e-4)


def _collectives(model):
    return [n for n in model.graph.node if n.op_type == "DistCollective"]


def _attrs(node):
    return {a.name: (a.type, onnx.helper.get_attribute_value(a)) for a in node.attribute}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_collectives_are_written_as_polygraphy_writes_them(strategy):
    model, hints, _, _ = model_and_reference("mdtrt", "float32")
    polygraphy_node = _collectives(mdtrt.shard(model, hints(3), 3, strategy="allgather_kv"))[0]
    reference_types = {name: kind for name, (kind, _) in _attrs(polygraphy_node).items()}
    sharded = mdtrt.shard(model, hints(3), 3, strategy=strategy)
    operations = []
    for node in _collectives(sharded):
        attrs = _attrs(node)
        assert node.domain == "" and len(node.input) == 1 and len(node.output) == 1
        assert {name: kind for name, (kind, _) in attrs.items()} == reference_types, node.name
        assert attrs["nb_rank"][1] == 3 and list(attrs["groups"][1]) == []
        operations.append((attrs["collective_operation"][1].decode(), attrs["root"][1]))
    middle = sorted(operations[1:-1])  # between the input's reduce_scatter and the output's all_gather
    assert operations[0][0] == "reduce_scatter" and operations[-1] == ("all_gather", -1)
    assert middle == {"allgather_kv": [("all_gather", -1)] * 2, "ulysses": [("all_to_all", -1)] * 4,
                      "ring": sorted([("broadcast", r) for r in range(3)] * 2)}[strategy]


def test_ring_never_concatenates_kv_and_accumulates_in_float32():
    model, hints, _, _ = model_and_reference("mdtrt", "float16")
    sharded = mdtrt.shard(model, hints(4), 4, strategy="ring")
    ops = [n.op_type for n in sharded.graph.node]
    assert "Softmax" not in ops and "Concat" not in ops  # nothing rebuilds the full K or V
    casts = [n for n in sharded.graph.node if n.op_type == "Cast"]
    to_float = [n for n in casts if _attrs(n)["to"][1] == onnx.TensorProto.FLOAT]
    assert len(to_float) >= 2 * 4  # each of the 4 chunks' scores and P @ V, summed in float32


def test_ring_is_stable_where_float16_exp_would_overflow():
    # Scores up to ~100 (the softmax scale raised 40x): exp overflows float16 beyond ~11, so the
    # chunks must be combined against their running maximum, in float32.
    model = attention.create_attention_model(hidden=24, heads=HEADS, head_dim=4, dtype="float16", seed=2)
    scale = next(init for init in model.graph.initializer if init.name == "attention_scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * np.float16(40), scale.name))
    inputs = attention.random_inputs(model, {"sequence_length": SEQUENCE, "batch_size": 1}, seed=3)
    expected = numpy_attention_reference(model, inputs).astype(np.float64)
    assert np.isfinite(expected).all()
    outputs = simulate(mdtrt.shard(model, attention.default_hints(3), 3, strategy="ring"), inputs, 3, progress=False)
    atol, rtol = attention.TOLERANCES["float16"]
    assert len(outputs) == 3
    for rank in outputs:
        got = rank["output"].astype(np.float64)
        assert np.isfinite(got).all()
        assert np.max(np.abs(got - expected)) <= atol + rtol * np.max(np.abs(expected))


def test_traffic_per_rank_formulas():
    from mdtrt.context_parallel import traffic_per_rank

    sizes = dict(sequence=56320, batch=1, heads=32, head_dim=128, itemsize=2)
    full = 56320 * 32 * 128 * 2  # one of Q, K, V over the whole sequence, float16
    for ranks in (2, 4, 8):
        gather = traffic_per_rank("allgather_kv", ranks=ranks, **sizes)
        ulysses = traffic_per_rank("ulysses", ranks=ranks, **sizes)
        ring = traffic_per_rank("ring", ranks=ranks, **sizes)
        assert gather["received_bytes"] == ring["received_bytes"] == 2 * full * (ranks - 1) // ranks
        assert ulysses["received_bytes"] * ranks == 2 * gather["received_bytes"]  # 2/N of allgather_kv's
        assert gather["kv_bytes"] == 2 * full and ulysses["kv_bytes"] == 2 * full // ranks
        assert ring["kv_bytes"] == 4 * full // ranks and ring["scores_bytes"] == 32 * (56320 // ranks) ** 2 * 4
    with pytest.raises(InvalidArgumentError,
                       match="strategy is 'tree'; it must be one of: allgather_kv, ulysses, ring"):
        traffic_per_rank("tree", ranks=2, **sizes)
