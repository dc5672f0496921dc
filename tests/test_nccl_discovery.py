"""NCCL discovery order and diagnostics, with fake NCCL libraries built here.

Each scenario runs in a fresh subprocess because NCCL is loaded once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import mdtrt
from fakelib import CC, compile_shared_object
from mdtrt import _core

pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler to build fake NCCL libraries")


def build_fake_nccl(directory, soname: str, version: int, omit: str | None = None) -> str:
    """A shared object exporting NCCL's entry points; ncclGetVersion returns `version`."""
    lines = ["int ncclGetVersion(int* v) { *v = %d; return 0; }" % version]
    lines += [f"int {name}(void) {{ return 0; }}" for name in _core.nccl_required_symbols()
              if name not in ("ncclGetVersion", omit)]
    return compile_shared_object(directory, soname, lines)


PROBE = textwrap.dedent(
    """
    import json, sys
    from mdtrt import _core
    try:
        info = _core.load_nccl(json.loads(sys.argv[1]))
        print(json.dumps({"ok": True, "path": info["path"], "version": info["version"],
                          "found_by": info["found_by"],
                          "attempts": [[a.rule, a.candidate, a.loaded, a.message] for a in info["attempts"]]}))
    except Exception as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "message": str(e)}))
    """
)


def probe(ld_library_path=(), extra_dirs=(), env_library=None) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(str(p) for p in ld_library_path)
    env.pop("MDTRT_NCCL_LIBRARY", None)
    if env_library is not None:
        env["MDTRT_NCCL_LIBRARY"] = str(env_library)
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(d) for d in extra_dirs])],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def system_has_nccl() -> bool:
    result = probe()
    return result["ok"] and result["found_by"] in ("libnccl.so.2", "libnccl.so")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_nccl")
    return {
        "so2": build_fake_nccl(root / "so2", "libnccl.so.2", 22001),
        "so": build_fake_nccl(root / "so", "libnccl.so", 22002),
        "env": build_fake_nccl(root / "env", "libnccl-custom.so", 22003),
        "wheel": build_fake_nccl(root / "wheel", "libnccl.so.2", 22004),
        "old": build_fake_nccl(root / "old", "libnccl.so.2", 21805),
        "v3": build_fake_nccl(root / "v3", "libnccl.so.2", 30001),
        "nosplit": build_fake_nccl(root / "nosplit", "libnccl.so.2", 22005, omit="ncclCommSplit"),
    }


def folder(path):
    return os.path.dirname(path)


def test_env_override_wins(fakes):
    r = probe([folder(fakes["so2"]), folder(fakes["so"])], env_library=fakes["env"])
    assert r["ok"], r
    assert (r["found_by"], r["version"]) == ("MDTRT_NCCL_LIBRARY", "2.20.3")
    assert r["path"] == fakes["env"]
    assert [a[0] for a in r["attempts"]] == ["MDTRT_NCCL_LIBRARY"]


def test_so2_preferred_over_so(fakes):
    r = probe([folder(fakes["so2"]), folder(fakes["so"])])
    assert r["ok"], r
    assert (r["found_by"], r["version"], r["path"]) == ("libnccl.so.2", "2.20.1", fakes["so2"])


def test_falls_back_to_unversioned_so(fakes):
    if system_has_nccl():
        pytest.skip("this machine has a system libnccl.so.2, which the loader rightly prefers")
    r = probe([folder(fakes["so"])])
    assert r["ok"], r
    assert (r["found_by"], r["version"], r["path"]) == ("libnccl.so", "2.20.2", fakes["so"])
    assert [a[0] for a in r["attempts"]] == ["libnccl.so.2", "libnccl.so"]
    assert not r["attempts"][0][2] and "libnccl.so.2" in r["attempts"][0][3]


def test_falls_back_to_wheel_folder(fakes):
    if system_has_nccl():
        pytest.skip("this machine has a system NCCL, which the loader rightly prefers")
    r = probe([], extra_dirs=[folder(fakes["wheel"])])
    assert r["ok"], r
    assert (r["found_by"], r["version"], r["path"]) == ("extra directory", "2.20.4", fakes["wheel"])
    assert [a[0] for a in r["attempts"]] == ["libnccl.so.2", "libnccl.so", "extra directory"]


def test_env_path_to_missing_file_is_an_error(fakes, tmp_path):
    missing = tmp_path / "nope" / "libnccl.so.2"
    r = probe([folder(fakes["so2"])], env_library=missing)
    assert not r["ok"]
    assert r["type"] == "LibraryNotFoundError"
    assert "MDTRT_NCCL_LIBRARY" in r["message"] and str(missing) in r["message"]


