"""The numpy reference of the DistCollective operations, checked against hand-computed values
and against the expected vectors of NVIDIA's sampleDistCollective."""

from __future__ import annotations

import numpy as np
import pytest

from mdtrt import InvalidArgumentError
from mdtrt.reference import OPERATIONS, collective


def ranks_of(*rows_per_rank, dtype=np.float32):
    return [np.array(rows, dtype=dtype) for rows in rows_per_rank]


# Two ranks, 4 rows of 2: rank 0 holds 1..8, rank 1 holds 10..80.
R0 = [[1, 2], [3, 4], [5, 6], [7, 8]]
R1 = [[10, 20], [30, 40], [50, 60], [70, 80]]


def assert_outputs(actual, expected):
    assert len(actual) == len(expected)
    for rank, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if want is None:
            assert got is None, f"rank {rank} should get None"
        else:
            want = np.asarray(want, dtype=got.dtype)
            assert got.shape == want.shape, f"rank {rank}: shape {got.shape} != {want.shape}"
            np.testing.assert_array_equal(got, want, err_msg=f"rank {rank}")


class TestHandComputed:
    def test_all_reduce_each_reduction(self):
        x = ranks_of(R0, R1)
        expected = {
            "sum": [[11, 22], [33, 44], [55, 66], [77, 88]],
            "prod": [[10, 40], [90, 160], [250, 360], [490, 640]],
            "max": R1,
            "min": R0,
            "avg": [[5.5, 11], [16.5, 22], [27.5, 33], [38.5, 44]],
        }
        for reduce, want in expected.items():
            assert_outputs(collective("all_reduce", x, reduce=reduce), [want, want])

    def test_reduce_only_root_gets_output(self):
        x = ranks_of(R0, R1)
        assert_outputs(collective("reduce", x, root=1), [None, [[11, 22], [33, 44], [55, 66], [77, 88]]])

    def test_reduce_scatter(self):
        x = ranks_of(R0, R1)
        assert_outputs(
            collective("reduce_scatter", x, reduce="max"),
            [[[10, 20], [30, 40]], [[50, 60], [70, 80]]],
        )

    def test_broadcast_ignores_non_root_inputs(self):
        x = ranks_of(R0, R1)
        assert_outputs(collective("broadcast", x, root=1), [R1, R1])

    def test_all_gather_and_gather(self):
        x = ranks_of(R0, R1)
        assert_outputs(collective("all_gather", x, reduce="none"), [R0 + R1, R0 + R1])
        assert_outputs(collective("gather", x, root=0), [R0 + R1, None])

    def test_scatter_from_root(self):
        x = ranks_of(R0, R1)
        assert_outputs(collective("scatter", x, root=1), [R1[:2], R1[2:]])

    def test_all_to_all(self):
        x = ranks_of(R0, R1)
        assert_outputs(collective("all_to_all", x), [R0[:2] + R1[:2], R0[2:] + R1[2:]])

    def test_all_to_all_three_ranks(self):
        x = [np.arange(6, dtype=np.int32) + 10 * r for r in range(3)]
        assert_outputs(
            collective("all_to_all", x),
            [[0, 1, 10, 11, 20, 21], [2, 3, 12, 13, 22, 23], [4, 5, 14, 15, 24, 25]],
        )

    def test_outputs_do_not_alias_inputs(self):
        x = ranks_of(R0, R1)
        out = collective("broadcast", x, root=0)
        out[1][0, 0] = -1
        assert x[0][0, 0] == 1 and out[0][0, 0] == 1

    def test_multidimensional_rows_are_contiguous_chunks(self):
        # Dim 0 of size 2 with 2x3 rows: chunk i is the whole row block x[i].
        a = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
        b = -a
        out = collective("reduce_scatter", [a, b], reduce="min")
        np.testing.assert_array_equal(out[0], [[[0, -1, -2], [-3, -4, -5]]])
        np.testing.assert_array_equal(out[1], [[[-6, -7, -8], [-9, -10, -11]]])


