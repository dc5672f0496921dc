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


def test_folders_the_readmes_write_models_into_are_ignored_by_git(tmp_path):
    """`--save-dir models` (README) and `--output-dir models` (the sample's README) write two
    128 MiB models into the checkout: git must not offer them for a commit."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout (or no git): nothing to ignore files for")
    written = sorted({readme.parent.relative_to(REPO) / folder / "attention_md.onnx"
                      for readme in [REPO / "README.md", *REPO.glob("samples/*/README.md")]
                      for folder in re.findall(r"--(?:save|output)-dir (\S+?)[`\s]", readme.read_text())
                      if folder != "."})
    assert written, "the READMEs name no --save-dir/--output-dir any more: update this test"
    checked = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *map(str, written)],
                             capture_output=True, text=True)
    ignored = {line.strip() for line in checked.stdout.splitlines()}
    assert not [str(p) for p in written if str(p) not in ignored], (written, checked.stdout, checked.stderr)


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
@pytest.mark.parametrize("kind", ["missing", "relative missing", "directory", "empty"])
def test_a_file_argument_that_is_not_a_file_says_what_to_give(tmp_path, monkeypatch, reader, kind):
    """A plan, model or hints path that does not exist, is a directory or an empty file: one
    InvalidArgumentError naming the path, what is wrong with it (a relative path: the working
    directory it was taken from) and what to give instead; a directory is not reported as missing."""
    import mdtrt

    read, what, remedy = _readers()[reader]
    monkeypatch.chdir(tmp_path)
    path, problem = {
        "missing": (str(tmp_path / "model_md.plan"), "does not exist: "),
        "relative missing": ("model_md.plan", f"does not exist (a relative path, taken from the working directory "
                                              f"{tmp_path}): "),
        "directory": (str(tmp_path), "is a directory: "),
        "empty": (str(tmp_path / "empty"), "is empty (0 bytes; was its writing interrupted?): "),
    }[kind]
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        read(path)
    assert str(error.value).startswith(f"{what} {path} {problem}{remedy}"), str(error.value)


def _readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def _check_calls(code: str, env: dict) -> list[str]:
    """Every call in ``code`` on something of mdtrt's: the attribute exists and the arguments bind
    to its signature (names from ``with X(...) as name`` and ``name = X(...)`` are instances of X)."""
    import ast
    import importlib
    import inspect

    problems = []

    def resolve(node):
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            if owner is None:
                return None
            if not hasattr(owner, node.attr):
                problems.append(f"line {node.lineno}: {ast.unparse(node)} does not exist")
                return None
            return getattr(owner, node.attr)
        if isinstance(node, ast.Call):
            made = resolve(node.func)
            return made if inspect.isclass(made) else None  # an instance: its class's attributes
        return None

    tree = ast.parse(code)
    for node in ast.walk(tree):  # bind the names first: ast.walk is breadth-first, names come before uses
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mdtrt"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                env[alias.asname or alias.name] = getattr(module, alias.name, None)
        elif isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name):
            env[node.optional_vars.id] = resolve(node.context_expr)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            made = resolve(node.value) if isinstance(node.value, ast.Call) else None
            if made is not None:
                env[node.targets[0].id] = made
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = resolve(node.func)
        module = getattr(target, "__module__", "") or ""
        if target is None or not callable(target) or not module.startswith("mdtrt"):
            continue
        arguments = [None] * len(node.args)
        if isinstance(node.func, ast.Attribute) and not inspect.isclass(target) and inspect.isclass(
                resolve(node.func.value)):
            arguments = [None] + arguments  # a method called on an instance: self
        try:
            inspect.signature(target).bind(*arguments, **{k.arg: None for k in node.keywords if k.arg})
        except TypeError as error:
            problems.append(f"line {node.lineno}: {ast.unparse(node.func)}(...): {error}")
    return sorted(set(problems))  # an attribute resolved twice (call and owner) is reported once


def test_readme_examples_call_what_exists():
    """The README's examples call attributes that exist, with arguments their signatures take,
    also those that need GPUs and TensorRT to run (the CPU example also runs:
    tests/test_readme_cpu_example.py)."""
    import mdtrt
    import numpy as np

    blocks = _readme_python_blocks()
    assert len(blocks) >= 2
    problems = [f"block {i}: {p}" for i, code in enumerate(blocks) for p in _check_calls(code, {"mdtrt": mdtrt, "np": np})]
    assert not problems, "\n".join(problems)


def test_the_call_checker_finds_wrong_names_and_arguments():
    import mdtrt

    code = ("with mdtrt.DeviceGroup(gpus=[0], timout=60) as group:\n"
            "    runner = mdtrt.EngineRunner(group, 'x.plan', replicate='host')\n"
            "    runner.infer({}, all_rank=True)\n"
            "    group.allgather([])\n")
    problems = "\n".join(_check_calls(code, {"mdtrt": mdtrt}))
    for wrong in ("timout", "replicate", "all_rank", "group.allgather does not exist"):
        assert wrong in problems, problems


def test_tests_skipped_without_torch_say_how_to_install_a_cpu_build(tmp_path):
    """The README's Test section says the fast-path CPU tests need torch, a CPU build being enough,
    and that without it they skip saying so: a test file skipped at collection (importorskip at
    module level) and a test that skips itself both carry that advice in `pytest -ra`'s summary."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    env = dict(os.environ, NCCL_NVLS_ENABLE="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")])))
    tests = REPO / "tests"
    torch_test = "test_arrays.py::test_torch_cpu_tensors_travel_as_their_bytes_and_come_back_as_torch"
    out = subprocess.run([sys.executable, "-m", "pytest", "-ra", "-q", "-p", "no:cacheprovider",
                          str(tests / "test_collective_fast_path.py"), str(tests / torch_test)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    skips = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    assert any("test_collective_fast_path.py" in line for line in skips), out.stdout
    assert any("test_arrays.py" in line for line in skips), out.stdout
    for line in skips:
        assert "could not import 'torch'" in line, line
        assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in line, line