def test_missing_symbol_is_named(fakes):
    r = probe([], env_library=fakes["nosplit"])
    assert not r["ok"]
    assert "missing symbol ncclCommSplit" in r["message"]


def test_missing_symbol_falls_through_and_is_reported(fakes):
    if system_has_nccl():
        pytest.skip("this machine has a system NCCL")
    r = probe([folder(fakes["nosplit"])], extra_dirs=[folder(fakes["wheel"])])
    assert r["ok"] and r["version"] == "2.20.4"
    assert "missing symbol ncclCommSplit" in r["attempts"][0][3]


@pytest.mark.parametrize("name,version", [("old", "2.18.5"), ("v3", "3.0.1")])
def test_version_out_of_range_is_refused(fakes, name, version):
    r = probe([], env_library=fakes[name])
    assert not r["ok"]
    assert f"NCCL {version} is not supported" in r["message"] and ">= 2.19.0" in r["message"]


def test_nothing_found_lists_attempts_and_what_to_do(fakes, tmp_path):
    if system_has_nccl():
        pytest.skip("this machine has a system NCCL")
    r = probe([], extra_dirs=[tmp_path])
    assert not r["ok"]
    assert r["type"] == "LibraryNotFoundError"
    for text in ("libnccl.so.2", "libnccl.so", str(tmp_path), "pip install nvidia-nccl-cu13", "MDTRT_NCCL_LIBRARY"):
        assert text in r["message"]


def test_real_wheel_is_found():
    lib = mdtrt.nccl_library()
    assert lib.path.endswith("libnccl.so.2") and os.path.isfile(lib.path)
    major, minor, _ = (int(x) for x in lib.version.split("."))
    assert major == 2 and minor >= 19
    assert lib.attempts[-1].loaded and lib.attempts[-1].rule == lib.found_by
    assert mdtrt.nccl_library() == lib  # cached: the same library every time


PRELOADED_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    # Another library (torch, say) loaded its NCCL before mdtrt.
    ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL)
    from mdtrt import _core
    copies = [[c["path"], c["version"]] for c in _core.nccl_loaded_copies()]
    try:
        info = _core.load_nccl(json.loads(sys.argv[1]))
        print(json.dumps({"ok": True, "path": info["path"], "version": info["version"],
                          "found_by": info["found_by"], "copies": copies}))
    except Exception as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "message": str(e), "copies": copies}))
    """
)


def probe_preloaded(preload, extra_dirs=(), env_library=None) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH="")
    env.pop("MDTRT_NCCL_LIBRARY", None)
    if env_library is not None:
        env["MDTRT_NCCL_LIBRARY"] = str(env_library)
    out = subprocess.run([sys.executable, "-c", PRELOADED_PROBE, json.dumps([str(d) for d in extra_dirs]), preload],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loaded_copies_are_listed_with_versions(fakes):
    r = probe_preloaded(fakes["so2"], extra_dirs=[folder(fakes["wheel"])])
    assert [fakes["so2"], "2.20.1"] in r["copies"]


def test_a_usable_copy_already_loaded_is_used(fakes):
    # mdtrt's own search would find the wheel's 2.20.4; TensorRT would bind to the loaded 2.20.1.
    r = probe_preloaded(fakes["so2"], extra_dirs=[folder(fakes["wheel"])])
    assert r["ok"], r
    assert (r["found_by"], r["path"], r["version"]) == ("already loaded in this process", fakes["so2"], "2.20.1")


def test_an_older_copy_already_loaded_is_refused_naming_both(fakes):
    r = probe_preloaded(fakes["old"], extra_dirs=[folder(fakes["wheel"])])
    assert not r["ok"] and r["type"] == "LibraryNotFoundError", r
    message = r["message"]
    assert fakes["old"] in message and "2.18.5" in message  # the copy in the process
    # The one mdtrt's own search finds: the wheel folder's 2.20.4, or a system NCCL where the loader has one.
    would_use = probe(extra_dirs=[folder(fakes["wheel"])])
    assert would_use["ok"] and would_use["path"] in message and would_use["version"] in message, (would_use, message)
    if not system_has_nccl():
        assert (would_use["path"], would_use["version"]) == (fakes["wheel"], "2.20.4")
    assert "import mdtrt" in message and "before" in message


def test_env_library_other_than_the_loaded_copy_is_refused(fakes):
    r = probe_preloaded(fakes["so2"], env_library=fakes["env"])
    assert not r["ok"] and fakes["so2"] in r["message"] and fakes["env"] in r["message"], r
    assert "MDTRT_NCCL_LIBRARY" in r["message"]