class TestGroups:
    def test_reversed_group_orders_gather_and_remaps_root(self):
        x = ranks_of(R0, R1)
        # Group-local rank 0 is world rank 1, so its data comes first and root=0 is local rank 1.
        assert_outputs(collective("gather", x, root=0, groups=[1, 0]), [R1 + R0, None])
        assert_outputs(collective("all_gather", x, groups=[1, 0]), [R1 + R0, R1 + R0])
        # Scatter from world rank 0: group-local rank 0 (world 1) gets the first chunk.
        assert_outputs(collective("scatter", x, root=0, groups=[1, 0]), [R0[2:], R0[:2]])
        assert_outputs(
            collective("reduce_scatter", x, groups=[1, 0]),
            [[[55, 66], [77, 88]], [[11, 22], [33, 44]]],
        )

    def test_subset_group_of_four(self):
        x = [np.full((2, 3), fill, dtype=np.float32) for fill in (1.0, 2.0, 4.0, 8.0)]
        out = collective("all_reduce", x, groups=[0, 2])
        assert out[1] is None and out[3] is None
        np.testing.assert_array_equal(out[0], np.full((2, 3), 5.0))
        np.testing.assert_array_equal(out[2], np.full((2, 3), 5.0))
        out = collective("all_gather", x, groups=[0, 2])
        np.testing.assert_array_equal(out[2], np.concatenate([x[0], x[2]]))
        out = collective("broadcast", x, root=2, groups=[0, 2])
        assert out[1] is None and out[3] is None
        np.testing.assert_array_equal(out[0], x[2])

    def test_one_rank_group_is_identity(self):
        x = [np.arange(6, dtype=np.float32).reshape(3, 2) * (r + 1) for r in range(3)]
        for op in OPERATIONS:
            out = collective(op, x, root=1, groups=[1])
            assert out[0] is None and out[2] is None
            np.testing.assert_array_equal(out[1], x[1], err_msg=op)


class TestDtypes:
    def test_float16_reduces_in_float64(self):
        # 2048 + 1 + 1 = 2050 exactly; summing in float16 pairwise would give 2048 + 1 -> 2048.
        x = [np.array([2048], np.float16), np.array([1], np.float16), np.array([1], np.float16)]
        out = collective("all_reduce", x)
        assert out[0].dtype == np.float16
        assert out[0][0] == 2050

    def test_integer_avg_truncates_toward_zero(self):
        x = [np.array([7, -7, 5], np.int32), np.array([0, 0, 0], np.int32)]
        out = collective("all_reduce", x, reduce="avg")
        np.testing.assert_array_equal(out[0], [3, -3, 2])
        assert out[0].dtype == np.int32

    def test_integer_overflow_wraps(self):
        x = [np.array([200, 100], np.uint8), np.array([100, 3], np.uint8)]
        np.testing.assert_array_equal(collective("all_reduce", x)[0], [44, 103])
        np.testing.assert_array_equal(collective("all_reduce", x, reduce="prod")[0], [32, 44])
        x = [np.array([100], np.int8), np.array([100], np.int8)]
        np.testing.assert_array_equal(collective("all_reduce", x)[0], [-56])
        big = np.iinfo(np.int32).max
        x = [np.array([big], np.int32)] * 3
        # 3 * (2**31 - 1) mod 2**32, read as int32, is 2**31 - 3.
        np.testing.assert_array_equal(collective("all_reduce", x)[0], [2**31 - 3])
        # (2**31-1)**3 overflows float64's exact range; the wrapped int32 product is 2**31 - 1.
        np.testing.assert_array_equal(collective("all_reduce", x, reduce="prod")[0], [big])

    def test_bfloat16_when_available(self):
        ml_dtypes = pytest.importorskip("ml_dtypes")
        x = [np.array([1.5, 2.0], ml_dtypes.bfloat16), np.array([2.5, -4.0], ml_dtypes.bfloat16)]
        out = collective("all_reduce", x, reduce="max")
        assert out[0].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(out[0].astype(np.float32), [2.5, 2.0])

    def test_random_against_independent_computation(self):
        rng = np.random.default_rng(1)
        x = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3)]
        out = collective("reduce_scatter", x, reduce="sum", groups=[2, 0, 1])
        total = (x[0].astype(np.float64) + x[1] + x[2]).astype(np.float32)
        np.testing.assert_array_equal(out[2], total[0:2])
        np.testing.assert_array_equal(out[0], total[2:4])
        np.testing.assert_array_equal(out[1], total[4:6])


