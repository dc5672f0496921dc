"""Link kinds between GPUs (NVLink, PCIe, none, unknown) from NVML, with fake NVML libraries built
here, and the replication="auto" rule that depends on them.

Each NVML scenario runs in a fresh subprocess because NVML is opened and initialized once per
process. The fake names GPUs by the bus number of their PCI bus id and answers the NVLink P2P
query from a table compiled into it; it logs init/shutdown calls to the file in FAKE_NVML_LOG.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mdtrt
from fakelib import CC, compile_shared_object
from mdtrt import _core

needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler to build fake NVML libraries")

# NVML's ABI (nvml.h; the values mdtrt declares in csrc/runtime/gpu_links.cpp, read from NVIDIA's
# NCCL src/include/nvmlwrap.h): what a real NVML answers, so the fake answers the same.
NVML_SUCCESS, NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_NOT_FOUND, NVML_ERROR_DRIVER_NOT_LOADED = 0, 2, 6, 9
NVML_ERROR_UNKNOWN = 999
NVML_P2P_CAPS_INDEX_NVLINK = 2
NVML_P2P_STATUS_OK, NVML_P2P_STATUS_NOT_SUPPORTED = 0, 5

ERROR_STRINGS = {NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded", NVML_ERROR_NOT_FOUND: "Not Found",
                 NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument", NVML_ERROR_UNKNOWN: "Unknown Error"}


def build_fake_nvml(directory, nvlink_pairs=(), init_result=NVML_SUCCESS, failing_pairs=(), omit=None,
                    soname="libnvidia-ml.so.1") -> str:
    """A shared object exporting the NVML entry points mdtrt resolves. Devices are the PCI bus
    numbers 1..8; ``nvlink_pairs`` (bus numbers, either order) report NVLink P2P status OK, other
    pairs NOT_SUPPORTED; ``failing_pairs`` make nvmlDeviceGetP2PStatus fail (NVML_ERROR_UNKNOWN)."""

    def pair_test(pairs):
        terms = [f"(a == {x} && b == {y}) || (a == {y} && b == {x})" for x, y in pairs]
        return " || ".join(terms) or "0"

    error_cases = " ".join(f'case {code}: return "{text}";' for code, text in ERROR_STRINGS.items())
    functions = {
        "nvmlInit_v2": [f"int nvmlInit_v2(void) {{ log_call(\"init\"); return {init_result}; }}"],
        "nvmlShutdown": ['int nvmlShutdown(void) { log_call("shutdown"); return 0; }'],
        "nvmlErrorString": [f"const char* nvmlErrorString(int r) {{ switch (r) {{ {error_cases} }} return \"?\"; }}"],
        "nvmlDeviceGetHandleByPciBusId_v2": [
            "int nvmlDeviceGetHandleByPciBusId_v2(const char* id, void** device) {",
            "  unsigned domain, bus, dev, fn;",
            "  if (sscanf(id, \"%x:%x:%x.%x\", &domain, &bus, &dev, &fn) != 4) return 2;",
            "  if (bus < 1 || bus > 8) return 6;",
            "  *device = (void*)(uintptr_t)bus;",
            "  return 0;",
            "}"],
        "nvmlDeviceGetP2PStatus": [
            "int nvmlDeviceGetP2PStatus(void* d1, void* d2, int index, int* status) {",
            "  uintptr_t a = (uintptr_t)d1, b = (uintptr_t)d2;",
            f"  if (index != {NVML_P2P_CAPS_INDEX_NVLINK}) return {NVML_ERROR_INVALID_ARGUMENT};",
            f"  if ({pair_test(failing_pairs)}) return {NVML_ERROR_UNKNOWN};",
            f"  *status = ({pair_test(nvlink_pairs)}) ? {NVML_P2P_STATUS_OK} : {NVML_P2P_STATUS_NOT_SUPPORTED};",
            "  return 0;",
            "}"],
    }
    lines = ["#include <stdint.h>", "#include <stdio.h>", "#include <stdlib.h>",
             "static void log_call(const char* what) {",
             "  const char* path = getenv(\"FAKE_NVML_LOG\");",
             "  if (!path) return;",
             "  FILE* f = fopen(path, \"a\"); if (f) { fprintf(f, \"%s\\n\", what); fclose(f); }",
             "}"]
    for name, body in functions.items():
        if name != omit:
            lines += body
    return compile_shared_object(directory, soname, lines)


PROBE = textwrap.dedent(
    """
    import json, sys, threading
    from mdtrt import _core
    bus_ids, peer_access, threads = json.loads(sys.argv[1])
    results = [None] * threads
    def classify(i):
        results[i] = _core.testing.classify_peer_links(bus_ids, peer_access)
    workers = [threading.Thread(target=classify, args=(i,)) for i in range(threads)]
    for w in workers: w.start()
    for w in workers: w.join()
    status = dict(_core.nvml_status())
    print(json.dumps({"links": [list(r[0]) for r in results], "reasons": [r[1] for r in results], "nvml": status}))
    """
)

BUS_IDS = ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0"]
ALL_PEER = [[True] * 3 for _ in range(3)]


def probe(bus_ids=BUS_IDS, peer_access=ALL_PEER, env_library=None, ld_library_path=(), log=None, threads=1) -> dict:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", LD_LIBRARY_PATH=os.pathsep.join(str(p) for p in ld_library_path))
    env.pop("MDTRT_NVML_LIBRARY", None)
    env.pop("FAKE_NVML_LOG", None)
    if env_library is not None:
        env["MDTRT_NVML_LIBRARY"] = str(env_library)
    if log is not None:
        env["FAKE_NVML_LOG"] = str(log)
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps([bus_ids, peer_access, threads])],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(links == result["links"][0] for links in result["links"]), result  # every thread saw the same
    result["links"], result["reason"] = result["links"][0], result["reasons"][0]
    return result


def expected_links(peer_access, kind_of_peer_pair):
    """The n x n table the classification must give: the diagonal "self", no peer access "none",
    else what ``kind_of_peer_pair(a, b)`` says."""
    n = len(peer_access)
    return [["self" if a == b else "none" if not peer_access[a][b] else kind_of_peer_pair(a, b) for b in range(n)]
            for a in range(n)]


def bus_number(bus_id: str) -> int:
    return int(bus_id.split(":")[1], 16)


@needs_cc
def test_nvlink_pairs_are_nvlink_and_nvml_starts_once_and_shuts_down(tmp_path):
    pairs = [(1, 2), (2, 3), (1, 3)]
    lib = build_fake_nvml(tmp_path, nvlink_pairs=pairs)
    log = tmp_path / "calls.log"
    r = probe(env_library=lib, log=log, threads=8)
    assert r["nvml"]["available"] and r["nvml"]["found_by"] == "MDTRT_NVML_LIBRARY" and r["nvml"]["path"] == lib
    assert r["nvml"]["error"] == "" and r["reason"] == ""
    assert r["links"] == expected_links(ALL_PEER, lambda a, b: "nvlink")
    # Eight threads classified at once: NVML was initialized once and shut down once, at exit.
    assert log.read_text().split() == ["init", "shutdown"]


@needs_cc
def test_found_through_the_loader_by_its_driver_name(tmp_path):
    lib = build_fake_nvml(tmp_path, nvlink_pairs=[(1, 2)])
    r = probe(bus_ids=BUS_IDS[:2], peer_access=[[True, True], [True, True]], ld_library_path=[tmp_path])
    assert (r["nvml"]["available"], r["nvml"]["found_by"], r["nvml"]["path"]) == (True, "libnvidia-ml.so.1", lib)
    assert r["links"] == [["self", "nvlink"], ["nvlink", "self"]]


@needs_cc
def test_p2p_status_not_ok_is_pcie_and_no_peer_access_is_none(tmp_path):
    # GPUs on buses 1 and 3 are joined by NVLink; 1-2 have peer access without it; 2-3 have none.
    lib = build_fake_nvml(tmp_path, nvlink_pairs=[(1, 3)])
    peer = [[True, True, True], [True, True, False], [True, False, True]]
    r = probe(peer_access=peer, env_library=lib)
    nvlinked = {(1, 3), (3, 1)}
    want = expected_links(peer, lambda a, b: "nvlink" if (bus_number(BUS_IDS[a]), bus_number(BUS_IDS[b])) in nvlinked
                          else "pcie")
    assert r["links"] == want and r["reason"] == ""
    assert want[0][1] == "pcie" and want[1][2] == "none" and want[0][2] == "nvlink"  # every kind is covered


@needs_cc
def test_no_peer_access_anywhere_does_not_open_nvml(tmp_path):
    lib = build_fake_nvml(tmp_path, nvlink_pairs=[(1, 2)])
    log = tmp_path / "calls.log"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", MDTRT_NVML_LIBRARY=lib, FAKE_NVML_LOG=str(log))
    code = ("import json; from mdtrt import _core; "
            "print(json.dumps(_core.testing.classify_peer_links(%r, [[True, False], [False, True]])))" % BUS_IDS[:2])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[["self", "none"], ["none", "self"]], ""]
    assert not log.exists()  # nvmlInit_v2 was never called


def test_missing_nvml_leaves_links_unknown_with_the_reason(tmp_path):
    missing = tmp_path / "nope" / "libnvidia-ml.so.1"
    peer = [[True, True, False], [True, True, True], [False, True, True]]
    r = probe(peer_access=peer, env_library=missing)
    assert not r["nvml"]["available"]
    assert "MDTRT_NVML_LIBRARY" in r["nvml"]["error"] and str(missing) in r["nvml"]["error"]
    assert r["links"] == expected_links(peer, lambda a, b: "unknown")
    assert r["reason"].startswith("NVML is unavailable: ") and str(missing) in r["reason"]


def test_nvml_not_installed_names_the_driver_library():
    r = probe(ld_library_path=[])
    if r["nvml"]["available"]:
        pytest.skip(f"this machine has NVML ({r['nvml']['path']}): the loader rightly finds it")
    assert "libnvidia-ml.so.1" in r["nvml"]["error"] and "NVIDIA driver" in r["nvml"]["error"]
    assert r["links"] == expected_links(ALL_PEER, lambda a, b: "unknown")
    assert r["nvml"]["error"] in r["reason"]


@needs_cc
def test_failing_nvml_init_leaves_links_unknown_with_nvml_error_string(tmp_path):
    lib = build_fake_nvml(tmp_path, nvlink_pairs=[(1, 2), (2, 3), (1, 3)], init_result=NVML_ERROR_DRIVER_NOT_LOADED)
    log = tmp_path / "calls.log"
    r = probe(env_library=lib, log=log)
    assert not r["nvml"]["available"]
    assert r["nvml"]["error"] == f"nvmlInit_v2 failed: Driver Not Loaded (code {NVML_ERROR_DRIVER_NOT_LOADED})"
    assert r["links"] == expected_links(ALL_PEER, lambda a, b: "unknown")
    assert r["nvml"]["error"] in r["reason"]
    assert log.read_text().split() == ["init"]  # no shutdown of an NVML that did not start


@needs_cc
def test_missing_entry_point_is_named(tmp_path):
    lib = build_fake_nvml(tmp_path, nvlink_pairs=[(1, 2)], omit="nvmlDeviceGetP2PStatus")
    r = probe(bus_ids=BUS_IDS[:2], peer_access=[[True, True], [True, True]], env_library=lib)
    assert not r["nvml"]["available"] and "missing symbol nvmlDeviceGetP2PStatus" in r["nvml"]["error"]
    assert r["links"] == [["self", "unknown"], ["unknown", "self"]]


@needs_cc
def test_query_errors_leave_only_their_pairs_unknown(tmp_path):
    # Bus 9 is no GPU NVML knows (NOT_FOUND); the 1-2 query fails; 1-3 is NVLink.
    lib = build_fake_nvml(tmp_path, nvlink_pairs=[(1, 3)], failing_pairs=[(1, 2)])
    bus_ids = BUS_IDS + ["0000:09:00.0"]
    peer = [[True] * 4 for _ in range(4)]
    r = probe(bus_ids=bus_ids, peer_access=peer, env_library=lib)
    assert r["nvml"]["available"]

    def kind(a, b):
        pair = {bus_number(bus_ids[a]), bus_number(bus_ids[b])}
        return "unknown" if 9 in pair or pair == {1, 2} else "nvlink" if pair == {1, 3} else "pcie"

    assert r["links"] == expected_links(peer, kind)
    assert "nvmlDeviceGetHandleByPciBusId_v2(0000:09:00.0) failed: Not Found" in r["reason"]
    assert "nvmlDeviceGetP2PStatus(0000:01:00.0, 0000:02:00.0, NVLINK) failed: Unknown Error" in r["reason"]


def test_peer_access_must_match_the_gpus():
    with pytest.raises(mdtrt.InvalidArgumentError, match="peer_access has 1 rows for 2 GPUs"):
        _core.testing.classify_peer_links(BUS_IDS[:2], [[True, True]])
    with pytest.raises(mdtrt.InvalidArgumentError, match="peer_access row 1 has 1 entries for 2 GPUs"):
        _core.testing.classify_peer_links(BUS_IDS[:2], [[True, True], [True]])


# -- replication="auto" ---------------------------------------------------------------------------

MIB = 1 << 20
SIZES = [0, 1024, 16 * MIB - 1, 16 * MIB, 64 * MIB, 1 << 30]


@pytest.mark.parametrize("requested", _core.replication_modes())
def test_choose_replication_decision_table(requested):
    """auto: peer copies only for pageable inputs of 16 MiB or more when every GPU pair is NVLink
    (the only setting where they were measured faster, BENCHMARKS.md), host copies otherwise; an
    explicit mode is kept as given; CUDA is asked about pageability only where it can change the
    choice. Every combination of pinned/pageable, size around the threshold, NVLink or not."""
    seen = set()
    for nbytes, all_nvlink, pageable in itertools.product(SIZES, [True, False], [True, False]):
        mode, asked = _core.testing.choose_replication(requested, nbytes, all_nvlink, pageable)
        if requested != "auto":
            assert (mode, asked) == (requested, False)
            continue
        large = nbytes >= 16 * MIB
        want = "peer" if (pageable and large and all_nvlink) else "host"
        assert mode == want, (nbytes, all_nvlink, pageable)
        assert asked == (large and all_nvlink), (nbytes, all_nvlink, pageable)
        seen.add(mode)
    if requested == "auto":
        assert seen == {"host", "peer"}  # the table reached both outcomes


def test_auto_on_pcie_or_unknown_links_never_takes_peer_copies():
    """The case this rule exists for: on links that are not all NVLink (PCIe-only boxes, or NVML
    unavailable), even a 1 GiB pageable input goes through host copies."""
    for nbytes in np.geomspace(16 * MIB, 1 << 32, 6).astype(int):
        assert _core.testing.choose_replication("auto", int(nbytes), False, True) == ("host", False)
