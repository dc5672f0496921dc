"""`python -m mdtrt doctor` runs on any machine and exits as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import mdtrt
from mdtrt import _core


def run_doctor(*args):
    return subprocess.run([sys.executable, "-m", "mdtrt", "doctor", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_doctor_json_matches_this_machine():
    out = run_doctor("--json")
    assert "Traceback" not in out.stderr
    report = json.loads(out.stdout)
    gpus = _core.visible_gpu_count()
    assert len(report["cuda"]["gpus"]) == gpus
    # Compared with a fresh process: in this one another library (torch) may have loaded its NCCL first.
    fresh = subprocess.run([sys.executable, "-c", "import mdtrt; print(mdtrt.nccl_library().version)"],
                           capture_output=True, text=True, timeout=60)
    assert report["nccl"]["found"] and report["nccl"]["version"] == fresh.stdout.strip()
    assert report["tensorrt"]["compiled_in"] == mdtrt.build_info()["tensorrt_backend"]
    assert out.returncode == (0 if report["can_run_multi_device"] else 1)
    if gpus < 2:
        assert not report["can_run_multi_device"]
        assert any("GPU" in r for r in report["reasons"])


def test_doctor_text_report():
    out = run_doctor()
    assert "Traceback" not in out.stderr
    assert "NCCL" in out.stdout and "GPUs" in out.stdout and "TensorRT" in out.stdout
    if _core.visible_gpu_count() < 2:
        assert out.returncode == 1
        assert "cannot run multi-device inference" in out.stdout


def test_no_command_prints_the_help_with_the_commands():
    out = subprocess.run([sys.executable, "-m", "mdtrt"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith("usage: python -m mdtrt [-h] {doctor,attention} ...")
    assert "  doctor " in out.stderr and "  attention " in out.stderr and "required" not in out.stderr, out.stderr


def test_doctor_rejects_unknown_option():
    out = run_doctor("--bogus")
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr
    assert "usage: python -m mdtrt doctor [-h] [--json]" in out.stderr  # doctor's own usage


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_doctor_into_a_closed_pipe_ends_without_a_traceback(args):
    # `python -m mdtrt doctor --json | head -5`: the reader is gone before the report is written
    # (closed here before the doctor has even imported mdtrt), so every write fails with EPIPE.
    proc = subprocess.Popen([sys.executable, "-m", "mdtrt", "doctor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr  # 128 + SIGPIPE, as a shell reports a writer killed by it
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_build_info_fields():
    info = mdtrt.build_info()
    assert info["version"] == mdtrt.__version__
    assert info["cuda_version"] >= 12000
    assert isinstance(info["tensorrt_backend"], bool) and info["tensorrt_reason"]


def _keys(report: dict) -> dict:
    """Top-level keys and the keys of every section."""
    return {name: sorted(value) if isinstance(value, dict) else None for name, value in report.items()} | {
        "": sorted(report)}


def test_json_keys_are_the_same_whether_nccl_is_found_or_not(tmp_path):
    found = json.loads(run_doctor("--json").stdout)
    broken = subprocess.run([sys.executable, "-m", "mdtrt", "doctor", "--json"], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, MDTRT_NCCL_LIBRARY=str(tmp_path / "libnccl.so.2")))
    missing = json.loads(broken.stdout)
    assert found["nccl"]["found"] and not missing["nccl"]["found"]
    assert _keys(found) == _keys(missing)
    assert sorted(found["features"]["dist_collective"]) == sorted(missing["features"]["dist_collective"])


def test_broken_env_library_gets_advice_that_fits(tmp_path):
    bad = tmp_path / "libnccl.so.2"
    out = subprocess.run([sys.executable, "-m", "mdtrt", "doctor"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, MDTRT_NCCL_LIBRARY=str(bad)))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    reasons = out.stdout.split("cannot run multi-device inference:")[1]
    assert f"MDTRT_NCCL_LIBRARY={bad} could not be used" in reasons and "unset it" in reasons
    assert "pip install nvidia-nccl-cu13" not in reasons  # it is installed; the variable is what is wrong


def test_found_in_a_package_folder_names_the_package():
    report = json.loads(run_doctor("--json").stdout)
    nccl = report["nccl"]
    if nccl["found_by"] != "extra directory":
        pytest.skip(f"NCCL found by {nccl['found_by']} here, not in a package's folder")
    assert nccl["package"] in ("nvidia-nccl-cu13", "nvidia-nccl-cu12")
    text = run_doctor().stdout
    assert f"found in the {nccl['package']} package's folder {os.path.dirname(nccl['path'])}" in text
    assert any(c["path"] == nccl["path"] and c["version"] == nccl["version"] for c in nccl["loaded_copies"])


def _no_driver():
    return {"driver_version": 0, "runtime_version": 13000, "gpus": [], "peer_access": [],
            "error": "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"}


def test_no_driver_at_all_is_said_in_words(monkeypatch):
    from mdtrt import doctor

    monkeypatch.setattr(doctor._core, "query_cuda", _no_driver)
    report = doctor.collect()
    text = doctor.format_text(report)
    assert "no NVIDIA driver was found" in text and "insufficient" not in text
    # What still works on such a machine is said too.
    assert "mdtrt.simulate" in text and "attention --mode cpu" in text
    assert any(r.startswith("no CUDA GPU is visible: no NVIDIA driver was found") for r in report["reasons"])
    # A driver that is there but too old keeps its own reason.
    old = dict(_no_driver(), driver_version=12020)
    monkeypatch.setattr(doctor._core, "query_cuda", lambda: old)
    assert "older than the CUDA 13.0 runtime" in doctor.format_text(doctor.collect())


def test_missing_library_attempts_are_listed_once_in_text_and_json(tmp_path):
    missing = tmp_path / "libnccl.so.2"
    env = dict(os.environ, MDTRT_NCCL_LIBRARY=str(missing), MDTRT_TENSORRT_LIBRARY=str(tmp_path / "libnvinfer.so.11"))
    run = lambda *args: subprocess.run([sys.executable, "-m", "mdtrt", "doctor", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=120, env=env)
    report = json.loads(run("--json").stdout)
    for section, path in (("nccl", missing), ("tensorrt", tmp_path / "libnvinfer.so.11")):
        attempts = report[section]["attempts"]
        assert [a["candidate"] for a in attempts] == [str(path)] and not attempts[0]["loaded"], attempts
        assert report[section]["error"].count(str(path)) == 1, report[section]["error"]  # named once
    text = run().stdout
    reasons = text.split("cannot run multi-device inference:\n")[1].split("\n\n")[0].splitlines()
    # Each reason starts with "  - "; what belongs to it (attempts, advice) hangs deeper.
    assert sum(line.startswith("  - ") for line in reasons) == len(report["reasons"])
    assert all(line.startswith(("  - ", "    ")) for line in reasons)


def test_library_search_names_each_candidate_once():
    from mdtrt import tensorrt

    if tensorrt.library_report()["library_found"]:
        pytest.skip("TensorRT is found here: no failed search to look at")
    error = tensorrt.library_report()["error"]
    tried = [line for line in error.splitlines() if line.startswith("  - ")]
    assert tried, error
    for line in tried:
        name = line[4:].split(":")[0]
        assert line.count(name) == 1, line


def _doctor_with(**env_vars):
    env = dict(os.environ, **env_vars)
    return subprocess.run([sys.executable, "-m", "mdtrt", "doctor", "--json"], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("env_vars,spin,poll,priority", [
    ({"MDTRT_RANK_SPIN_US": "0", "MDTRT_RANK_POLL_US": "0", "MDTRT_STREAM_PRIORITY": "high"}, 0, 0, "high"),
    ({"MDTRT_RANK_SPIN_US": "750", "MDTRT_RANK_POLL_US": "250", "MDTRT_STREAM_PRIORITY": "normal"}, 750, 250,
     "normal")])
def test_doctor_reports_the_rank_thread_settings(env_vars, spin, poll, priority):
    out = _doctor_with(**env_vars)
    runtime = json.loads(out.stdout)["runtime"]
    assert runtime["error"] is None and runtime["spin_us"] == spin and runtime["poll_us"] == poll
    assert runtime["stream_priority"] == priority and runtime["environment"] == env_vars
    text = subprocess.run([sys.executable, "-m", "mdtrt", "doctor"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env_vars)).stdout
    assert f"streams at {priority} priority" in text and all(f"{k}={v}" in text for k, v in env_vars.items())
    assert (f"spin {spin} us" if spin else "no spin (MDTRT_RANK_SPIN_US=0)") in text


@pytest.mark.parametrize("name,value", [("MDTRT_RANK_SPIN_US", "long"), ("MDTRT_RANK_POLL_US", "fast"),
                                        ("MDTRT_STREAM_PRIORITY", "urgent")])
def test_doctor_says_a_bad_setting_stops_groups(name, value):
    out = _doctor_with(**{name: value})
    report = json.loads(out.stdout)
    assert name in report["runtime"]["error"] and f"'{value}'" in report["runtime"]["error"]
    assert not report["can_run_multi_device"] and out.returncode == 1
    assert any(r.startswith("device groups cannot be created") and name in r for r in report["reasons"])


def test_doctor_reports_the_onnx_parser_beside_tensorrt(trt_double, tmp_path):
    """With TensorRT found (the test double), doctor says whether TensorRT's ONNX parser is found,
    and a parser named by MDTRT_ONNXPARSER_LIBRARY that does not exist is reported with the path."""
    missing = str(tmp_path / "libnvonnxparser.so.11")
    env = dict(os.environ, MDTRT_TENSORRT_LIBRARY=trt_double, MDTRT_ONNXPARSER_LIBRARY=missing)
    out = subprocess.run([sys.executable, "-m", "mdtrt", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120, env=env)
    trt = json.loads(out.stdout)["tensorrt"]
    assert trt["library_found"], trt
    parser = trt["onnx_parser"]
    assert set(parser) == {"found", "path", "found_by", "note", "error"}
    assert not parser["found"] and missing in parser["error"], parser
    text = subprocess.run([sys.executable, "-m", "mdtrt", "doctor"], capture_output=True, text=True, timeout=120,
                          env=env).stdout
    assert "ONNX parser not found" in text and "MDTRT_ONNXPARSER_LIBRARY" in text, text


def test_doctor_json_has_the_onnx_parser_key_without_tensorrt():
    out = run_doctor("--json")
    parser = json.loads(out.stdout)["tensorrt"]["onnx_parser"]
    assert set(parser) == {"found", "path", "found_by", "note", "error"}


_NOT_FOUND_ATTEMPTS = [
    {"rule": "libnvinfer.so.11", "candidate": "libnvinfer.so.11", "loaded": False,
     "message": "libnvinfer.so.11: cannot open shared object file: No such file or directory"},
    {"rule": "extra directory", "candidate": "/w/tensorrt_libs/libnvinfer.so.11", "loaded": False,
     "message": "/w/tensorrt_libs/libnvinfer.so.11: cannot open shared object file: No such file or directory"},
]


def _tensorrt_section(**fields) -> dict:
    """The doctor's report with its tensorrt section replaced by ``fields`` (over "not found")."""
    from mdtrt import doctor

    report = doctor.collect()
    report["tensorrt"] = dict({"compiled_in": True, "reason": "built against TensorRT 11.1 headers at /h",
                               "library_found": False, "path": None, "version": None, "found_by": None, "lean": None,
                               "error": "load TensorRT: not found", "attempts": [],
                               "onnx_parser": {"found": False, "path": None, "found_by": None, "note": None,
                                               "error": None}}, **fields)
    return report


