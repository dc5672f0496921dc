"""One process per GPU, NVIDIA-sample style (TRT_MY_RANK, TRT_WORLD_SIZE, TRT_NCCL_ID_FILE)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from mdtrt import _core

pytestmark = pytest.mark.multi_gpu

WORKER = textwrap.dedent(
    """
    import sys, numpy as np, mdtrt
    try:
        with mdtrt.DeviceGroup.from_env(timeout=float(sys.argv[1])) as group:
            rank, world = group.ranks[0], group.world_size
            rng = np.random.default_rng(1234)
            data = rng.standard_normal((world, 2 * world, 8)).astype(np.float32)
            out = group.all_reduce(data[rank])[0]
            np.testing.assert_allclose(out, data.sum(0), rtol=1e-5, atol=1e-5)
            gathered = group.all_gather(data[rank])[0]
            np.testing.assert_array_equal(gathered, np.concatenate(list(data)))
            scattered = group.scatter(data[rank], root=world - 1)[0]
            chunk = data[world - 1].shape[0] // world
            np.testing.assert_array_equal(scattered, data[world - 1][rank * chunk:(rank + 1) * chunk])
            print(f"rank {rank} OK", flush=True)
    except mdtrt.RankTimeoutError as e:
        print(f"TIMEOUT {e}", flush=True)
        sys.exit(3)
    """
)


def launch(rank, world, id_file, timeout):
    env = dict(os.environ, TRT_MY_RANK=str(rank), TRT_WORLD_SIZE=str(world), TRT_NCCL_ID_FILE=str(id_file),
               NCCL_NVLS_ENABLE="0")
    return subprocess.Popen([sys.executable, "-c", WORKER, str(timeout)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_processes_exchange_the_id_through_a_file(tmp_path):
    world = min(_core.visible_gpu_count(), 4)
    id_file = tmp_path / "nccl_id"
    procs = [launch(r, world, id_file, 60) for r in range(world)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"rank {r} OK" in out


def test_rank_that_never_arrives_times_out_and_exits_cleanly(tmp_path):
    id_file = tmp_path / "nccl_id"
    start = time.monotonic()
    proc = launch(0, 2, id_file, 5)  # rank 1 is never started
    out = proc.communicate(timeout=60)[0]
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, out
    assert "TIMEOUT" in out and "rank(s) 0 of 2" in out, out
    assert elapsed < 30, f"took {elapsed:.1f} s for a 5 s deadline"


def test_waiting_rank_without_rank0_times_out(tmp_path):
    proc = launch(1, 2, tmp_path / "nccl_id", 2)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 3, out
    assert "did not publish the NCCL id" in out


def test_one_visible_gpu_per_process(tmp_path):
    # A per-rank CUDA_VISIBLE_DEVICES (SLURM's --gpus-per-task=1): every rank runs on its device 0.
    id_file = tmp_path / "nccl_id"
    procs = []
    for r in range(2):
        env = dict(os.environ, TRT_MY_RANK=str(r), TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE=str(id_file),
                   CUDA_VISIBLE_DEVICES=str(r), NCCL_NVLS_ENABLE="0")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, "60"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"rank {r} OK" in out
    assert not id_file.exists(), "rank 0 leaves no id file behind once every rank joined"


def test_impossible_gpu_layout_fails_fast_on_every_rank(tmp_path):
    # Three ranks on this host, each seeing the same two GPUs: no rank may wait for the others.
    script = "import mdtrt\nmdtrt.DeviceGroup.from_env(timeout=60)"
    start = time.monotonic()
    procs = []
    for r in range(3):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="3",
                   TRT_NCCL_ID_FILE=str(tmp_path / "nccl_id"), CUDA_VISIBLE_DEVICES="0,1", NCCL_NVLS_ENABLE="0")
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert time.monotonic() - start < 30
    for p, out in zip(procs, outs):
        assert p.returncode != 0 and "starts 3 ranks on this host but this process sees 2" in out, out


def test_stale_id_file_of_an_earlier_run_is_never_joined(tmp_path):
    # An earlier run's rank 0 left its file; this run's rank 1 starts first, rank 0 a second later.
    id_file = tmp_path / "nccl_id"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    id_file.write_text("ab" * 128 + f"\nrun= host={socket.gethostname()} pid={int(dead.stdout)} start=1\n")
    rank1 = launch(1, 2, id_file, 60)
    time.sleep(1.0)
    rank0 = launch(0, 2, id_file, 60)
    for r, p in ((0, rank0), (1, rank1)):
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
        assert f"rank {r} OK" in out
    assert not id_file.exists()


TORCH_APP = textwrap.dedent(
    """
    import os, sys, numpy as np, torch, torch.distributed as dist, mdtrt
    order = sys.argv[1]
    local = int(os.environ["LOCAL_RANK"])
    if order == "app-first":
        dist.init_process_group("nccl")  # as many scripts do: no torch.cuda.set_device
    group = mdtrt.DeviceGroup.from_env(timeout=60)
    rank, world = group.ranks[0], group.world_size
    data = np.random.default_rng(5).standard_normal((world, 16)).astype(np.float32)
    np.testing.assert_allclose(group.all_reduce(data[rank])[0], data.sum(0), rtol=1e-5, atol=1e-5)
    if order == "mdtrt-first":
        assert not dist.is_initialized(), "mdtrt left a default process group behind"
        dist.init_process_group("nccl")
    # The application's own group still works, on its own devices.
    t = torch.full((4,), float(rank + 1), device=f"cuda:{local}")
    dist.all_reduce(t)
    assert t.tolist() == [world * (world + 1) / 2] * 4, t
    group.close()
    dist.destroy_process_group()
    print(f"rank {rank} OK", flush=True)
    """
)


@pytest.mark.parametrize("order", ["app-first", "mdtrt-first"])
@pytest.mark.parametrize("launcher", ["torchrun", "env"])
def test_torch_distributed_application_is_left_alone(tmp_path, order, launcher):
    pytest.importorskip("torch")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "app.py"
    script.write_text(TORCH_APP)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    env.pop("TRT_NCCL_ID_FILE", None)
    if launcher == "torchrun":  # torchrun's agent store carries the id
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                   "--master-port", str(port), str(script), order], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    else:  # torchrun's variables set by hand, no agent store
        procs = [subprocess.Popen([sys.executable, str(script), order],
                                  env=dict(env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = "".join(p.communicate(timeout=180)[0] for p in procs)
    assert all(p.returncode == 0 for p in procs), outs
    assert "rank 0 OK" in outs and "rank 1 OK" in outs, outs


def test_relative_id_file_from_one_folder_still_works(tmp_path):
    """NVIDIA's sample lines give a bare file name (TRT_NCCL_ID_FILE=nccl_id.txt): the id file
    path check (its folder '.') must let it through when every rank starts in the same folder."""
    procs = []
    for r in range(2):
        env = dict(os.environ, TRT_MY_RANK=str(r), TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE="nccl_id.txt",
                   NCCL_NVLS_ENABLE="0")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, "60"], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"rank {r} OK" in out
    assert not (tmp_path / "nccl_id.txt").exists()  # rank 0 removed its file once both joined
