"""No public name of mdtrt changes meaning after first use: a submodule imported on the way
(``mdtrt.simulate`` once was one) must never replace the function of the same name."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCRIPT = textwrap.dedent(
    """
    import importlib, types
    import numpy as np
    from onnx import TensorProto, helper
    import mdtrt

    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.array([1.0, -2.0], np.float32)
    calls = {
        "simulate": lambda f: f(model, {"x": x}, 1, progress=False)[0]["y"],
        "run_on_cpu": lambda f: f(model, {"x": x}, progress=False)["y"],
        "compare_outputs": lambda f: f({"y": -x}, {"y": -x}, atol=0, rtol=0).passed,
        "build_info": lambda f: f()["version"],
    }
    # Every private submodule imported too, as other code of the package does on its way.
    for module in ("_simulate", "sharding", "onnx_graph", "reference", "launch", "doctor", "nccl"):
        importlib.import_module("mdtrt." + module)
    for round_ in range(2):
        for name in mdtrt.__all__:
            value = getattr(mdtrt, name)
            imported = {}
            exec(f"from mdtrt import {name} as v", imported)
            assert imported["v"] is value, (name, round_)
            if name == "reference":
                assert isinstance(value, types.ModuleType) and callable(value.collective)
            elif name == "__version__":
                assert isinstance(value, str)
            else:
                assert not isinstance(value, types.ModuleType), f"mdtrt.{name} is a module in round {round_}"
                assert callable(value), name
            if name in calls:
                result = calls[name](value)
                if name in ("simulate", "run_on_cpu"):
                    np.testing.assert_array_equal(result, -x)
    print("OK")
    """
)


def test_every_public_name_keeps_its_meaning_after_use():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


def test_simulate_module_imported_first_does_not_shadow():
    script = "import mdtrt._simulate, mdtrt\nassert callable(mdtrt.simulate), mdtrt.simulate\nprint('OK')"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