def test_without_the_backend_the_only_tensorrt_advice_is_the_rebuild():
    """A build without the TensorRT backend: installing TensorRT's library alone would change
    nothing, so the text gives only the rebuild command (not also `pip install
    tensorrt-lean-cu13-libs`), but it still names every place the library search tried (README:
    the search is in every build) and says the ONNX parser was not looked for."""
    from mdtrt import doctor

    report = _tensorrt_section(compiled_in=False, reason="built without TensorRT headers",
                               rebuild="rebuild with TensorRT_INCLUDE_DIR=<dir> pip install .", attempts=_NOT_FOUND_ATTEMPTS,
                               error="load TensorRT: not found. Install TensorRT with `pip install tensorrt-lean-cu13-libs`")
    text = doctor.format_text(report)
    assert "backend not compiled in: built without TensorRT headers" in text and "TensorRT_INCLUDE_DIR=<dir>" in text
    assert "tensorrt-lean-cu13-libs" not in text
    assert "library not found (a rebuilt mdtrt needs one too); tried:" in text
    assert "  - libnvinfer.so.11: cannot open shared object file" in text
    assert "  - extra directory: /w/tensorrt_libs/libnvinfer.so.11: cannot open shared object file" in text
    assert "ONNX parser not looked for: no TensorRT library was found" in text


