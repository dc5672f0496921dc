"""Fake shared libraries for the run-time discovery tests (NCCL, TensorRT): built here with the C
compiler, so the tests control names, versions and which entry points exist."""

from __future__ import annotations

import os
import shutil
import subprocess

CC = shutil.which("cc") or shutil.which("gcc")


def compile_shared_object(directory, soname: str, source_lines: list[str]) -> str:
    """Compiles `source_lines` (C) into directory/soname and returns its path."""
    os.makedirs(directory, exist_ok=True)
    source = os.path.join(directory, soname + ".c")
    with open(source, "w") as f:
        f.write("\n".join(source_lines) + "\n")
    path = os.path.join(directory, soname)
    subprocess.run([CC, "-shared", "-fPIC", "-o", path, source], check=True, timeout=120)
    return path
