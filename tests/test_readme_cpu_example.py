"""The README's "Without a GPU" example runs as written (on the model the attention CLI saves) and
its check passes: the README cannot drift from the API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_without_a_gpu_example_runs(tmp_path, monkeypatch, capsys):
    if not README.is_file():
        pytest.skip("the README is not beside the tests")
    section = README.read_text().split("### Without a GPU", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    from mdtrt import attention_cli

    monkeypatch.chdir(tmp_path)
    assert attention_cli.main(["--mode", "cpu", "--save-dir", "models", "--no-progress"]) == 0
    capsys.readouterr()
    exec(compile(code, "README.md (Without a GPU)", "exec"), {})
    printed = capsys.readouterr().out
    # The readable report (not the dataclass's repr): the rule, then one verdict line per output.
    rule = "rank 0 vs single device (pass: max abs error <= 0.01 + 0.01 * max |reference|):"
    assert printed.startswith(rule), printed
    assert "  output: PASS: max abs error" in printed and "FAIL" not in printed, printed
