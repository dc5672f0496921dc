"""Wrong argument types and values to DeviceGroup, its collectives and EngineRunner raise
InvalidArgumentError naming the argument and what it expects, on any machine (no GPU needed:
the checks come before anything touches a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

import mdtrt
from mdtrt import arguments, context_parallel, reference, vocabulary
from mdtrt.device_group import DeviceGroup
from mdtrt.prepared_call import KeptCalls
from mdtrt.runner import EngineRunner


@pytest.mark.parametrize("gpus, match", [
    (2, r"gpus must be a list of integers, got 2 \(int\); GPU ids, e.g. gpus=\[0, 1\]"),
    ("01", r"gpus must be a list of integers, got '01' \(str\)"),
    ([0, "1"], r"gpus must be a list of integers, got \[0, '1'\] \(list\): element 1 is '1' \(str\)"),
    ([True], r"element 0 is True \(bool\)"),
    ([0.0], r"element 0 is 0.0 \(float\)"),
    ([0, [1]], r"element 1 is \[1\] \(list\)"),
])
def test_device_group_gpus(gpus, match):
    with pytest.raises(mdtrt.InvalidArgumentError, match=match):
        mdtrt.DeviceGroup(gpus=gpus)


@pytest.mark.parametrize("timeout", ["60", 0, -1, None, True, float("nan"), float("inf")])
def test_device_group_timeout(timeout):
    with pytest.raises(mdtrt.InvalidArgumentError, match="timeout must be a positive, finite number of seconds"):
        mdtrt.DeviceGroup(gpus=[0], timeout=timeout)


class StubGroupNative:
    num_local_ranks = 2
    ranks = [0, 1]
    devices = [0, 1]
    world_size = 2


def stub_group() -> DeviceGroup:
    group = DeviceGroup.__new__(DeviceGroup)
    group._adopt(StubGroupNative())
    return group


X = [np.ones(4, np.float32), np.ones(4, np.float32)]


@pytest.mark.parametrize("kwargs, match", [
    ({"op": 3}, r"op is 3 \(int\); it must be one of: all_reduce"),
    ({"op": "allreduce"}, r"op is 'allreduce' \(did you mean 'all_reduce'\?\)"),
    ({"reduce": None}, r"reduce is None \(NoneType\); it must be one of: sum"),
    ({"op": "broadcast", "root": "0"}, r"root must be an integer, got '0' \(str\)"),
    ({"op": "broadcast", "root": 1.0}, "root must be an integer"),
    ({"groups": 1}, r"groups must be a list of integers, got 1 \(int\)"),
    ({"groups": [0, "1"]}, "element 1 is '1'"),
    ({"poison_outputs": "yes"}, "poison_outputs must be True or False"),
    ({"sequential_bind": 1}, "sequential_bind must be True or False"),
    ({"inputs": X[:1]}, "all_reduce needs one input per local rank: got 1 for 2"),
    ({"inputs": X[0]}, "all_reduce needs one input per local rank: got 1 for 2"),
    ({"out": [object()]}, "out= needs one array per local rank: got 1 for 2"),
])
def test_collective_arguments(kwargs, match):
    kwargs = {"op": "all_reduce", "inputs": X, **kwargs}
    op, inputs = kwargs.pop("op"), kwargs.pop("inputs")
    with pytest.raises(mdtrt.InvalidArgumentError, match=match):
        stub_group().collective(op, inputs, **kwargs)


def test_op_methods_check_the_same_way():
    group = stub_group()
    with pytest.raises(mdtrt.InvalidArgumentError, match="root must be an integer"):
        group.scatter(X, root=None)
    with pytest.raises(mdtrt.InvalidArgumentError, match="groups must be a list of integers"):
        group.all_gather(X, groups="01")
    with pytest.raises(mdtrt.InvalidArgumentError, match="poison_outputs must be True or False"):
        group.prepare_collective("all_to_all", X, poison_outputs=None)


@pytest.mark.parametrize("group, match", [
    ("model.plan", "group must be a mdtrt.DeviceGroup, got str: the first argument is the DeviceGroup"),
    (b"\x00plan", "got bytes: the first argument is the DeviceGroup"),
    (None, "group must be a mdtrt.DeviceGroup, got NoneType"),
    ([0, 1], "group must be a mdtrt.DeviceGroup, got list"),
])
def test_engine_runner_needs_a_group(group, match):
    with pytest.raises(mdtrt.InvalidArgumentError, match=match):
        EngineRunner(group, "model.plan")


def test_engine_runner_constructor_arguments(monkeypatch):
    group = stub_group()
    monkeypatch.setattr(DeviceGroup, "__len__", lambda self: 2)
    with pytest.raises(mdtrt.InvalidArgumentError, match="program must be a native program"):
        EngineRunner(group, program="copy")
    with pytest.raises(mdtrt.InvalidArgumentError, match="replication is 'fast'; it must be one of"):
        EngineRunner(group, engine=b"x", replication="fast")
    with pytest.raises(mdtrt.InvalidArgumentError, match="cuda_graph must be True or False"):
        EngineRunner(group, engine=b"x", cuda_graph="on")
    with pytest.raises(mdtrt.InvalidArgumentError, match="multi_device must be True or False"):
        EngineRunner(group, engine=b"x", multi_device=None)
    with pytest.raises(mdtrt.InvalidArgumentError, match="engines must be a list of 2 engines"):
        EngineRunner(group, engines="a.plan")
    with pytest.raises(mdtrt.InvalidArgumentError, match="exactly one of"):
        EngineRunner(group)


class StubRunnerNative:
    def infer(self, *args):
        raise AssertionError("a wrong argument reached the native runner")

    prepare = infer


def stub_runner() -> EngineRunner:
    runner = EngineRunner.__new__(EngineRunner)
    runner.group = [0, 1]  # only its length is used
    runner._native = StubRunnerNative()
    runner._inputs = [("input", "float32", (-1,))]
    runner._input_names = ("input",)
    runner._devices = [0, 1]
    runner._calls = KeptCalls(16)
    runner._output_specs = {}
    runner.replication = "auto"
    return runner


@pytest.mark.parametrize("kwargs, match", [
    ({"inputs": 5}, r"inputs must be a dict of input name to array, or a list of such dicts"),
    ({"inputs": [np.ones(2, np.float32)] * 2}, "inputs must be a dict of input name to array"),
    ({"inputs": [{"input": np.ones(2, np.float32)}]}, "one dict per local rank: got 1 for 2"),
    ({"all_ranks": "yes"}, "all_ranks must be True or False"),
    ({"poison_outputs": 0}, "poison_outputs must be True or False"),
    ({"timeout": 0}, "timeout must be a positive, finite number of seconds"),
    ({"timeout": "5"}, "timeout must be a positive, finite number of seconds"),
    ({"replication": "fast"}, "replication is 'fast'; it must be one of"),
    ({"outputs": [np.ones(2)]}, "outputs must be a dict of output name to a list of device arrays"),
    ({"outputs": {"output": [np.ones(2)]}}, r"outputs\['output'\] needs one array per local rank: got 1 for 2"),
])
def test_infer_and_prepare_arguments(kwargs, match):
    kwargs = {"inputs": {"input": np.ones(2, np.float32)}, **kwargs}
    inputs = kwargs.pop("inputs")
    runner = stub_runner()
    for method in (runner.infer, runner.prepare):
        with pytest.raises(mdtrt.InvalidArgumentError, match=match):
            method(inputs, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"iterations": 0}, "iterations must be an integer >= 1"),
    ({"iterations": 2.5}, "iterations must be an integer >= 1"),
    ({"warmup": -1}, "warmup must be an integer >= 0"),
])
def test_time_infer_arguments(kwargs, match):
    with pytest.raises(mdtrt.InvalidArgumentError, match=match):
        stub_runner().time_infer({"input": np.ones(2, np.float32)}, **kwargs)


def test_accepted_forms():
    assert arguments.integers(range(2), "gpus") == [0, 1]
    assert arguments.integers((np.int64(1), 0), "gpus") == [1, 0]
    assert arguments.integers(np.arange(2), "gpus") == [0, 1]
    with pytest.raises(mdtrt.InvalidArgumentError, match="gpus must be a list of integers"):
        arguments.integers(np.zeros((2, 2), int), "gpus")
    assert arguments.flag(np.True_, "x") is True and arguments.flag(False, "x") is False
    assert arguments.seconds(np.float32(2.5)) == 2.5 and arguments.integer(np.int32(3), "root") == 3
    assert arguments.per_rank("a", "inputs", 1) == ["a"]


def test_errors_are_value_errors_too():
    error = arguments.fail("x", "an integer", "1")
    assert isinstance(error, mdtrt.MdtrtError) and isinstance(error, ValueError)
    assert str(error) == "x must be an integer, got '1' (str)"


@pytest.mark.parametrize("call, suggestion", [
    (lambda: stub_group().collective("all_reduse", X), "'all_reduce'"),
    (lambda: stub_group().collective("allgather", X), "'all_gather'"),
    (lambda: stub_group().collective("ReduceScatter", X), "'reduce_scatter'"),
    (lambda: stub_group().collective("all_reduce", X, reduce="Sum"), "'sum'"),
    (lambda: EngineRunner(stub_group(), engine=b"x", replication="peers"), "'peer'"),
    (lambda: reference.collective("allgather", X), "'all_gather'"),
    (lambda: context_parallel.traffic_per_rank("ulyses", sequence=8, batch=1, heads=2, head_dim=4,
                                                     itemsize=2, ranks=2), "'ulysses'"),
])
def test_a_misspelt_name_gets_the_name_it_is_close_to(call, suggestion, monkeypatch):
    monkeypatch.setattr(DeviceGroup, "__len__", lambda self: 2)
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        call()
    assert f"(did you mean {suggestion}?)" in str(error.value), error.value


@pytest.mark.parametrize("value", ["fast", 3, ["all_reduce"], ""])
def test_a_name_close_to_none_gets_no_suggestion(value):
    assert vocabulary.did_you_mean(value, vocabulary.COLLECTIVES) == ""
    assert vocabulary.did_you_mean(value, vocabulary.REPLICATION_MODES) == ""
