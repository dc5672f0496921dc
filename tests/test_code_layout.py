"""The source tree keeps its layers and its build lists (issue #19): checked on the files, so a
change that breaks either fails here on any machine, before a build.

Layers: common <- nccl <- runtime <- trt <- bindings; test programs (csrc/testing) are linked only
into _core.testing, never into the shipped core.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z_]+)/', re.MULTILINE)

# Folders each layer may include from (its own included).
ALLOWED = {
    "common": {"common"},
    "nccl": {"common", "nccl"},
    "runtime": {"common", "nccl", "runtime"},
    "trt": {"common", "nccl", "runtime", "trt"},
    "testing": {"common", "nccl", "runtime", "testing"},
    "bindings": {"common", "nccl", "runtime", "trt", "testing", "bindings"},
}

pytestmark = pytest.mark.skipif(not CSRC.is_dir(), reason="the source tree is not beside the tests")


def _sources(suffixes=(".h", ".cpp")):
    return sorted(p for p in CSRC.rglob("*") if p.suffix in suffixes)


def test_every_source_folder_is_a_known_layer():
    folders = {p.relative_to(CSRC).parts[0] for p in _sources()}
    assert {"common", "nccl", "runtime", "bindings"} <= folders, folders  # the files were found at all
    assert folders <= set(ALLOWED), f"unknown layer folders: {sorted(folders - set(ALLOWED))}"


def test_lower_layers_never_include_higher_ones():
    wrong, checked = [], 0
    for path in _sources():
        layer = path.relative_to(CSRC).parts[0]
        for folder in INCLUDE.findall(path.read_text()):
            checked += 1
            if folder not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(REPO)} includes {folder}/")
    assert checked > 0, "no include of a layer folder was found: the pattern no longer matches the sources"
    assert not wrong, "\n".join(wrong)


def test_cmake_lists_every_source_file_explicitly():
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "GLOB" not in cmake, "sources are listed explicitly, not globbed"
    listed = set(re.findall(r"\bcsrc/[a-z_]+/[a-z_]+\.cpp\b", cmake))
    present = {str(p.relative_to(REPO)) for p in _sources((".cpp",))}
    assert listed == present, f"not listed: {sorted(present - listed)}; listed but missing: {sorted(listed - present)}"
    # Test programs go into their own target, which only the Python module links.
    core = cmake[cmake.index("set(MDTRT_CORE_SOURCES"):cmake.index("add_library(mdtrt_core")]
    assert "csrc/testing/" not in core and "csrc/bindings/" not in core


def test_version_has_one_source():
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"project\(mdtrt VERSION \$\{SKBUILD_PROJECT_VERSION\}", cmake)
    assert not re.search(r"project\([^)]*VERSION\s+\d", cmake), "CMake must not carry its own version number"
    # Threads is found before mdtrt_core links it.
    assert cmake.index("find_package(Threads") < cmake.index("Threads::Threads")