def test_without_the_backend_the_text_names_the_library_a_rebuilt_mdtrt_would_use():
    from mdtrt import doctor

    report = _tensorrt_section(compiled_in=False, reason="built without TensorRT headers", rebuild="rebuild it",
                               library_found=True, version="11.4.0", path="/x/libnvinfer.so.11",
                               found_by="libnvinfer.so.11", lean=False, error=None,
                               onnx_parser={"found": False, "path": None, "found_by": None, "note": None,
                                            "error": "not looked for: this build has no TensorRT backend"})
    text = doctor.format_text(report)
    assert ("library 11.4.0 at /x/libnvinfer.so.11 (found by libnvinfer.so.11); a rebuilt mdtrt would use it"
            in text), text
    assert "ONNX parser not looked for: this build has no TensorRT backend" in text


def test_with_the_backend_and_no_library_the_text_says_the_onnx_parser_was_not_looked_for():
    """README: doctor shows whether the ONNX parser is there; without TensorRT it says why not."""
    from mdtrt import doctor

    text = doctor.format_text(_tensorrt_section(attempts=_NOT_FOUND_ATTEMPTS))
    assert "library not found: load TensorRT: not found" in text
    assert "ONNX parser not looked for: no TensorRT library was found (the full TensorRT ships the parser)" in text


