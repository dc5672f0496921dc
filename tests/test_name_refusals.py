"""One way to refuse a name from a fixed vocabulary: every entry point, Python or the native core
through its bindings, takes names exactly as listed (no case folding) and refuses any other with
the same words: "<argument> is '<value>' (did you mean '<name>'?); it must be one of: a, b, c"
(no GPU needed: the checks come before anything touches one)."""

from __future__ import annotations

import numpy as np
import pytest

import mdtrt
from mdtrt import _core, attention, context_parallel, reference, sharding, vocabulary
from mdtrt.device_group import DeviceGroup
from mdtrt.runner import EngineRunner
from test_arguments import X, stub_group

STRATEGIES = ("allgather_kv", "ulysses", "ring")  # written out: the test must not borrow the code's list


def expected(argument: str, value: str, close: str, accepted) -> str:
    return f"{argument} is '{value}' (did you mean '{close}'?); it must be one of: {', '.join(accepted)}"


# (entry point, argument, misspelt value, the name it is close to, the accepted names)
ENTRY_POINTS = {
    "DeviceGroup.collective op": (lambda v: stub_group().collective(v, X), "op", "All-Reduce", "all_reduce",
                                  vocabulary.COLLECTIVES),
    "DeviceGroup.all_reduce reduce": (lambda v: stub_group().all_reduce(X, reduce=v), "reduce", "Sum", "sum",
                                      vocabulary.REDUCE_OPS),
    "reference.collective op": (lambda v: reference.collective(v, X), "op", "All-Reduce", "all_reduce",
                                vocabulary.COLLECTIVES),
    "reference.collective reduce": (lambda v: reference.collective("all_reduce", X, reduce=v), "reduce", "Sum", "sum",
                                    vocabulary.REDUCE_OPS),
    "native op": (lambda v: _core.collective_output_shape(v, [4], 2), "op", "All-Reduce", "all_reduce",
                  vocabulary.COLLECTIVES),
    "native reduce": (lambda v: _core.CollectiveProgram("all_reduce", v, 0, [], "float32", 2, 2), "reduce", "Sum",
                      "sum", vocabulary.REDUCE_OPS + ("none",)),
    "native dtype": (lambda v: _core.CollectiveProgram("all_reduce", "sum", 0, [], v, 2, 2), "dtype", "Float32",
                     "float32", vocabulary.DTYPES),
    "native replication": (lambda v: _core.testing.choose_replication(v, 1024, True, False), "replication", "Peers",
                           "peer", vocabulary.REPLICATION_MODES),
    "EngineRunner replication": (lambda v: EngineRunner(stub_group(), engine=b"x", replication=v), "replication",
                                 "Peers", "peer", vocabulary.REPLICATION_MODES),
    "traffic_per_rank strategy": (lambda v: context_parallel.traffic_per_rank(
        v, sequence=8, batch=1, heads=2, head_dim=4, itemsize=2, ranks=2), "strategy", "Ring", "ring", STRATEGIES),
    "check_hints strategy": (lambda v: sharding.check_hints({}, strategy=v), "strategy", "Ring", "ring", STRATEGIES),
    "check_hints hints field": (lambda v: sharding.check_hints({"strategy": v}), "hints field 'strategy'", "Ring",
                                "ring", STRATEGIES),
    "simulate backend": (lambda v: mdtrt.simulate(None, {}, 1, backend=v), "backend", "ONNXRuntime", "onnxruntime",
                         ("auto", "onnxruntime", "reference")),
    "AttentionConfig dtype": (lambda v: attention.AttentionConfig(dtype=v), "dtype", "Float16", "float16",
                              ("float16", "float32")),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_refuses_a_misspelt_name_in_the_same_words(entry, monkeypatch):
    call, argument, value, close, accepted = ENTRY_POINTS[entry]
    monkeypatch.setattr(DeviceGroup, "__len__", lambda self: 2)
    with pytest.raises(mdtrt.InvalidArgumentError) as error:  # also a ValueError
        call(value)
    assert str(error.value).endswith(expected(argument, value, close, accepted)), error.value


@pytest.mark.parametrize("value, close", [("all_reduse", "all_reduce"), ("allgather", "all_gather"),
                                          ("ReduceScatter", "reduce_scatter"), ("scater", "scatter")])
def test_python_and_the_core_suggest_the_same_name(value, close):
    with pytest.raises(mdtrt.InvalidArgumentError) as native:
        _core.collective_output_shape(value, [4], 2)
    with pytest.raises(mdtrt.InvalidArgumentError) as python:
        reference.collective(value, X)
    assert str(native.value) == str(python.value) == expected("op", value, close, vocabulary.COLLECTIVES)


@pytest.mark.parametrize("value", ["ALL_REDUCE", "All_Reduce"])
def test_a_name_in_another_case_is_refused_everywhere(value):
    # Exact names everywhere: the reference used to lower-case them, the group and the core did not.
    for call in (lambda: reference.collective(value, X), lambda: _core.collective_output_shape(value, [4], 2),
                 lambda: stub_group().collective(value, X)):
        with pytest.raises(mdtrt.InvalidArgumentError, match=r"\(did you mean 'all_reduce'\?\)"):
            call()


def test_a_value_that_is_not_a_string_is_named_with_its_type():
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        reference.collective(3, X)
    assert str(error.value) == f"op is 3 (int); it must be one of: {', '.join(vocabulary.COLLECTIVES)}"
