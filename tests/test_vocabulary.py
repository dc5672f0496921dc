"""One vocabulary: every Python list of op names, reduce ops, replication modes and dtypes comes
from the native core's tables, and the core accepts exactly those names (no GPU needed)."""

import numpy as np
import pytest

import mdtrt
from mdtrt import _core, reference, vocabulary
from mdtrt.device_group import COLLECTIVES, REDUCE_OPS
from mdtrt.runner import REPLICATION_MODES


def test_python_lists_are_the_core_tables():
    assert COLLECTIVES is vocabulary.COLLECTIVES and reference.OPERATIONS is vocabulary.COLLECTIVES
    assert REDUCE_OPS is vocabulary.REDUCE_OPS and reference.REDUCE_OPERATIONS is vocabulary.REDUCE_OPS
    assert REPLICATION_MODES is vocabulary.REPLICATION_MODES
    assert vocabulary.COLLECTIVES == tuple(_core.collective_ops())
    assert vocabulary.REDUCE_OPS + ("none",) == tuple(_core.reduce_ops())
    assert vocabulary.REPLICATION_MODES == tuple(_core.replication_modes())
    assert vocabulary.DTYPES == tuple(_core.DType.__members__)


@pytest.mark.parametrize("op", vocabulary.COLLECTIVES)
@pytest.mark.parametrize("group_size, shape", [(2, [4, 3]), (3, [6, 2, 5]), (4, [8]), (1, [3, 7])])
def test_every_collective_name_is_accepted_by_the_core(op, group_size, shape):
    # Every name the core lists gives the output shape the numpy reference computes (an unknown
    # name would raise); the reference's is a group member's output (the root's for reduce and gather).
    outputs = reference.collective(op, [np.zeros(shape, np.float32)] * group_size, root=0)
    expected = next(out for out in outputs if out is not None).shape
    assert list(_core.collective_output_shape(op, shape, group_size)) == list(expected)


def test_unknown_names_list_the_table():
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        _core.collective_output_shape("all-reduce", [4], 2)
    assert str(error.value).endswith(f"; it must be one of: {', '.join(vocabulary.COLLECTIVES)}")
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        _core.CollectiveProgram("all_reduce", "mean", 0, [], "float32", 2, 2)
    assert str(error.value).endswith(f"; it must be one of: {', '.join(vocabulary.REDUCE_OPS + ('none',))}")


@pytest.mark.parametrize("op", vocabulary.COLLECTIVES)
def test_reducing_and_rooted_sets_match_what_the_core_checks(op):
    # The core's CollectiveProgram checks its arguments on construction (no GPU): a reducing op
    # refuses reduce="none", a rooted op refuses a root outside the group; the others ignore both.
    def refusal(reduce, root):
        try:
            _core.CollectiveProgram(op, reduce, root, [], "float32", 2, 2)
        except mdtrt.InvalidArgumentError as error:
            return str(error)
        return None

    needs_reduce = refusal("none", 0)
    assert (needs_reduce is not None) == (op in vocabulary.REDUCING), needs_reduce
    if needs_reduce:
        assert f"{op} needs a reduce op" in needs_reduce
    bad_root = refusal("sum", 5)
    assert (bad_root is not None) == (op in vocabulary.ROOTED), bad_root
    if bad_root:
        assert f"root 5 of {op}" in bad_root