def test_the_json_report_says_why_the_onnx_parser_was_not_looked_for(monkeypatch):
    from mdtrt import tensorrt

    monkeypatch.delenv("MDTRT_TENSORRT_LIBRARY", raising=False)  # the trt_double fixture may have set it
    report = tensorrt.library_report()
    if report["library_found"]:
        pytest.skip("TensorRT is found here: the parser is looked for")
    assert report["onnx_parser"]["error"] == tensorrt.PARSER_NOT_LOOKED_FOR


def test_lean_runtime_does_not_report_the_onnx_parser_as_missing():
    """With only the lean runtime the parser is never looked for (it needs a builder): the text
    says so and how to get both, not "ONNX parser not found: create TensorRT builder: ..."."""
    from mdtrt import doctor

    report = doctor.collect()
    report["tensorrt"] = dict(report["tensorrt"], compiled_in=True, library_found=True, lean=True, version="11.4.0",
                              path="/x/libnvinfer_lean.so.11", found_by="lean extra directory",
                              onnx_parser={"found": False, "path": None, "found_by": None, "note": None,
                                           "error": "create TensorRT builder: the lean runtime was found"})
    text = doctor.format_text(report)
    assert ("ONNX parser not looked for: build_engine_from_onnx needs the full TensorRT (pip install tensorrt-cu13; its "
            "libraries download only from NVIDIA's index, pypi.nvidia.com)") in text
    assert "ONNX parser not found" not in text and "create TensorRT builder" not in text


def _three_gpus(peer_links=None, reason=""):
    """query_cuda's answer for three GPUs: 0-1 NVLink, 1-2 PCIe peer access, 0-2 none."""
    links = peer_links or [["self", "nvlink", "none"], ["nvlink", "self", "pcie"], ["none", "pcie", "self"]]
    return {"driver_version": 13000, "runtime_version": 13000, "error": "",
            "gpus": [{"index": i, "name": "NVIDIA H200", "compute_capability": (9, 0), "total_memory": 141 << 30,
                      "pci_bus_id": f"0000:{i + 1:02x}:00.0"} for i in range(3)],
            "peer_access": [[a == b or links[a][b] != "none" for b in range(3)] for a in range(3)],
            "peer_links": links, "peer_links_reason": reason}


