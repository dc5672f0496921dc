"""EngineRunner.infer's fast path for torch CUDA tensors on real GPUs, with native programs
standing in for engines (a copy; a program of two inputs and two outputs): from the second call
of a signature on, calls run on each call's own tensors and streams, shared inputs on one GPU
reach every rank, and a tensor at a kept signature's address but of another shape, dtype, stride
or GPU is never run as if it matched."""

from __future__ import annotations

import numpy as np
import pytest

import mdtrt
from mdtrt import _core

pytestmark = pytest.mark.multi_gpu
torch = pytest.importorskip("torch")


@pytest.fixture
def group(gpu_pair):
    return gpu_pair


def pair_runner(group):
    """Inputs "a", "b"; outputs "b_copy", "a_copy" (copies of b and a)."""
    return mdtrt.EngineRunner(group, program=_core.testing.PairCopyProgram("float32"))


@pytest.mark.parametrize("with_outputs", [False, True], ids=["allocated", "outputs"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_rank", "shared"])
def test_loop_follows_each_calls_tensors_and_streams(group, shared, with_outputs):
    """A loop of infer calls on new tensors (two inputs, two outputs), every other iteration on a
    side stream of both GPUs, the results read on the stream current at the call: each
    iteration's own inputs on every rank (a shared dict's tensors, on GPU 0, copied to GPU 1)."""
    runner = pair_runner(group)
    side = [torch.cuda.Stream(device=r) for r in range(2)]
    rng = np.random.default_rng(11)
    for it in range(6):
        host = [{"a": rng.standard_normal(24).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32)}
                for _ in range(2)]
        if shared:
            host[1] = host[0]
        streams = side if it % 2 else [torch.cuda.current_stream(r) for r in range(2)]
        with torch.cuda.stream(streams[0]), torch.cuda.stream(streams[1]):
            dicts = [{k: torch.from_numpy(v).to(f"cuda:{r}") for k, v in h.items()} for r, h in enumerate(host)]
            inputs = dicts[0] if shared else dicts
            outputs = None
            if with_outputs:
                outputs = {"a_copy": [torch.full((24,), float("nan"), device=f"cuda:{r}") for r in range(2)],
                           "b_copy": [torch.full((40,), float("nan"), device=f"cuda:{r}") for r in range(2)]}
            got = runner.infer(inputs, outputs=outputs, all_ranks=True)
            copies = [{k: t.clone() for k, t in rank.items()} for rank in got]  # on the current streams
            for d in dicts:
                for t in d.values():
                    t.fill_(-1000.0)  # after the call on the same stream: must not change its result
        for r in range(2):
            torch.cuda.synchronize(r)
        for r in range(2):
            assert list(got[r]) == ["b_copy", "a_copy"]  # the program's order
            assert all(t.device.index == r for t in got[r].values())
            if with_outputs:
                assert got[r]["a_copy"] is outputs["a_copy"][r] and got[r]["b_copy"] is outputs["b_copy"][r]
            np.testing.assert_array_equal(copies[r]["a_copy"].cpu().numpy(), host[r]["a"], err_msg=f"it {it} rank {r}")
            np.testing.assert_array_equal(copies[r]["b_copy"].cpu().numpy(), host[r]["b"], err_msg=f"it {it} rank {r}")
    assert len(runner._torch_calls) == 1  # one signature, found again on every later call


def test_shared_input_on_the_second_gpu_reaches_every_rank(group):
    """One dict whose tensor lives on GPU 1: the fast path passes it as the general path does, and
    device-input replication copies it to GPU 0 on every call."""
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("float32"))
    for it in range(4):
        x = torch.arange(1000, device="cuda:1", dtype=torch.float32) * (it + 1)
        outs = runner.infer({"input": x}, all_ranks=True, poison_outputs=True)
        for r in range(2):
            assert outs[r]["output"].device.index == r
            torch.testing.assert_close(outs[r]["output"].cpu(), x.cpu())
        given = [torch.full((1000,), float("nan"), device=f"cuda:{r}") for r in range(2)]
        outs = runner.infer({"input": x}, outputs={"output": given}, all_ranks=True)
        assert all(o["output"] is g for o, g in zip(outs, given, strict=True))
        for g in given:  # GPU 0's copy came from GPU 1: both ranks are checked
            torch.testing.assert_close(g.cpu(), x.cpu())
    assert len(runner._torch_calls) == 2


