"""What mdtrt tells a user to run can be run: checked on the files (messages, docstrings, READMEs),
so a wrong instruction fails here on any machine, before a user copies it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdtrt import _core

REPO = Path(__file__).resolve().parent.parent
# Where users read instructions: the package, the C++ core and samples (their messages), the
# benchmarks, and every README.
SCANNED = ("python", "csrc", "samples", "benchmarks")

pytestmark = pytest.mark.skipif(not (REPO / "csrc").is_dir(), reason="the source tree is not beside the tests")


def _user_facing_files():
    files = [p for folder in SCANNED for p in (REPO / folder).rglob("*")
             if p.suffix in (".py", ".cpp", ".h", ".md") and p.is_file()]
    return sorted(files + list(REPO.glob("*.md")))


def test_no_instruction_installs_mdtrt_from_a_package_index():
    """mdtrt is installed from its source folder (`pip install ".[extra]"`): it is on no package
    index, so `pip install 'mdtrt[tensorrt]'` fails with "No matching distribution found for
    mdtrt". Extras are named from the source folder, or NVIDIA's packages by their own names."""
    index_install = re.compile(r"""pip install\s+['"]?mdtrt\[""")
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
             for p in _user_facing_files()
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if index_install.search(line) or re.search(r"[`(]'?mdtrt\[(tensorrt|lean|bench|test)\]", line)]
    assert not found, "instructions that install mdtrt from a package index:\n" + "\n".join(found)


def test_tensorrt_install_commands_name_the_packages_the_extras_pull():
    """The pip commands the TensorRT errors name install what pyproject's extras install."""
    pyproject = (REPO / "pyproject.toml").read_text()
    extras = dict(re.findall(r'^(tensorrt|lean) = \["([a-z0-9-]+)', pyproject, re.MULTILINE))
    assert _core.TENSORRT_INSTALL_FULL == f"pip install {extras['tensorrt']}"
    assert _core.TENSORRT_INSTALL_LEAN == f"pip install {extras['lean']}"