def _peer_rows(text: str) -> list[list[str]]:
    """The cells of the peer table's rows (without the row label)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Peer access, row GPU reads column GPU's memory"))
    return [line.split()[1:] for line in lines[start + 2:start + 5]]


def test_peer_table_shows_the_link_kind_of_each_pair(monkeypatch):
    from mdtrt import doctor

    cuda = _three_gpus()
    monkeypatch.setattr(doctor._core, "query_cuda", lambda: cuda)
    monkeypatch.setattr(doctor._core, "nvml_status",
                        lambda: {"available": True, "path": "/usr/lib/libnvidia-ml.so.1", "found_by": "libnvidia-ml.so.1",
                                 "error": ""})
    report = doctor.collect()
    assert report["cuda"]["peer_links"] == cuda["peer_links"] and report["nvml"]["available"]
    text = doctor.format_text(report)
    want = [["-" if a == b else "no" if not cuda["peer_access"][a][b] else cuda["peer_links"][a][b] for b in range(3)]
            for a in range(3)]
    assert _peer_rows(text) == want
    assert "NVML unavailable" not in text and "unknown" not in text


def test_unavailable_nvml_is_one_line_saying_what_auto_does(monkeypatch):
    from mdtrt import doctor

    unknown = [["self" if a == b else "unknown" for b in range(3)] for a in range(3)]
    error = "NVML (libnvidia-ml.so.1, installed with the NVIDIA driver) was not found:\n  - libnvidia-ml.so.1: nope"
    monkeypatch.setattr(doctor._core, "query_cuda", lambda: _three_gpus(unknown, "NVML is unavailable: " + error))
    monkeypatch.setattr(doctor._core, "nvml_status",
                        lambda: {"available": False, "path": "", "found_by": "", "error": error})
    text = doctor.format_text(doctor.collect())
    assert _peer_rows(text) == [["-" if a == b else "unknown" for b in range(3)] for a in range(3)]
    lines = [line for line in text.splitlines() if "NVML" in line]
    assert len(lines) == 1, lines
    assert "NVML unavailable" in lines[0] and 'replication="auto" copies host inputs' in lines[0]
    assert "libnvidia-ml.so.1: nope" in lines[0]


def test_without_any_peer_access_missing_nvml_is_not_mentioned(monkeypatch):
    """GPUs that cannot read each other's memory at all (no P2P, as on many PCIe hosts): NVML could
    only tell the kind of a peer link, so its absence is no news and gets no line."""
    from mdtrt import doctor

    none = [["self" if a == b else "none" for b in range(3)] for a in range(3)]
    monkeypatch.setattr(doctor._core, "query_cuda", lambda: _three_gpus(none))
    monkeypatch.setattr(doctor._core, "nvml_status",
                        lambda: {"available": False, "path": "", "found_by": "", "error": "not here"})
    report = doctor.collect()
    text = doctor.format_text(report)
    assert _peer_rows(text) == [["-" if a == b else "no" for b in range(3)] for a in range(3)]
    assert "NVML" not in text and "no peer access between GPUs 0->1" in text
    assert report["nvml"]["error"] == "not here"  # still in the JSON report


def test_gpus_without_tensorrt_can_still_run_the_native_collectives(monkeypatch):
    """A GPU machine whose mdtrt cannot run engines (no backend, or no TensorRT library) still runs
    DeviceGroup's collectives: the report says so instead of pointing only at the CPU tools."""
    from mdtrt import doctor

    monkeypatch.setattr(doctor._core, "query_cuda", lambda: _three_gpus())
    report = doctor.collect()
    report["tensorrt"] = dict(report["tensorrt"], compiled_in=False, reason="built without TensorRT headers",
                              rebuild="rebuild with TensorRT_INCLUDE_DIR=<dir> pip install .")
    report["can_run_multi_device"] = False
    assert report["nccl"]["found"] and report["can_run_collectives"]
    assert "It can run mdtrt.DeviceGroup and its native collectives" in doctor.format_text(report)
    for change in ({"gpus": []}, {"gpus": _three_gpus()["gpus"][:1]}):  # fewer than 2 GPUs: no collectives
        monkeypatch.setattr(doctor._core, "query_cuda", lambda: dict(_three_gpus(), **change,
                            peer_access=[[True] * len(change["gpus"])] * len(change["gpus"]),
                            peer_links=[["self"] * len(change["gpus"])] * len(change["gpus"])))
        report = doctor.collect()
        assert not report["can_run_collectives"] and not report["can_run_multi_device"]
        assert "native collectives" not in doctor.format_text(report)


def test_links_unknown_for_one_pair_say_why(monkeypatch):
    from mdtrt import doctor

    links = [["self", "nvlink", "none"], ["nvlink", "self", "unknown"], ["none", "unknown", "self"]]
    reason = "nvmlDeviceGetP2PStatus(0000:02:00.0, 0000:03:00.0, NVLINK) failed: Unknown Error (code 999)"
    monkeypatch.setattr(doctor._core, "query_cuda", lambda: _three_gpus(links, reason))
    monkeypatch.setattr(doctor._core, "nvml_status", lambda: {"available": True, "path": "x", "found_by": "x",
                                                              "error": ""})
    text = doctor.format_text(doctor.collect())
    assert [line for line in text.splitlines() if reason in line] == [
        f'  some links are unknown, so replication="auto" copies host inputs to every GPU from host memory (its peer '
        f"copies need NVLink between every pair): {reason}"]


def test_doctor_json_reports_nvml_as_the_library_search_finds_it(tmp_path):
    missing = tmp_path / "libnvidia-ml.so.1"
    out = subprocess.run([sys.executable, "-m", "mdtrt", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, MDTRT_NVML_LIBRARY=str(missing), NCCL_NVLS_ENABLE="0"))
    report = json.loads(out.stdout)
    assert not report["nvml"]["available"] and str(missing) in report["nvml"]["error"]
    assert "MDTRT_NVML_LIBRARY" in report["nvml"]["error"]
    n = len(report["cuda"]["gpus"])
    links = report["cuda"]["peer_links"]
    assert len(links) == n and all(len(row) == n for row in links)
    for a in range(n):
        for b in range(n):
            access = report["cuda"]["peer_access"][a][b]
            assert links[a][b] == ("self" if a == b else "unknown" if access else "none"), (a, b)