def test_same_address_other_shape_dtype_stride_or_gpu(group):
    """Tensors at the addresses of a kept signature: another shape runs as what it is; another
    dtype, a non-contiguous view, outputs too small or on the other GPU fail as on a first call,
    and the runner keeps working."""
    runner = pair_runner(group)
    a = [torch.arange(16, dtype=torch.float32, device=f"cuda:{r}") + 100 * r for r in range(2)]
    b = [torch.arange(8, dtype=torch.float32, device=f"cuda:{r}") - 100 * r for r in range(2)]
    outs = {"a_copy": [torch.empty(16, device=f"cuda:{r}") for r in range(2)],
            "b_copy": [torch.empty(8, device=f"cuda:{r}") for r in range(2)]}
    inputs = [{"a": a[r], "b": b[r]} for r in range(2)]
    for _ in range(2):
        runner.infer(inputs, outputs=outs)
        runner.infer(inputs)
    got = runner.infer([{"a": a[r][:4], "b": b[r]} for r in range(2)], all_ranks=True)  # another shape
    assert tuple(got[1]["a_copy"].shape) == (4,)
    torch.testing.assert_close(got[1]["a_copy"].cpu(), a[1][:4].cpu())
    with pytest.raises(mdtrt.InvalidArgumentError, match="dtype"):
        runner.infer([{"a": a[r].view(torch.int32), "b": b[r]} for r in range(2)])
    with pytest.raises(mdtrt.InvalidArgumentError, match="non-contiguous"):
        runner.infer([{"a": a[r].view(4, 4).t(), "b": b[r]} for r in range(2)])
    with pytest.raises(mdtrt.InvalidArgumentError, match="bytes"):
        runner.infer(inputs, outputs={"a_copy": [o[:8] for o in outs["a_copy"]], "b_copy": outs["b_copy"]})
    with pytest.raises(mdtrt.InvalidArgumentError, match="'a_copy' of rank [01] holds 64 bytes on GPU [01]; "
                                                        "this rank needs 64 bytes"):
        runner.infer(inputs, outputs={"a_copy": outs["a_copy"][::-1], "b_copy": outs["b_copy"]})  # other GPUs
    with pytest.raises(mdtrt.InvalidArgumentError, match="mix of host and device"):
        runner.infer([{"a": a[r], "b": b[r].cpu()} for r in range(2)])
    group.synchronize()
    for ts in outs.values():
        for t in ts:
            t.fill_(float("nan"))  # the loop above left the right copies in them: a call that wrote nothing must show
    got = runner.infer(inputs, outputs=outs, all_ranks=True)
    for r in range(2):
        assert got[r]["a_copy"] is outs["a_copy"][r] and got[r]["b_copy"] is outs["b_copy"][r]
        torch.testing.assert_close(outs["a_copy"][r].cpu(), a[r].cpu())
        torch.testing.assert_close(outs["b_copy"][r].cpu(), b[r].cpu())


def test_an_addressed_run_takes_several_inputs_and_outputs(group):
    """The native entry of the fast path with two inputs and two outputs per rank, flat: each
    rank's inputs, then each rank's outputs, in the order of the names it was made with; its plan
    is kept across runs on new arrays, and a null input address is still refused (then it runs on)."""
    runner = pair_runner(group)
    inputs = [{"a": torch.full((6,), 1.0 + r, device=f"cuda:{r}"), "b": torch.full((3,), 10.0 + r, device=f"cuda:{r}")}
              for r in range(2)]
    runner.infer(inputs)
    call = next(iter(runner._calls.values()))
    run = call.addressed(["a_copy", "b_copy"], [24, 12, 24, 12], [0, 0, 1, 1], False)
    rng = np.random.default_rng(5)
    for attempt in range(3):  # new inputs and outputs every run: the kept plan must not keep addresses
        a = [rng.standard_normal(6).astype(np.float32) for _ in range(2)]
        b = [rng.standard_normal(3).astype(np.float32) for _ in range(2)]
        ins = [(torch.from_numpy(a[r]).to(f"cuda:{r}"), torch.from_numpy(b[r]).to(f"cuda:{r}")) for r in range(2)]
        outs = [[torch.full((6,), float("nan"), device=f"cuda:{r}"), torch.full((3,), float("nan"), device=f"cuda:{r}")]
                for r in range(2)]
        pointers = [t.data_ptr() for r in range(2) for t in ins[r]] + [o.data_ptr() for r in range(2) for o in outs[r]]
        if attempt == 1:
            with pytest.raises(mdtrt.InvalidArgumentError, match="null pointer"):
                run([0] + pointers[1:], [1] * 8)
        run(pointers, [1] * 8)
        for r in range(2):
            np.testing.assert_array_equal(outs[r][0].cpu().numpy(), a[r])
            np.testing.assert_array_equal(outs[r][1].cpu().numpy(), b[r])


@pytest.mark.parametrize("entry", ["infer", "prepare"])
def test_outputs_for_one_of_two_outputs_wait_and_return_the_other_pooled(group, entry):
    """torch inputs and outputs= naming one of the program's two outputs: the other comes from
    mdtrt's pool, so each call waits (by default; it is not refused as a stream-ordered call
    would be), writes the given one in place and returns the other as a torch tensor of its own."""
    runner = pair_runner(group)
    a = [torch.randn(24, device=f"cuda:{r}") for r in range(2)]
    b = [torch.randn(40, device=f"cuda:{r}") for r in range(2)]
    given = {"a_copy": [torch.full((24,), float("nan"), device=f"cuda:{r}") for r in range(2)]}
    inputs = [{"a": a[r], "b": b[r]} for r in range(2)]
    call = runner.prepare(inputs, outputs=given, all_ranks=True) if entry == "prepare" else None
    for _ in range(3):
        for t in given["a_copy"]:
            t.fill_(float("nan"))
        got = call() if call else runner.infer(inputs, outputs=given, all_ranks=True)
        for r in range(2):
            assert got[r]["a_copy"] is given["a_copy"][r]
            assert got[r]["b_copy"].device.index == r
            torch.testing.assert_close(got[r]["a_copy"].cpu(), a[r].cpu())
            torch.testing.assert_close(got[r]["b_copy"].cpu(), b[r].cpu())
    with pytest.raises(mdtrt.InvalidArgumentError, match="outputs the caller owns"):
        runner.infer(inputs, outputs=given, stream_ordered=True)
