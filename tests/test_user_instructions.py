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


# Every call that reads a file the user names, and the remedy its error must give.
def _readers():
    from mdtrt import runner, sharding, tensorrt
    from mdtrt.onnx_graph import load_model

    return {
        "EngineRunner engine": (runner._engine_bytes, "engine file", "give the path of a serialized TensorRT plan"),
        "build_engine_from_onnx model": (tensorrt._onnx_model, "ONNX model file", "give the path of an .onnx file"),
        "shard/simulate model": (load_model, "model: ONNX model file", "give the path of an .onnx file"),
        "shard hints": (sharding.load_hints, "hints: file", "give a ShardHints JSON file"),
    }


@pytest.mark.parametrize("reader", ["EngineRunner engine", "build_engine_from_onnx model", "shard/simulate model",
                                    "shard hints"])
@pytest.mark.parametrize("kind", ["missing", "relative missing", "directory"])
def test_a_file_argument_that_is_not_a_file_says_what_to_give(tmp_path, monkeypatch, reader, kind):
    """A plan, model or hints path that does not exist or is a directory: one InvalidArgumentError
    naming the path, what is wrong with it (a relative path: the working directory it was taken
    from) and what to give instead; a directory is not reported as missing."""
    import mdtrt

    read, what, remedy = _readers()[reader]
    monkeypatch.chdir(tmp_path)
    path, problem = {
        "missing": (str(tmp_path / "model_md.plan"), "does not exist: "),
        "relative missing": ("model_md.plan", f"does not exist (a relative path, taken from the working directory "
                                              f"{tmp_path}): "),
        "directory": (str(tmp_path), "is a directory: "),
    }[kind]
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        read(path)
    assert str(error.value).startswith(f"{what} {path} {problem}{remedy}"), str(error.value)
