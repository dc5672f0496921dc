"""mdtrt._core must leave the rest of the process alone: a build that exported its (statically
linked) C++ runtime's symbols crashed every later C++ library that formats numbers through
iostreams (ml_dtypes, imported by onnx; TensorRT's lean runtime while loading)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest


def test_cpp_extensions_imported_after_mdtrt_still_work():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = "float4_e2m1fn" if hasattr(ml_dtypes, "float4_e2m1fn") else "bfloat16"
    # str() of an ml_dtypes scalar goes through libstdc++'s ostream: the call that crashed.
    code = f"import mdtrt._core, ml_dtypes; print(str(ml_dtypes.{dtype}(1.0)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip() == "1"


def test_extension_exports_no_cxx_runtime_state():
    """Where the toolchain links libstdc++ statically (the GPU machines' does), its locale and
    iostream state must stay inside the module."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    origin = importlib.util.find_spec("mdtrt._core").origin
    out = subprocess.run([readelf, "--dyn-syms", "-W", origin], capture_output=True, text=True, check=True).stdout
    runtime = re.compile(r"St6locale|St8ios_base|codecvt|St5ctype|numpunct|num_put|num_get|St15basic_streambuf")
    defined = [f[-1] for f in (line.split() for line in out.splitlines()) if len(f) >= 8 and f[6] != "UND"]
    assert "PyInit__core" in defined, out[-2000:]  # the table was read: the module's own entry point is there
    exported = [name for name in defined if runtime.search(name)]
    assert not exported, f"mdtrt._core exports C++ runtime symbols other libraries would bind to: {exported[:10]}"
