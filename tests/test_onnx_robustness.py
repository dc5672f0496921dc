"""ONNX models as users have them: external data (also past protobuf's 2 GiB, with the limit
mocked), subgraphs reading the outer graph, bfloat16, inputs that do not match the model, and
arguments of the wrong kind. No GPU needed."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import mdtrt  # noqa: E402
from mdtrt import onnx_graph  # noqa: E402
from mdtrt.reference import collective  # noqa: E402

OPSET = [helper.make_opsetid("", 17)]


def dist_collective(inp, out, operation, *, nb_rank, root=-1, reduce_op="none"):
    node = helper.make_node("DistCollective", [inp], [out], name=f"dc_{out}", collective_operation=operation,
                            reduce_op=reduce_op, root=root, nb_rank=nb_rank, group_size=0)
    node.attribute.append(helper.make_attribute("groups", [], attr_type=onnx.AttributeProto.INTS))
    return node


def matmul_model(weight: np.ndarray, rows: int, ranks: int = 0):
    """input (rows, k) [-> scatter] -> MatMul(weight) -> Relu [-> all_gather] -> output."""
    k, n = weight.shape
    nodes, src = [], "input"
    if ranks:
        nodes.append(dist_collective("input", "chunk", "scatter", nb_rank=ranks, root=0))
        src = "chunk"
    nodes += [helper.make_node("MatMul", [src, "weight"], ["mm"]), helper.make_node("Relu", ["mm"], ["act"])]
    if ranks:
        nodes.append(dist_collective("act", "output", "all_gather", nb_rank=ranks))
    else:
        nodes.append(helper.make_node("Identity", ["act"], ["output"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight, "weight")])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def save_with_external_data(model, directory) -> str:
    path = os.path.join(directory, "model.onnx")
    model = onnx.ModelProto.FromString(model.SerializeToString())  # saving moves the weights out of it
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=16)
    return path


# -- 10: external data ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mock_limit", [False, True], ids=["small", "past-protobuf-limit-mocked"])
def test_external_data_runs_on_cpu_and_simulated(tmp_path, monkeypatch, mock_limit):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    single = save_with_external_data(matmul_model(weight, 8), tmp_path)
    (tmp_path / "sharded").mkdir()
    sharded = save_with_external_data(matmul_model(weight, 8, ranks=2), tmp_path / "sharded")
    assert os.path.getsize(single + ".data") >= weight.nbytes  # the weights really are outside
    if mock_limit:
        # Every model now counts as too large for one protobuf message: segments go to ONNX Runtime
        # through a file with external data, shape inference sees weight stubs.
        monkeypatch.setattr(onnx_graph, "PROTOBUF_LIMIT", 1024)
    expected = np.maximum(x @ weight, 0)
    np.testing.assert_allclose(mdtrt.run_on_cpu(single, {"input": x}, progress=False)["output"], expected,
                               rtol=1e-5, atol=1e-5)
    per_rank = mdtrt.simulate(sharded, {"input": x}, 2, progress=False)
    assert len(per_rank) == 2  # every rank's outputs, so the loop below checks them all
    for rank_outputs in per_rank:
        np.testing.assert_allclose(rank_outputs["output"], expected, rtol=1e-5, atol=1e-5)


def test_external_data_file_missing_is_named(tmp_path):
    path = save_with_external_data(matmul_model(np.ones((64, 48), np.float32), 8), tmp_path)
    os.remove(path + ".data")
    with pytest.raises(mdtrt.InvalidArgumentError, match="model: .*external data"):
        mdtrt.run_on_cpu(path, {"input": np.ones((8, 64), np.float32)}, progress=False)
    # A ModelProto loaded without its data cannot know where the file is: refused up front.
    unloaded = onnx.load(path, load_external_data=False)
    with pytest.raises(mdtrt.InvalidArgumentError, match="'weight'.*external file.*pass the model's path"):
        mdtrt.run_on_cpu(unloaded, {"input": np.ones((8, 64), np.float32)}, progress=False)


def test_shard_with_external_data_past_the_limit(tmp_path, monkeypatch):
    pytest.importorskip("polygraphy")
    from mdtrt import attention

    model = attention.create_attention_model(hidden=48, heads=4, head_dim=8, dtype="float32", seed=3)
    x = attention.random_inputs(model, {"sequence_length": 8, "batch_size": 2}, seed=5)
    path = save_with_external_data(model, tmp_path)
    expected = mdtrt.run_on_cpu(model, x, progress=False)
    monkeypatch.setattr(onnx_graph, "PROTOBUF_LIMIT", 4096)  # the model's weights are larger than this
    assert onnx_graph.too_large_to_serialize(onnx.load(path))
    sharded = mdtrt.shard(path, attention.default_hints(2), 2)
    assert sum(n.op_type == "DistCollective" for n in sharded.graph.node) == 4
    per_rank = mdtrt.simulate(sharded, x, 2, progress=False)
    assert len(per_rank) == 2
    for outputs in per_rank:
        report = mdtrt.compare_outputs(expected, outputs, atol=1e-5, rtol=1e-4)
        assert report.passed, report.format()


# -- 11: subgraphs reading the outer graph -------------------------------------------------------------

def if_model(ranks: int):
    """The If node is listed first, but its branches read `scaled`, made by a later node, and the
    input of the If is the output of a scatter. then: scaled * 2, else: -scaled."""
    then_graph = helper.make_graph([helper.make_node("Mul", ["scaled", "two"], ["then_out"])], "then", [],
                                   [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
                                   initializer=[numpy_helper.from_array(np.array(2, np.float32), "two")])
    else_graph = helper.make_graph([helper.make_node("Neg", ["scaled"], ["else_out"])], "else", [],
                                   [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("If", ["flag"], ["branch"], then_branch=then_graph, else_branch=else_graph, name="if"),
        helper.make_node("Mul", ["chunk", "scale"], ["scaled"], name="scale"),
        dist_collective("input", "chunk", "scatter", nb_rank=ranks, root=0),
        dist_collective("branch", "output", "all_gather", nb_rank=ranks),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4 * ranks, 3]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(3, np.float32), "scale")])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def test_toposort_counts_outer_reads_of_subgraphs_as_inputs():
    model = if_model(2)
    assert onnx_graph.outer_scope_inputs(model.graph.node[0]) == ["scaled"]
    onnx_graph.toposort_nodes(model.graph)
    order = [n.name for n in model.graph.node]
    assert order.index("scale") < order.index("if") and order.index("dc_chunk") < order.index("scale")
    from mdtrt.sharding import toposort_nodes  # sharding uses the same sort

    assert toposort_nodes is onnx_graph.toposort_nodes


@pytest.mark.parametrize("flag", [True, False])
def test_simulate_runs_if_reading_outer_tensors(flag):
    x = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    per_rank = mdtrt.simulate(if_model(2), {"input": x, "flag": np.array(flag)}, 2, progress=False)
    chunks = [x[r * 4:(r + 1) * 4] * 3 for r in range(2)]
    branch = [c * 2 if flag else -c for c in chunks]
    expected = collective("all_gather", branch)
    for rank in range(2):
        np.testing.assert_allclose(per_rank[rank]["output"], expected[rank], rtol=1e-6)


def test_nested_subgraph_outer_reads_reach_the_outer_node():
    inner = helper.make_graph([helper.make_node("Add", ["outer", "outer"], ["inner_out"])], "inner", [],
                              [helper.make_tensor_value_info("inner_out", TensorProto.FLOAT, None)])
    middle = helper.make_graph(
        [helper.make_node("If", ["c"], ["middle_out"], then_branch=inner, else_branch=inner)], "middle", [],
        [helper.make_tensor_value_info("middle_out", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=middle, else_branch=middle)
    assert onnx_graph.node_inputs(node) == ["c", "outer"]


# -- 8: bfloat16 ----------------------------------------------------------------------------------------

def test_bfloat16_model_simulates_with_the_reference_evaluator():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    ranks = 2
    nodes = [dist_collective("input", "chunk", "scatter", nb_rank=ranks, root=0),
             helper.make_node("Mul", ["chunk", "chunk"], ["sq"]),
             dist_collective("sq", "output", "all_gather", nb_rank=ranks)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.BFLOAT16, [4, 5])],
                              [helper.make_tensor_value_info("output", TensorProto.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    x = np.random.default_rng(2).integers(-8, 8, (4, 5)).astype(np.float32).astype(bf16)
    expected = (x.astype(np.float32) ** 2).astype(bf16)  # small integers: exact in bfloat16
    per_rank = mdtrt.simulate(model, {"input": x}, ranks, progress=False)
    assert len(per_rank) == ranks
    for outputs in per_rank:
        assert outputs["output"].dtype == bf16
        np.testing.assert_array_equal(outputs["output"].astype(np.float32), expected.astype(np.float32))
    # Forced onto ONNX Runtime, which has no bfloat16 Mul: refused with what to do.
    with pytest.raises(mdtrt.InvalidArgumentError, match="backend='reference'"):
        mdtrt.simulate(model, {"input": x}, ranks, progress=False, backend="onnxruntime")


def test_a_bfloat16_input_of_the_wrong_type_is_told_the_ml_dtypes_conversion():
    # numpy has no bfloat16: the hint must name ml_dtypes.bfloat16, and the expression it names
    # must evaluate to the dtype the model declares.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.BFLOAT16, [2, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for given, pattern in ((x.tolist(), r"pass np\.asarray\(\.\.\., dtype=(\S+)\)$"),
                           (x, r"pass x\.astype\((\S+)\)$")):
        with pytest.raises(mdtrt.InvalidArgumentError, match="must be bfloat16") as error:
            mdtrt.simulate(model, {"input": given}, 1, progress=False)
        spelt = re.search(pattern, str(error.value))
        assert spelt, error.value
        assert np.dtype(eval(spelt.group(1), {"np": np, "ml_dtypes": ml_dtypes})) == np.dtype(ml_dtypes.bfloat16)


# -- 15: inputs that do not match the model's declared inputs ------------------------------------------

def test_input_shape_must_match_declared_shape():
    model = matmul_model(np.ones((4, 3), np.float32), 6)
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"inputs\['input'\] has shape \(5, 4\).*dimension 0 must be 6"):
        mdtrt.run_on_cpu(model, {"input": np.ones((5, 4), np.float32)}, progress=False)
    with pytest.raises(mdtrt.InvalidArgumentError, match="2 dimensions"):
        mdtrt.run_on_cpu(model, {"input": np.ones((6, 4, 1), np.float32)}, progress=False)


def test_symbolic_dimensions_must_agree_across_inputs():
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    a, b = np.ones((3, 2), np.float32), np.ones((3, 2), np.float32)
    np.testing.assert_array_equal(mdtrt.run_on_cpu(model, {"a": a, "b": b}, progress=False)["y"], a + b)
    with pytest.raises(mdtrt.InvalidArgumentError, match="'n'"):
        mdtrt.run_on_cpu(model, {"a": a, "b": np.ones((4, 2), np.float32)}, progress=False)


# -- 14: arguments of the wrong kind name the argument -------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda m, x: mdtrt.simulate("/nonexistent/model.onnx", x, 1), "model: ONNX model file /nonexistent/model.onnx does not exist"),
    (lambda m, x: mdtrt.run_on_cpu(42, x), "model must be an onnx.ModelProto"),
    (lambda m, x: mdtrt.simulate(m, x, "2"), "ranks must be a positive integer"),
    (lambda m, x: mdtrt.simulate(m, [x["input"]], 1), "inputs must be a dict"),
    (lambda m, x: mdtrt.simulate(m, x, 1, backend="gpu"),
     "backend is 'gpu'; it must be one of: auto, onnxruntime, reference"),
    (lambda m, x: mdtrt.simulate(m, x, 1, threads="4"), "threads must be"),
])
def test_bad_arguments_are_mdtrt_errors_naming_the_argument(call, match):
    model = matmul_model(np.ones((4, 3), np.float32), 6)
    with pytest.raises(mdtrt.InvalidArgumentError, match=match):
        call(model, {"input": np.ones((6, 4), np.float32)})


def test_not_an_onnx_file_is_named(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff\x00 not protobuf" * 10)
    with pytest.raises(mdtrt.InvalidArgumentError, match="not a readable ONNX model"):
        mdtrt.run_on_cpu(str(path), {}, progress=False)


def test_loop_body_reading_an_outer_tensor_runs():
    # Loop (If's kin): the body adds `step`, a tensor of the outer graph made by a node listed later.
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "step"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3])])
    nodes = [
        helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], body=body, name="loop"),
        helper.make_node("Mul", ["x", "x"], ["step"], name="square"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              initializer=[numpy_helper.from_array(np.array(4, np.int64), "trips"),
                                           numpy_helper.from_array(np.array(True), "keep_going")])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    assert onnx_graph.node_inputs(model.graph.node[0]) == ["trips", "keep_going", "x", "step"]
    x = np.array([1.0, -2.0, 0.5], np.float32)
    for backend in ("onnxruntime", "reference"):
        got = mdtrt.run_on_cpu(model, {"x": x}, progress=False, backend=backend)["y"]
        np.testing.assert_allclose(got, x + 4 * x * x, rtol=1e-6, err_msg=backend)
