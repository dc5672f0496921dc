"""mdtrt.simulate: DistCollective nodes in a graph run with the numpy reference's semantics,
segments run per rank, and errors name what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mdtrt.reference import collective  # noqa: E402
import mdtrt  # noqa: E402
from mdtrt import compare_outputs, run_on_cpu, simulate  # noqa: E402

SCALE = np.float32(3.0)


def dist_collective(inp, out, operation, *, reduce_op="none", root=-1, nb_rank=2, groups=()):
    # Attributes as polygraphy 0.53 writes them: strings for the names, ints, ints list.
    node = helper.make_node(
        "DistCollective", [inp], [out], name=f"dc_{out}",
        collective_operation=operation, reduce_op=reduce_op, root=root, nb_rank=nb_rank, group_size=0,
    )
    node.attribute.append(helper.make_attribute("groups", list(groups), attr_type=onnx.AttributeProto.INTS))
    return node


def scatter_then(operation, ranks, rows, **attrs):
    """input (ranks*rows, 3) -> scatter from rank 0 -> *3 (a segment between collectives)
    -> the collective under test -> output. Each rank feeds the collective different data."""
    nodes = [
        dist_collective("input", "chunk", "scatter", root=0, nb_rank=ranks),
        helper.make_node("Mul", ["chunk", "scale"], ["scaled"]),
        dist_collective("scaled", "output", operation, nb_rank=ranks, **attrs),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [ranks * rows, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(SCALE), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CASES = [
    ("all_reduce", {"reduce_op": "sum"}),
    ("all_reduce", {"reduce_op": "max"}),
    ("all_reduce", {"reduce_op": "avg"}),
    ("reduce", {"reduce_op": "min", "root": 1}),
    ("reduce_scatter", {"reduce_op": "prod"}),
    ("broadcast", {"root": 2}),
    ("all_gather", {}),
    ("gather", {"root": 0}),
    ("scatter", {"root": 1}),
    ("all_to_all", {}),
    ("all_gather", {"groups": [2, 0]}),
    ("broadcast", {"root": 0, "groups": [1, 0]}),
]


@pytest.mark.parametrize("operation,attrs", CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(CASES)])
def test_collectives_in_graph_match_reference(operation, attrs):
    ranks, rows = 3, 6
    x = np.random.default_rng(7).standard_normal((ranks * rows, 3)).astype(np.float32)
    outputs = simulate(scatter_then(operation, ranks, rows, **attrs), {"input": x}, ranks, progress=False)
    # Independent of simulate: the scatter hands rank r rows r*6..r*6+5, the Mul scales them.
    chunks = [x[r * rows : (r + 1) * rows] * SCALE for r in range(ranks)]
    expected = collective(
        operation, chunks, reduce=attrs.get("reduce_op", "none"), root=attrs.get("root", -1),
        groups=attrs.get("groups") or None,
    )
    for rank in range(ranks):
        got = outputs[rank]["output"]
        if expected[rank] is None:  # undefined output: simulate fills it with NaN
            assert np.isnan(got).all(), f"rank {rank}"
        else:
            np.testing.assert_array_equal(got, expected[rank], err_msg=f"rank {rank}")


def test_all_gather_by_hand():
    x = np.random.default_rng(8).standard_normal((4, 3)).astype(np.float32)
    outputs = simulate(scatter_then("all_gather", 2, 2), {"input": x}, 2, progress=False)
    for rank in range(2):
        np.testing.assert_array_equal(outputs[rank]["output"], x * SCALE)


def test_reference_backend_agrees():
    x = np.random.default_rng(9).standard_normal((9, 3)).astype(np.float32)
    model = scatter_then("all_to_all", 3, 3)
    fast = simulate(model, {"input": x}, 3, progress=False)
    slow = simulate(model, {"input": x}, 3, progress=False, backend="reference")
    for rank in range(3):
        np.testing.assert_allclose(fast[rank]["output"], slow[rank]["output"], rtol=1e-6)


def _single_device_model():
    # Nodes listed out of order (as polygraphy leaves them); no collectives.
    nodes = [helper.make_node("Relu", ["a"], ["output"]), helper.make_node("Neg", ["input"], ["a"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_unsorted_nodes_and_single_device_model():
    # Unsorted nodes still run; no collectives: 1 segment.
    x = np.array([[1.0, -2.0], [-3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(run_on_cpu(_single_device_model(), {"input": x}, progress=False)["output"],
                                  [[0, 2], [3, 0]])


def test_a_model_without_collectives_on_several_ranks_is_warned_about(tmp_path, recwarn):
    """The single-device model passed to simulate by mistake runs (every rank computes the whole
    model), but compare_outputs would then say PASS for no sharding at all: a warning names the
    model and the likely mistake. One rank (run_on_cpu) is the single-device run: no warning."""
    x = np.zeros((2, 2), np.float32)
    path = tmp_path / "attention_sd.onnx"
    onnx.save(_single_device_model(), path)
    for model, named in ((_single_device_model(), "the model (graph 'g')"), (path, f"model {path}")):
        with pytest.warns(UserWarning) as caught:
            simulate(model, {"input": x}, 2, progress=False)
        message = str(caught[0].message)
        assert message.startswith(f"{named} has no DistCollective nodes, so the 2 simulated ranks exchange nothing"), message
        assert "did you pass the single-device model instead of the sharded one?" in message
        assert caught[0].filename == __file__  # points at the caller's line
    run_on_cpu(path, {"input": x}, progress=False)
    simulate(path, {"input": x}, 1, progress=False)
    simulate(scatter_then("all_gather", 2, 1), {"input": x[:, :1].repeat(3, 1)}, 2, progress=False)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]


class TestErrors:
    def test_rank_count_must_match_model(self):
        model = scatter_then("all_gather", 2, 2)
        with pytest.raises(ValueError, match="sharded for 2 ranks .* 3 were asked"):
            simulate(model, {"input": np.zeros((4, 3), np.float32)}, 3, progress=False)

    def test_inputs_checked(self):
        model = scatter_then("all_gather", 2, 2)
        with pytest.raises(ValueError, match="missing \\['input'\\]"):
            simulate(model, {"x": np.zeros((4, 3), np.float32)}, 2, progress=False)
        with pytest.raises(ValueError, match="must be float32, got float16"):
            simulate(model, {"input": np.zeros((4, 3), np.float16)}, 2, progress=False)

    def test_collective_errors_name_the_node(self):
        model = scatter_then("reduce_scatter", 2, 3, reduce_op="sum")  # 3 rows over 2 ranks
        with pytest.raises(ValueError, match="dc_output.*not divisible by 2"):
            simulate(model, {"input": np.ones((6, 3), np.float32)}, 2, progress=False)

    def test_bad_backend_and_ranks(self):
        model = scatter_then("all_gather", 2, 2)
        with pytest.raises(ValueError, match="backend"):
            simulate(model, {"input": np.zeros((4, 3), np.float32)}, 2, backend="tensorrt")
        with pytest.raises(ValueError, match="positive integer"):
            simulate(model, {"input": np.zeros((4, 3), np.float32)}, 0)


def test_compare_outputs_report():
    reference = {"y": np.array([1.0, -2.0, 4.0], np.float32)}
    report = compare_outputs(reference, {"y": np.array([1.0, -2.0, 4.03], np.float32)}, atol=0, rtol=1e-2)
    assert report.passed and abs(report.outputs[0].max_rel_error - 0.03 / 4) < 1e-6
    report = compare_outputs(reference, {"y": np.array([1.0, -2.0, 4.1], np.float32)}, atol=0, rtol=1e-2)
    assert not report.passed and "FAIL" in report.format()
    assert not compare_outputs(reference, {"y": np.zeros(4, np.float32)}, atol=1, rtol=1).passed
    assert not compare_outputs(reference, {"y": np.array([1, np.nan, 4], np.float32)}, atol=1, rtol=1).passed
    assert not compare_outputs(reference, {}, atol=1, rtol=1).passed


def test_compare_outputs_passes_nan_and_inf_where_the_reference_has_them():
    """Documented: an output passes when it is non-finite exactly where the reference is (a
    masked softmax row is NaN on every device); inf - inf is NaN and used to fail it."""
    reference = {"y": np.array([1.0, np.inf, -np.inf, np.nan], np.float32)}
    report = compare_outputs(reference, {"y": np.array([1.001, np.inf, -np.inf, np.nan], np.float32)}, atol=1e-2,
                             rtol=0)
    assert report.passed, report.format()
    assert report.format().splitlines()[1].startswith("  y: PASS: max abs error 0.001, max rel error 0.001")
    for other, detail in (([1.0, -np.inf, -np.inf, np.nan], "values other than the reference's where it is non-finite"),
                          ([1.0, np.inf, -np.inf, 0.0], "values other than the reference's where it is non-finite"),
                          ([np.nan, np.inf, -np.inf, np.nan], "non-finite values where the reference has finite ones")):
        report = compare_outputs(reference, {"y": np.array(other, np.float32)}, atol=1, rtol=1)
        assert not report.passed and report.outputs[0].detail == detail, (other, report.format())


def test_compare_outputs_names_outputs_the_reference_lacks():
    """A renamed output ({"output"} against {"out"}) is said to be there under the other name,
    not only missing; an extra output beside the compared ones is named as not compared."""
    y = np.ones(3, np.float32)
    report = compare_outputs({"output": y}, {"out": y}, atol=0, rtol=0)
    assert not report.passed and report.unexpected == ["out"]
    assert report.format().splitlines()[1:] == ["  output: FAIL: missing from the outputs (they have: out)"]
    report = compare_outputs({"output": y}, {"output": y, "attention_probs": y}, atol=0, rtol=0)
    assert report.passed and report.format().splitlines()[1:] == [
        "  output: PASS: max abs error 0, max rel error 0", "  not in the reference, not compared: attention_probs"]
    assert compare_outputs({"output": y}, {}, atol=0, rtol=0).outputs[0].detail == "missing from the outputs"


def test_compare_outputs_against_an_all_zero_reference_says_the_relative_error_is_undefined():
    """Also where the reference's finite values are all zeros beside its inf or NaN (which the
    outputs match): the reference is not all zeros then, and the report must not say it is."""
    zeros = {"y": np.zeros(3, np.float32)}
    report = compare_outputs(zeros, {"y": np.full(3, 1e-3, np.float32)}, atol=1e-2, rtol=1e-2)
    assert report.passed  # the absolute error decides
    undefined = "  y: PASS: max abs error 0.001, max rel error undefined (the reference's finite values are all zeros)"
    assert report.format().splitlines()[1] == undefined
    assert "max rel error 0" in compare_outputs(zeros, zeros, atol=0, rtol=0).format()
    with_inf = {"y": np.array([np.inf, 0.0, np.nan], np.float32)}
    report = compare_outputs(with_inf, {"y": np.array([np.inf, 1e-3, np.nan], np.float32)}, atol=1e-2, rtol=1e-2)
    assert report.passed and report.format().splitlines()[1] == undefined


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bar_only_on_a_terminal(terminal, monkeypatch, capsys):
    """A bar redraws in place: on a terminal it shows, into a file or a CI log it would write one
    long line of carriage returns, so there simulate(progress=True) is silent."""
    pytest.importorskip("tqdm")
    import mdtrt._simulate as simulate_module

    monkeypatch.setattr(simulate_module, "stderr_is_terminal", lambda: terminal)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    outputs = simulate(scatter_then("all_gather", 2, 2), {"input": x}, 2, progress=True)
    np.testing.assert_array_equal(outputs[0]["output"], x * SCALE)  # scatter, scale, all_gather
    err = capsys.readouterr().err
    assert ("simulate" in err) == terminal, err


def test_stderr_is_terminal_survives_a_replaced_or_closed_stderr(monkeypatch):
    import io

    from mdtrt._progress import stderr_is_terminal

    monkeypatch.setattr("sys.stderr", None)
    assert stderr_is_terminal() is False
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr("sys.stderr", closed)
    assert stderr_is_terminal() is False
    monkeypatch.setattr("sys.stderr", object())
    assert stderr_is_terminal() is False


def test_a_list_input_of_the_wrong_type_is_named_as_a_list():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"must be float32, got a list \(read as float64\); pass np.asarray"):
        simulate(scatter_then("all_gather", 2, 2), {"input": x.astype(np.float64).tolist()}, 2, progress=False)
    # A numpy array of the wrong dtype: what it is, and the conversion.
    with pytest.raises(mdtrt.InvalidArgumentError,
                       match=r"must be float32, got float64; pass x\.astype\(np\.float32\)$"):
        simulate(scatter_then("all_gather", 2, 2), {"input": x.astype(np.float64)}, 2, progress=False)


def test_compare_outputs_refuses_what_would_fail_without_saying_why():
    """simulate's list of per-rank dicts passed whole (the README compares per_rank[0]) read as
    "missing from the outputs", a list of arrays raised numpy's ValueError, and a negative
    tolerance failed every output with zero error: each is now an error saying what to pass."""
    rng = np.random.default_rng(7)
    expected = {"y": rng.standard_normal((4, 2)).astype(np.float32)}
    per_rank = [dict(expected), dict(expected)]
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"actual must be a dict of output name to array, got list "
                                                         r"of 2 dicts \(one per rank, as simulate returns them\): "
                                                         r"compare one rank's outputs, e.g. actual\[0\]"):
        compare_outputs(expected, per_rank, atol=1e-3, rtol=1e-3)
    with pytest.raises(mdtrt.InvalidArgumentError, match="expected must be a dict of output name to array, got list$"):
        compare_outputs([expected["y"]], expected, atol=1e-3, rtol=1e-3)
    for name, value in (("atol", -1e-3), ("rtol", float("nan")), ("atol", float("inf")), ("rtol", "0.1")):
        tolerances = {"atol": 1e-3, "rtol": 1e-3, name: value}
        with pytest.raises(mdtrt.InvalidArgumentError, match=f"{name} must be a finite number >= 0"):
            compare_outputs(expected, per_rank[0], **tolerances)
    assert compare_outputs(expected, per_rank[0], atol=0, rtol=0).passed  # zero tolerances stay allowed
