"""No public name of mdtrt changes meaning after first use: a submodule imported on the way
(``mdtrt.simulate`` once was one) must never replace the function of the same name."""

from __future__ import annotations

import json
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


def test_dir_lists_the_public_names_lazy_ones_included():
    # In a fresh process, so that no lazily imported name has been loaded yet.
    script = ("import mdtrt, json; names = dir(mdtrt); print(json.dumps([names, mdtrt.__all__, "
              "'shard' in vars(mdtrt)]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names, public, loaded = json.loads(out.stdout)
    assert not loaded  # dir() did not import the ONNX tools
    assert set(public) <= set(names)
    assert {"shard", "simulate", "run_on_cpu", "compare_outputs", "reference"} <= set(names)
    assert "annotations" not in names and "_core" not in names


def test_run_on_cpu_rank_count_message_is_grammatical():
    import numpy as np
    from onnx import TensorProto, helper

    import mdtrt

    node = helper.make_node("DistCollective", ["x"], ["y"], domain="trt", collective_operation="all_gather",
                            reduce_op="none", root=-1, nb_rank=2, group_size=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt", 1)])
    with pytest.raises(ValueError, match="has nb_rank=2\\) but 1 was asked for") as raised:
        mdtrt.run_on_cpu(model, {"x": np.zeros(2, np.float32)}, progress=False)
    assert "mdtrt.simulate(model, inputs, 2)" in str(raised.value)  # the way to run a sharded model
    with pytest.raises(ValueError, match="but 3 were asked for; simulate 2 ranks, or shard the model again for 3"):
        mdtrt.simulate(model, {"x": np.zeros(2, np.float32)}, 3, progress=False)
