"""DeviceGroup.peer_links on real GPUs: what NVML says about each pair, checked against CUDA's peer
access and, where nvidia-smi is installed, against its own NVLink P2P report; and the
replication="auto" choice that follows from it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import mdtrt
from mdtrt import _core


@pytest.mark.gpu
def test_one_gpu_has_only_itself():
    with mdtrt.DeviceGroup([0], timeout=60) as group:
        assert group.peer_links == [["self"]]
        assert group.peer_links_reason == ""


@pytest.mark.multi_gpu
def test_pair_links_agree_with_cuda_peer_access_and_doctor(gpu_pair):
    nvml = _core.nvml_status()
    assert nvml["available"], f"every NVIDIA driver installs libnvidia-ml.so.1: {nvml['error']}"
    links, access = gpu_pair.peer_links, gpu_pair.peer_access
    assert gpu_pair.peer_links_reason == ""
    for a in range(2):
        for b in range(2):
            if a == b:
                assert links[a][b] == "self"
            elif not access[a][b]:
                assert links[a][b] == "none", (a, b)
            else:
                assert links[a][b] in ("nvlink", "pcie"), (a, b, links)
    assert links[0][1] == links[1][0]  # NVLink and PCIe both join the two ways
    # The doctor's view (query_cuda, over every visible GPU: GPUs 0 and 1 are the group's).
    cuda = _core.query_cuda()
    assert [row[:2] for row in cuda["peer_links"][:2]] == links
    assert cuda["peer_links_reason"] == ""


def _bus(bus_id: str) -> tuple[int, ...]:
    """A PCI bus id as numbers: CUDA writes a 4-digit domain, nvidia-smi an 8-digit one."""
    domain, bus, rest = bus_id.strip().lower().split(":")
    device, function = rest.split(".")
    return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)


def _nvidia_smi_nvlink(bus_ids: list[str]) -> bool | None:
    """nvidia-smi's NVLink P2P status between the GPUs at these bus ids ("OK" for every pair), or
    None when nvidia-smi is not there or its output is not the matrix expected."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    index_of = {}
    listing = subprocess.run([smi, "--query-gpu=index,pci.bus_id", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, env=env)
    for line in listing.stdout.splitlines():
        if "," in line:
            index, bus_id = line.split(",", 1)
            index_of[_bus(bus_id)] = int(index)
    matrix = subprocess.run([smi, "topo", "-p2p", "n"], capture_output=True, text=True, timeout=60, env=env)
    rows = {}
    for line in matrix.stdout.splitlines():
        cells = line.split()
        # A row is "GPUi" and its cells; the header names the columns (GPU0 GPU1 ...) only.
        if len(cells) > 1 and re.fullmatch(r"GPU\d+", cells[0]) and not all(re.fullmatch(r"GPU\d+", c) for c in cells):
            rows[int(cells[0][3:])] = cells[1:]
    try:
        ids = [index_of[_bus(b)] for b in bus_ids]
        return all(rows[a][b] == "OK" for a in ids for b in ids if a != b)
    except (KeyError, IndexError, ValueError):
        return None


@pytest.mark.multi_gpu
def test_nvlink_matches_nvidia_smi_and_h200_pairs_are_nvlink(gpu_pair):
    gpus = _core.query_cuda()["gpus"][:2]
    nvlink = gpu_pair.peer_links[0][1] == "nvlink"
    smi = _nvidia_smi_nvlink([g["pci_bus_id"] for g in gpus])
    if smi is not None:
        assert nvlink == smi, (gpu_pair.peer_links, "nvidia-smi topo -p2p n says", smi)
    if not all("H200" in g["name"] for g in gpus):
        pytest.skip(f"GPUs {[g['name'] for g in gpus]}: the NVLink expectation is for the 2x H200 machine")
    assert gpu_pair.peer_links == [["self", "nvlink"], ["nvlink", "self"]]


@pytest.mark.multi_gpu
def test_auto_replication_of_a_16_mib_pageable_numpy_input_follows_the_links(gpu_pair):
    """A pageable host input (numpy) of exactly 16 MiB under replication="auto" goes through peer
    copies when the pair is NVLink, host copies otherwise; one byte less always through host copies.
    Every rank gets the data either way (all_gather of random data, poisoned outputs)."""
    n = len(gpu_pair)
    program = _core.CollectiveProgram("all_gather", "none", 0, [], "float32", gpu_pair.world_size, n)
    runner = mdtrt.EngineRunner(gpu_pair, program=program)
    rng = np.random.default_rng(1616)
    nvlink = all(gpu_pair.peer_links[a][b] == "nvlink" for a in range(n) for b in range(n) if a != b)
    for elements, want in (((16 << 20) // 4, "peer" if nvlink else "host"), ((16 << 20) // 4 - 1, "host")):
        x = rng.standard_normal(elements).astype(np.float32)
        assert _core.pointer_device(x.ctypes.data) == -1  # host memory, not registered with CUDA
        outs = runner.infer({"input": x}, all_ranks=True, poison_outputs=True, replication="auto")
        assert len(outs) == n
        for rank, out in enumerate(outs):
            np.testing.assert_array_equal(out["output"], np.tile(x, n), err_msg=f"rank {rank}, {x.nbytes} bytes")
        assert runner.last_replication == want, (x.nbytes, gpu_pair.peer_links)


NVML_MISSING_PROBE = """
import json, sys
import numpy as np
import mdtrt
from mdtrt import _core
with mdtrt.DeviceGroup([0, 1], timeout=60) as g:
    xs = [np.full(1024, r + 1, np.float32) for r in range(2)]
    summed = g.all_reduce(xs)
    program = _core.CollectiveProgram("all_gather", "none", 0, [], "float32", g.world_size, 2)
    runner = mdtrt.EngineRunner(g, program=program)
    big = np.random.default_rng(3).standard_normal(4 << 20).astype(np.float32)  # 16 MiB, pageable
    gathered = runner.infer({"input": big})["output"]
    print(json.dumps({"links": g.peer_links, "reason": g.peer_links_reason, "access": g.peer_access,
                      "summed": all(np.array_equal(s, np.full(1024, 3, np.float32)) for s in summed),
                      "gathered": bool(np.array_equal(gathered, np.concatenate([big, big]))),
                      "replication": runner.last_replication}))
"""


@pytest.mark.multi_gpu
def test_a_missing_mdtrt_nvml_library_leaves_links_unknown_and_groups_working(tmp_path):
    """MDTRT_NVML_LIBRARY pointing at a file that is not there (a typo, another machine's path): the
    group still works, its peer links are "unknown" with the reason naming the variable and the
    path, replication="auto" copies from host, and the doctor says why on its NVML line."""
    import json
    import sys

    missing = str(tmp_path / "libnvidia-ml.so.1")
    env = dict(os.environ, MDTRT_NVML_LIBRARY=missing, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-c", NVML_MISSING_PROBE], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["summed"] and r["gathered"], r
    assert r["replication"] == "host", r
    for a in range(2):
        for b in range(2):
            want = "self" if a == b else "unknown" if r["access"][a][b] else "none"
            assert r["links"][a][b] == want, (a, b, r)
    if r["access"][0][1]:
        assert "MDTRT_NVML_LIBRARY" in r["reason"] and missing in r["reason"], r
        doctor = subprocess.run([sys.executable, "-m", "mdtrt", "doctor"], capture_output=True, text=True,
                                timeout=120, env=env)
        lines = [line for line in doctor.stdout.splitlines() if "NVML unavailable" in line]
        assert len(lines) == 1 and "MDTRT_NVML_LIBRARY" in lines[0] and missing in lines[0], doctor.stdout