class TestErrors:
    def test_unknown_operation_and_reduction(self):
        x = ranks_of(R0, R1)
        # An InvalidArgumentError, a ValueError too.
        with pytest.raises(InvalidArgumentError, match=r"op is 'allreduce' \(did you mean 'all_reduce'\?\)"):
            collective("allreduce", x)
        with pytest.raises(ValueError, match="reduce is 'mean'; it must be one of: sum, prod, max, min, avg$"):
            collective("all_reduce", x, reduce="mean")
        with pytest.raises(ValueError, match="reduce is 'none'; it must be one of"):
            collective("all_reduce", x, reduce="none")
        # Non-reducing operations accept (and ignore) any reduction name, including none.
        collective("all_gather", x, reduce="none")
        collective("all_gather", x, reduce="max")

    def test_root_not_in_group(self):
        x = [np.zeros((4, 2), np.float32) + r for r in range(4)]
        with pytest.raises(ValueError, match=r"root 3 .* not in the group \[0, 2\]"):
            collective("broadcast", x, root=3, groups=[0, 2])
        # Non-rooted operations ignore root, as polygraphy's root=-1 shows.
        collective("all_gather", x, root=-1)

    def test_indivisible_first_dimension(self):
        x = [np.zeros((3, 2), np.float32)] * 2
        for op in ("reduce_scatter", "scatter", "all_to_all"):
            with pytest.raises(ValueError, match="not divisible by 2"):
                collective(op, x)

    def test_shape_dtype_mismatch(self):
        with pytest.raises(ValueError, match="same shape and dtype"):
            collective("all_reduce", [np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float32)])
        with pytest.raises(ValueError, match="same shape and dtype"):
            collective("all_reduce", [np.zeros(2, np.float32), np.zeros(2, np.float16)])

    def test_unsupported_dtype(self):
        with pytest.raises(ValueError, match="unsupported dtype float64"):
            collective("all_reduce", [np.zeros(2), np.zeros(2)])

    def test_bad_groups(self):
        x = [np.zeros((2, 2), np.float32)] * 3
        with pytest.raises(ValueError, match="more than once"):
            collective("all_reduce", x, groups=[0, 0])
        with pytest.raises(ValueError, match="outside the world of 3 ranks"):
            collective("all_reduce", x, groups=[0, 3])
        with pytest.raises(ValueError, match="integer world ranks"):
            collective("all_reduce", x, groups=[0, 1.5])

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="empty"):
            collective("all_reduce", [])
        with pytest.raises(ValueError, match="one array per world rank"):
            collective("all_reduce", np.zeros((2, 2), np.float32))
        with pytest.raises(ValueError, match="at least one dimension"):
            collective("all_gather", [np.ones((), np.float32)] * 2)


# NVIDIA's samples/sampleDistCollective (getTestConfig): each of 2 ranks holds a 3x4 float32
# tensor that is transposed to 4x3, run through the collective along dim 0, and transposed back.
# Inputs and expected outputs below are the sample's vectors, with root 0 and sum for reductions.
_SEQ = [float(i) for i in range(12)]
_SEQ100 = [100.0 + i for i in range(12)]
_ONE_TO_12 = [float(i) for i in range(1, 13)]
_TENS = [10.0 * i for i in range(1, 13)]
_NINES = [99.0] * 12
_SUM = [11.0, 22.0, 33.0, 44.0, 55.0, 66.0, 77.0, 88.0, 99.0, 110.0, 121.0, 132.0]
_GATHERED = [0, 1, 2, 3, 100, 101, 102, 103, 4, 5, 6, 7, 104, 105, 106, 107, 8, 9, 10, 11, 108, 109, 110, 111]

SAMPLE_DIST_COLLECTIVE_CASES = {
    "all_gather": (_SEQ, _SEQ100, _GATHERED, _GATHERED),
    "all_reduce": (_ONE_TO_12, _TENS, _SUM, _SUM),
    "broadcast": (_ONE_TO_12, _NINES, _ONE_TO_12, _ONE_TO_12),
    "reduce": (_ONE_TO_12, _TENS, _SUM, None),
    "reduce_scatter": (_ONE_TO_12, _TENS, [11, 22, 55, 66, 99, 110], [33, 44, 77, 88, 121, 132]),
    "all_to_all": (
        _SEQ,
        _SEQ100,
        [0, 1, 100, 101, 4, 5, 104, 105, 8, 9, 108, 109],
        [2, 3, 102, 103, 6, 7, 106, 107, 10, 11, 110, 111],
    ),
    "gather": (_SEQ, _SEQ100, _GATHERED, None),
    "scatter": (_SEQ, _NINES, [0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]),
}


@pytest.mark.parametrize("op", sorted(SAMPLE_DIST_COLLECTIVE_CASES))
def test_matches_sample_dist_collective(op):
    rank0, rank1, want0, want1 = SAMPLE_DIST_COLLECTIVE_CASES[op]
    transposed = [np.array(v, np.float32).reshape(3, 4).T.copy() for v in (rank0, rank1)]
    outputs = collective(op, transposed, reduce="sum", root=0)
    for rank, (output, want) in enumerate(zip(outputs, (want0, want1), strict=True)):
        if want is None:
            assert output is None, f"{op}: rank {rank}'s output is undefined in the sample"
            continue
        got = output.T.reshape(-1)
        np.testing.assert_array_equal(got, np.array(want, np.float32), err_msg=f"{op} rank {rank}")
