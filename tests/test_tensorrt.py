"""The TensorRT backend without TensorRT: clean reports of its absence, clear errors from every
entry point, and the library discovery order with fake libraries built here.

Discovery runs through ``_core.testing.load_tensorrt``, which exists with and without the backend
(the loader needs no TensorRT header). Each scenario runs in a fresh subprocess because TensorRT is
loaded once per process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import mdtrt
from fakelib import CC, compile_shared_object
from trt_double import without_backend
from mdtrt import _core
from mdtrt import tensorrt as mdtrt_tensorrt

needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler to build fake TensorRT libraries")
BACKEND = bool(_core.build_info()["tensorrt_backend"])
MAJOR = _core.testing.tensorrt_header_major()
# What every error that says `pip install tensorrt-cu13` must add (README: TensorRT).
INDEX = "its libraries download only from NVIDIA's index, pypi.nvidia.com"


def code(major: int, minor: int = 0, patch: int = 0) -> int:
    return major * 10000 + minor * 100 + patch


def build_fake_trt(directory, soname: str, version: int, builder: bool = True, omit: str | None = None) -> str:
    """A shared object with TensorRT's entry points: getInferLibVersion returns `version`, the
    creation functions return NULL; without `builder` it models the lean runtime."""
    lines = [
        "int getInferLibVersion(void) { return %d; }" % version,
        "void* createInferRuntime_INTERNAL(void* logger, int version) { return 0; }",
    ]
    if builder:
        lines.append("void* createInferBuilder_INTERNAL(void* logger, int version) { return 0; }")
    lines = [line for line in lines if omit is None or omit not in line]
    return compile_shared_object(directory, soname, lines)


PROBE = textwrap.dedent(
    """
    import json, sys
    from mdtrt import _core
    args = json.loads(sys.argv[1])
    try:
        info = _core.testing.load_tensorrt(args["extra"], args["lean"], require_builder=args["builder"])
        again = _core.testing.load_tensorrt([], [])
        print(json.dumps({"ok": True, "path": info["path"], "version": info["version"], "found_by": info["found_by"],
                          "lean": info["lean"], "cached": again["path"] == info["path"],
                          "attempts": [[a.rule, a.candidate, a.loaded, a.message] for a in info["attempts"]]}))
    except Exception as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "message": str(e)}))
    """
)


def probe(ld_library_path=(), extra_dirs=(), lean_dirs=(), env_library=None, require_builder=False) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(str(p) for p in ld_library_path)
    env.pop("MDTRT_TENSORRT_LIBRARY", None)
    if env_library is not None:
        env["MDTRT_TENSORRT_LIBRARY"] = str(env_library)
    args = {"extra": [str(d) for d in extra_dirs], "lean": [str(d) for d in lean_dirs], "builder": require_builder}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def system_has_tensorrt() -> bool:
    result = probe()
    return result["ok"]


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    if CC is None:
        pytest.skip("needs a C compiler")
    root = tmp_path_factory.mktemp("fake_trt")
    full, lean = f"libnvinfer.so.{MAJOR}", f"libnvinfer_lean.so.{MAJOR}"
    return {
        "full": build_fake_trt(root / "full", full, code(MAJOR, 4, 1)),
        "env": build_fake_trt(root / "env", "libnvinfer-custom.so", code(MAJOR, 4, 2)),
        "wheel": build_fake_trt(root / "wheel", full, code(MAJOR, 4, 3)),
        "lean": build_fake_trt(root / "lean", lean, code(MAJOR, 4, 4), builder=False),
        "lean_wheel": build_fake_trt(root / "lean_wheel", lean, code(MAJOR, 4, 5), builder=False),
        "no_builder": build_fake_trt(root / "no_builder", full, code(MAJOR, 4, 6), builder=False),
        "old": build_fake_trt(root / "old", full, code(MAJOR - 1, 3, 0)),
        "next": build_fake_trt(root / "next", full, code(MAJOR + 1, 0, 0)),
        "no_runtime": build_fake_trt(root / "no_runtime", full, code(MAJOR, 4, 7), omit="createInferRuntime"),
    }


def folder(path):
    return os.path.dirname(path)


def no_system_tensorrt():
    if system_has_tensorrt():
        pytest.skip("this machine has a system TensorRT, which the loader rightly prefers")


# --- the backend's absence is reported cleanly -------------------------------------------------


def test_build_info_says_whether_and_why():
    info = mdtrt.build_info()
    assert isinstance(info["tensorrt_backend"], bool)
    assert info["tensorrt_reason"]
    if not info["tensorrt_backend"]:
        assert "TensorRT" in info["tensorrt_reason"]


def test_doctor_reports_tensorrt():
    from mdtrt import doctor

    report = doctor.collect()["tensorrt"]
    assert report["compiled_in"] == BACKEND
    for key in ("library_found", "path", "version", "found_by", "lean", "error", "attempts"):
        assert key in report  # the search runs in every build
    if not BACKEND:
        assert any("TensorRT backend is not compiled in" in r and "TensorRT_INCLUDE_DIR=" in r
                   for r in doctor.collect()["reasons"])
    assert "TensorRT" in doctor.format_text(doctor.collect())


def test_library_report_never_raises():
    report = mdtrt_tensorrt.library_report()
    assert set(report) >= {"library_found", "path", "version", "found_by", "lean", "error"}
    if not report["library_found"]:
        assert report["error"]
        assert "could not find a usable TensorRT" in report["error"]  # the search runs in every build
        assert len(report["attempts"]) == report["error"].count("\n  - ") >= 2


def test_without_the_backend_the_doctor_says_how_to_rebuild_and_which_library_it_would_use(monkeypatch):
    from mdtrt import doctor

    reason = "TensorRT headers not found (set TensorRT_ROOT or TensorRT_INCLUDE_DIR and rebuild)"
    without = dict(mdtrt.build_info(), tensorrt_backend=False, tensorrt_reason=reason)
    monkeypatch.setattr(mdtrt_tensorrt._core, "build_info", lambda: without)
    here = mdtrt_tensorrt._library_report_here()  # what the doctor's probe process runs, in a build without the backend
    assert here["library_found"] or (len(here["attempts"]) >= 2 and "could not find a usable TensorRT" in here["error"])
    report = doctor._tensorrt_report({"tensorrt_backend": False, "tensorrt_reason": reason})
    assert 'TensorRT_INCLUDE_DIR=' in report["rebuild"] and 'pip install ".[test,tensorrt]"' in report["rebuild"]
    assert '".[test,lean]"' in report["rebuild"]  # the doctor gives both: running engines needs no builder
    assert set(report) >= {"library_found", "path", "attempts", "error"}


def _entry_points():
    return {
        "tensorrt_library": lambda: mdtrt_tensorrt.tensorrt_library(),
        "build_dist_collective_engine": lambda: mdtrt_tensorrt.build_dist_collective_engine(
            "all_reduce", nb_ranks=2, shape=[4, 3], progress=False),
        "build_engine_from_onnx": lambda: mdtrt_tensorrt.build_engine_from_onnx(b"not onnx", progress=False),
        "engine_program": lambda: mdtrt_tensorrt.engine_program([b"plan", b"plan"]),
        "check_engine": lambda: mdtrt_tensorrt.check_engine(b"plan"),
    }


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_entry_points_say_what_is_missing(name):
    if BACKEND and (system_has_tensorrt() or any(mdtrt_tensorrt.wheel_library_dirs())):
        pytest.skip("TensorRT is installed here: the entry points get further than 'missing'")
    if BACKEND and os.environ.get("MDTRT_TENSORRT_LIBRARY"):
        # e.g. the trt_double fixture ran earlier in this session: TensorRT stays loaded in the process
        pytest.skip(f"MDTRT_TENSORRT_LIBRARY={os.environ['MDTRT_TENSORRT_LIBRARY']} is set: TensorRT is found")
    with pytest.raises(mdtrt.LibraryNotFoundError) as info:
        _entry_points()[name]()
    message = str(info.value)
    if BACKEND:
        # NVIDIA's packages by name: mdtrt is not on a package index, so `pip install 'mdtrt[...]'` cannot work.
        assert "could not find a usable TensorRT" in message and "`pip install tensorrt-cu13`" in message
        assert INDEX in message  # without NVIDIA's index that command fails
        assert "`pip install tensorrt-lean-cu13-libs`" in message and "mdtrt[" not in message
        assert "MDTRT_TENSORRT_LIBRARY" in message
    else:
        assert "mdtrt was built without the TensorRT backend" in message
        assert "TensorRT_ROOT or TensorRT_INCLUDE_DIR" in message


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_without_the_backend_the_rebuild_advice_fits_the_call(monkeypatch, name):
    """Building an engine needs the full TensorRT (the `tensorrt` extra): a builder's rebuild
    advice names only that, with NVIDIA's index; the calls that run engines may also use the lean
    runtime (the `lean` extra)."""
    without = dict(mdtrt.build_info(), tensorrt_backend=False, tensorrt_reason="TensorRT headers not found")
    monkeypatch.setattr(mdtrt_tensorrt._core, "build_info", lambda: without)
    with pytest.raises(mdtrt.LibraryNotFoundError) as info:
        _entry_points()[name]()
    message = str(info.value)
    assert message.startswith("mdtrt was built without the TensorRT backend: TensorRT headers not found; rebuild"), message
    assert 'TensorRT_INCLUDE_DIR=<TensorRT include folder> pip install ".[test,tensorrt]"' in message
    assert INDEX in message
    building = name.startswith("build_")
    assert ('".[test,lean]"' in message) is not building, message
    assert ("building engines needs it (the lean runtime cannot build)" in message) is building, message


@pytest.mark.parametrize("name", ["load_tensorrt", "load_onnx_parser", "tensorrt_build_dist_collective",
                                  "tensorrt_build_from_onnx", "tensorrt_inspect_engine", "EngineProgram"])
def test_native_entry_points_exist_in_every_build(name):
    assert callable(getattr(_core, name))
    if BACKEND:
        return
    with pytest.raises(mdtrt.LibraryNotFoundError, match="built without the TensorRT backend"):
        getattr(_core, name)([b"x"])


def test_bad_arguments_are_named_before_tensorrt_is_needed():
    with pytest.raises(mdtrt.InvalidArgumentError, match="neither a path, bytes nor an onnx.ModelProto"):
        mdtrt_tensorrt.build_engine_from_onnx(object(), progress=False)
    with pytest.raises(mdtrt.InvalidArgumentError, match="does not exist"):
        mdtrt_tensorrt.build_engine_from_onnx("/nonexistent/model.onnx", progress=False)
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"\(min_shape, opt_shape, max_shape\)"):
        mdtrt_tensorrt.build_engine_from_onnx(b"x", profiles={"input": ([1], [2])}, progress=False)
    # A precision switch that would silently build a float32 engine is refused, naming what to do.
    for flag, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        with pytest.raises(mdtrt.InvalidArgumentError, match=f"{flag}=True: .*strongly typed.*convert the ONNX model to {dtype}"):
            mdtrt_tensorrt.build_engine_from_onnx(b"x", progress=False, **{flag: True})


def test_profile_forms():
    assert mdtrt_tensorrt._profile("x", (1, 2)) == ([1, 2], [1, 2], [1, 2])
    assert mdtrt_tensorrt._profile("x", ((1, 2), (2, 2), (4, 2))) == ([1, 2], [2, 2], [4, 2])


# --- discovery order, with fake libraries --------------------------------------------------------


@needs_cc
def test_env_override_wins(fakes):
    r = probe([folder(fakes["full"])], extra_dirs=[folder(fakes["wheel"])], env_library=fakes["env"])
    assert r["ok"], r
    assert (r["found_by"], r["version"], r["path"], r["lean"]) == ("MDTRT_TENSORRT_LIBRARY", f"{MAJOR}.4.2",
                                                                     fakes["env"], False)
    assert [a[0] for a in r["attempts"]] == ["MDTRT_TENSORRT_LIBRARY"]


@needs_cc
def test_libnvinfer_preferred_over_wheel_and_lean(fakes):
    r = probe([folder(fakes["full"]), folder(fakes["lean"])], extra_dirs=[folder(fakes["wheel"])],
              lean_dirs=[folder(fakes["lean_wheel"])])
    assert r["ok"], r
    assert (r["found_by"], r["version"], r["path"], r["lean"]) == (f"libnvinfer.so.{MAJOR}", f"{MAJOR}.4.1",
                                                                     fakes["full"], False)
    assert r["cached"]


@needs_cc
def test_falls_back_to_wheel_folder(fakes):
    no_system_tensorrt()
    r = probe([folder(fakes["lean"])], extra_dirs=[folder(fakes["wheel"])], lean_dirs=[folder(fakes["lean_wheel"])])
    assert r["ok"], r
    assert (r["found_by"], r["version"], r["path"]) == ("extra directory", f"{MAJOR}.4.3", fakes["wheel"])
    assert [a[0] for a in r["attempts"]] == [f"libnvinfer.so.{MAJOR}", "extra directory"]
    assert not r["attempts"][0][2] and f"libnvinfer.so.{MAJOR}" in r["attempts"][0][3]


@needs_cc
def test_lean_runtime_through_loader_is_reported_as_lean(fakes):
    no_system_tensorrt()
    r = probe([folder(fakes["lean"])], lean_dirs=[folder(fakes["lean_wheel"])])
    assert r["ok"], r
    assert (r["found_by"], r["version"], r["lean"]) == (f"libnvinfer_lean.so.{MAJOR}", f"{MAJOR}.4.4", True)
    assert "lean runtime" in r["attempts"][-1][3]


@needs_cc
def test_lean_wheel_folder_is_last(fakes, tmp_path):
    no_system_tensorrt()
    r = probe([], extra_dirs=[tmp_path], lean_dirs=[folder(fakes["lean_wheel"])])
    assert r["ok"], r
    assert (r["found_by"], r["path"], r["lean"]) == ("lean extra directory", fakes["lean_wheel"], True)
    assert [a[0] for a in r["attempts"]] == [f"libnvinfer.so.{MAJOR}", "extra directory", f"libnvinfer_lean.so.{MAJOR}",
                                             "lean extra directory"]


@needs_cc
@pytest.mark.skipif(not BACKEND, reason="the builders need the TensorRT backend, which this build lacks")
def test_the_builders_refuse_the_lean_runtime_before_building(fakes):
    """build_engine_from_onnx and build_dist_collective_engine open TensorRT asking for a builder:
    the lean runtime is refused up front (LibraryNotFoundError, "create TensorRT builder"), in the
    native search's words, with where it was found and what to install."""
    env = dict(os.environ, MDTRT_TENSORRT_LIBRARY=str(fakes["no_builder"]))
    code = ("import mdtrt.tensorrt as t\ntry:\n    t._builder_library()\nexcept Exception as e:\n"
            "    print(type(e).__name__, e.call, '|', e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("LibraryNotFoundError create TensorRT builder |"), out.stdout + out.stderr
    assert f"the lean runtime was found ({fakes['no_builder']})" in line
    assert "can run engines but not build them" in line and f"(pip install tensorrt-cu13; {INDEX})" in line


@needs_cc
def test_lean_runtime_cannot_build(fakes):
    r = probe([], env_library=fakes["no_builder"], require_builder=True)
    assert not r["ok"]
    assert r["type"] == "LibraryNotFoundError"
    assert "the lean runtime was found" in r["message"] and "can run engines but not build them" in r["message"]
    assert f"(pip install tensorrt-cu13; {INDEX})" in r["message"] and "mdtrt[" not in r["message"]
    assert probe([], env_library=fakes["no_builder"])["lean"] is True


@needs_cc
def test_env_path_to_missing_file_is_an_error(fakes, tmp_path):
    missing = tmp_path / "nope" / f"libnvinfer.so.{MAJOR}"
    r = probe([folder(fakes["full"])], env_library=missing)
    assert not r["ok"]
    assert r["type"] == "LibraryNotFoundError"
    assert "MDTRT_TENSORRT_LIBRARY" in r["message"] and str(missing) in r["message"]


@needs_cc
@pytest.mark.parametrize("name,major", [("old", MAJOR - 1), ("next", MAJOR + 1)])
def test_other_major_is_refused(fakes, name, major):
    r = probe([], env_library=fakes[name])
    assert not r["ok"]
    assert f"TensorRT {major}." in r["message"] and "is not supported" in r["message"]
    assert f"needs a TensorRT {MAJOR}.x library" in r["message"]


@needs_cc
def test_other_major_falls_through_and_is_reported(fakes):
    no_system_tensorrt()
    r = probe([folder(fakes["next"])], extra_dirs=[folder(fakes["wheel"])])
    assert r["ok"] and r["version"] == f"{MAJOR}.4.3", r
    assert "is not supported" in r["attempts"][0][3]


@needs_cc
def test_missing_entry_point_is_named(fakes):
    r = probe([], env_library=fakes["no_runtime"])
    assert not r["ok"]
    assert "missing symbol createInferRuntime_INTERNAL" in r["message"]


@needs_cc
def test_nothing_found_lists_attempts_and_what_to_do(tmp_path):
    no_system_tensorrt()
    r = probe([], extra_dirs=[tmp_path / "full"], lean_dirs=[tmp_path / "lean"])
    assert not r["ok"]
    assert r["type"] == "LibraryNotFoundError"
    for text in (f"libnvinfer.so.{MAJOR}", f"libnvinfer_lean.so.{MAJOR}", str(tmp_path / "full"),
                 str(tmp_path / "lean"), f"`pip install tensorrt-cu13` (build and run engines; {INDEX})",
                 "`pip install tensorrt-lean-cu13-libs`", "MDTRT_TENSORRT_LIBRARY"):
        assert text in r["message"]
    assert "mdtrt[" not in r["message"]


WHEEL_PROBE = textwrap.dedent(
    """
    import json
    from mdtrt import _core, tensorrt
    full, lean = tensorrt.wheel_library_dirs()
    info = _core.testing.load_tensorrt(full, lean)
    print(json.dumps({"full": full, "lean": lean, "found_by": info["found_by"], "path": info["path"],
                      "lean_lib": info["lean"]}))
    """
)


@needs_cc
@pytest.mark.parametrize("which", ["tensorrt_libs", "tensorrt_lean_libs"])
def test_wheel_folders_are_found_without_importing_tensorrt(fakes, tmp_path, which):
    """Fake tensorrt_libs / tensorrt_lean_libs packages on sys.path: their folders are searched."""
    no_system_tensorrt()
    package = tmp_path / which
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the loader must not import the wheel')\n")
    source = fakes["wheel"] if which == "tensorrt_libs" else fakes["lean_wheel"]
    shutil.copy(source, package / os.path.basename(source))
    env = dict(os.environ, LD_LIBRARY_PATH="")
    env.pop("MDTRT_TENSORRT_LIBRARY", None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path)] + [p for p in sys.path if p])
    out = subprocess.run([sys.executable, "-c", WHEEL_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    expected = ("extra directory", False) if which == "tensorrt_libs" else ("lean extra directory", True)
    assert (r["found_by"], r["lean_lib"]) == expected
    assert r["path"] == str(package / os.path.basename(source))


# --- GPU machine with the lean runtime wheel (no full TensorRT) ----------------------------------

LEAN_WHEEL = importlib.util.find_spec("tensorrt_lean_libs") is not None


LEAN_PROBE = textwrap.dedent(
    """
    import json, sys
    import mdtrt
    from mdtrt import tensorrt
    garbage = b"\\x00" * 64 + b"definitely not a plan"
    double_plan = sys.argv[1].encode()
    lib = tensorrt.tensorrt_library()
    r = {"found_by": lib.found_by, "lean": lib.lean, "version": lib.version, "path": lib.path}

    def refused(fn):
        try:
            fn()
        except mdtrt.MdtrtError as e:
            return {"type": type(e).__name__, "message": str(e), "call": e.call, "rank": e.rank}
        return None

    r["garbage"] = refused(lambda: tensorrt.check_engine(garbage))
    r["double_plan"] = refused(lambda: tensorrt.check_engine(double_plan))
    r["build"] = refused(lambda: tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 4], progress=False))
    with mdtrt.DeviceGroup(gpus=[0], timeout=60.0) as group:
        r["runner"] = refused(lambda: mdtrt.EngineRunner(group, garbage))
    print(json.dumps(r))
    """
)


@pytest.fixture(scope="module")
def lean_report():
    """What the real lean runtime (tensorrt_lean_libs wheel) does, probed in a child process: TensorRT
    is loaded once per process, and this one may hold the TensorRT test double."""
    if not BACKEND:
        pytest.skip(without_backend())
    if not LEAN_WHEEL:
        pytest.skip("needs the tensorrt-lean-cu13-libs wheel (pip install tensorrt-lean-cu13-libs)")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    env.pop("MDTRT_TENSORRT_LIBRARY", None)
    double_plan = "MDTRT-TENSORRT-DOUBLE-PLAN 1\nranks value=0 exact=1\n"  # a plan of the test double, not NVIDIA's
    out = subprocess.run([sys.executable, "-c", LEAN_PROBE, double_plan], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if report["found_by"] not in (f"libnvinfer_lean.so.{MAJOR}", "lean extra directory"):
        pytest.skip(f"a full TensorRT was found first ({report['path']})")
    return report


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_lean_runtime_is_found_with_its_version(lean_report):
    assert lean_report["lean"] is True and os.path.isfile(lean_report["path"])
    major, minor, _ = (int(v) for v in lean_report["version"].split("."))
    assert major == MAJOR and minor >= 1


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("plan", ["garbage", "double_plan"])
def test_lean_runtime_refuses_invalid_plans_with_its_own_message(lean_report, plan):
    """Deserializing creates the runtime on the GPU: it must work, then refuse the bytes with
    TensorRT's own logged reason in the exception (not only mdtrt's hint)."""
    refused = lean_report[plan]
    assert refused is not None and refused["type"] == "TensorRTError", refused
    message = refused["message"]
    assert "returned no runtime" not in message
    assert refused["call"] == "deserializeCudaEngine"
    assert f"Is this a TensorRT {MAJOR} plan built for this GPU?" in message
    assert "TensorRT logged no error" not in message, message
    assert "TensorRT test double" not in message


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_lean_runtime_cannot_build_and_runner_names_the_rank(lean_report):
    assert lean_report["build"]["type"] == "LibraryNotFoundError"
    assert "the lean runtime was found" in lean_report["build"]["message"]
    runner = lean_report["runner"]
    assert runner["type"] == "TensorRTError" and runner["rank"] == 0 and runner["call"] == "deserializeCudaEngine"
    assert "Is this a TensorRT" in runner["message"]


# --- versions older than the headers, the ONNX parser's version, the lean runtime up front ---------

HEADER_VERSION = _core.testing.tensorrt_header_version()


@needs_cc
@pytest.mark.skipif(HEADER_VERSION % 10000 == 0, reason="the headers are an x.0.0 release: nothing of their major is older")
def test_library_older_than_the_headers_is_refused(tmp_path):
    """A TensorRT 11 library older than the headers may lack functions the headers declare: refused,
    naming both versions, and the search goes on."""
    major = HEADER_VERSION // 10000
    older = build_fake_trt(tmp_path / "older", f"libnvinfer.so.{major}", HEADER_VERSION - 1)
    r = probe([], env_library=older)
    assert not r["ok"]
    old, new = (f"{v // 10000}.{v % 10000 // 100}.{v % 100}" for v in (HEADER_VERSION - 1, HEADER_VERSION))
    assert f"TensorRT {old} is older than the TensorRT {new} headers" in r["message"]
    same = build_fake_trt(tmp_path / "same", f"libnvinfer.so.{major}", HEADER_VERSION)
    assert probe([], env_library=same)["ok"]


PARSER_PROBE = textwrap.dedent(
    """
    import json
    from mdtrt import _core
    try:
        info = _core.load_onnx_parser([])
        print(json.dumps({"ok": True, "version": info["version_code"], "note": info["note"]}))
    except Exception as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "message": str(e)}))
    """
)


def build_fake_parser(directory, version: int) -> str:
    return compile_shared_object(directory, f"libnvonnxparser.so.{MAJOR}", [
        "void* createNvOnnxParser_INTERNAL(void* network, void* logger, int version) { return 0; }",
        "int getNvOnnxParserVersion(void) { return %d; }" % version,
    ])


@needs_cc
@pytest.mark.skipif(not BACKEND, reason="the ONNX parser is loaded by the TensorRT backend")
def test_onnx_parser_version_is_compared_with_the_headers(fakes, tmp_path):
    header = _core.testing.onnx_parser_header_version()

    def load(version):
        env = dict(os.environ, MDTRT_TENSORRT_LIBRARY=fakes["full"],
                   MDTRT_ONNXPARSER_LIBRARY=build_fake_parser(tmp_path / str(version), version))
        out = subprocess.run([sys.executable, "-c", PARSER_PROBE], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    same = load(header)
    assert same["ok"] and same["version"] == header and same["note"] == ""
    if header % 10000:
        older = load(header - 1)
        assert not older["ok"] and older["type"] == "LibraryNotFoundError"
        assert "older than the parser headers" in older["message"]
    other_major = load(header + 10000)  # undocumented relation: reported, not refused
    assert other_major["ok"] and "reports version" in other_major["note"]


LEAN_NOTE_PROBE = textwrap.dedent(
    """
    import json, logging
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))
    logging.getLogger("mdtrt.tensorrt").addHandler(Keep())
    from mdtrt import tensorrt
    tensorrt.tensorrt_library()
    tensorrt.tensorrt_library()
    print(json.dumps(records))
    """
)


@needs_cc
@pytest.mark.skipif(not BACKEND, reason=without_backend())
def test_lean_runtime_says_up_front_which_plans_it_loads(fakes):
    env = dict(os.environ, MDTRT_TENSORRT_LIBRARY=fakes["lean"])
    out = subprocess.run([sys.executable, "-c", LEAN_NOTE_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout.strip().splitlines()[-1])
    notes = [m for level, m in records if "lean runtime" in m]
    assert len(notes) == 1 and records[0][0] == "WARNING", records  # once, up front
    assert fakes["lean"] in notes[0] and "version_compatible=True" in notes[0] and "allow_host_code=True" in notes[0]
    env["MDTRT_TENSORRT_LIBRARY"] = fakes["full"]
    out = subprocess.run([sys.executable, "-c", LEAN_NOTE_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "lean runtime" not in out.stdout, out.stdout + out.stderr
