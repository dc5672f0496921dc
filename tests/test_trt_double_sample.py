"""sample_dist_collective --backend trt with the TensorRT test double as TensorRT: NVIDIA's sample
network (transpose, DistCollective, transpose) built and run through mdtrt's C++ core, every op
checked by the sample against its host reference, in both launch styles."""

from __future__ import annotations

import pytest

import test_sample_dist_collective as sample


def _env(trt_double, **extra):
    return sample._env(MDTRT_TENSORRT_LIBRARY=trt_double, **extra)


@pytest.mark.multi_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_all_ops_thread_per_gpu(trt_double, dtype):
    p = sample._run(["--backend", "trt", "--op", "all", "--gpus", "0,1", "--dtype", dtype], _env(trt_double))
    out = sample._output(p)
    assert p.returncode == 0, out
    assert sample._passed(out) == sample.PASSED_LINES_ALL_OPS_2_RANKS, out
    assert "FAILED" not in out


@pytest.mark.multi_gpu
def test_all_ops_process_per_rank(trt_double, tmp_path, monkeypatch):
    monkeypatch.setenv("MDTRT_TENSORRT_LIBRARY", trt_double)  # _run_process_per_rank builds its env from os.environ
    results = sample._run_process_per_rank(tmp_path, ["--backend", "trt", "--op", "all"])
    for rc, out in results:
        assert rc == 0, out
        assert "FAILED" not in out
    assert sum(sample._passed(out) for _, out in results) == sample.PASSED_LINES_ALL_OPS_2_RANKS


@pytest.mark.multi_gpu
def test_reversed_groups_and_root_one(trt_double):
    p = sample._run(["--backend", "trt", "--op", "all", "--gpus", "0,1", "--groups", "1,0", "--root", "1"], _env(trt_double))
    out = sample._output(p)
    assert p.returncode == 0, out
    assert sample._passed(out) == sample.PASSED_LINES_ALL_OPS_2_RANKS, out
