"""Shard a single-device ONNX model for several devices with ``polygraphy multi-device shard``.

Polygraphy (>= 0.53, which has the ``multi-device shard`` tool) does the graph rewriting: for
context parallelism it inserts ``DistCollective`` nodes (a reduce-scatter of the inputs along the
sequence axis, all-gathers of K and V before attention and of the outputs). This module only
prepares its inputs, runs the tool in-process and checks what can be checked up front, so that a
typo in a hint is an error here instead of a silently unsharded attention layer.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import onnx

__all__ = ["shard", "load_hints"]

def load_hints(hints: Mapping[str, Any] | str | os.PathLike) -> dict:
    """Return the hints as a dict: ``hints`` is a dict in polygraphy's ShardHints JSON schema,
    a path to such a JSON file, or the JSON text itself."""
    if isinstance(hints, Mapping):
        return copy.deepcopy(dict(hints))
    if isinstance(hints, (str, os.PathLike)):
        text = str(hints)
        if isinstance(hints, str) and text.lstrip().startswith("{"):
            source = "the hints text"
        else:
            path = Path(hints)
            if not path.is_file():
                raise FileNotFoundError(f"hints file {path} does not exist")
            source, text = str(path), path.read_text()
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{source} must hold a JSON object (polygraphy's ShardHints)")
        return loaded
    raise TypeError(f"hints must be a dict, a JSON file path or JSON text, got {type(hints).__name__}")


def _load_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise FileNotFoundError(f"ONNX model {model} does not exist")
        return onnx.load(str(model))
    raise TypeError(f"model must be an onnx.ModelProto or a path, got {type(model).__name__}")


def _check_hints_against_model(hints: dict, model: onnx.ModelProto) -> None:
    """Polygraphy skips hint entries that name nothing in the graph; we refuse them."""
    graph = model.graph
    tensor_names = {name for node in graph.node for name in node.output}
    tensor_names |= {value.name for value in graph.input}
    input_names = [value.name for value in graph.input]
    output_names = [value.name for value in graph.output]
    for section, names in (("inputs", input_names), ("outputs", output_names)):
        for entry in hints.get(section, []) or []:
            if entry.get("name") not in names:
                raise ValueError(
                    f"hint {section} entry {entry.get('name')!r} is not a model {section[:-1]}; "
                    f"the model's {section} are {names}"
                )
    for layer in hints.get("attention_layers", []) or []:
        if layer.get("q") not in tensor_names:
            raise ValueError(
                f"attention layer hint q={layer.get('q')!r} names no tensor of the model; it must be "
                "the Q tensor feeding the attention's first MatMul"
            )


def _import_shard_tool():
    try:
        from polygraphy.logger import G_LOGGER
        from polygraphy.tools.multi_device.subtool.shard import Shard
    except ImportError as error:
        raise ImportError(
            "sharding needs polygraphy >= 0.53 (with `multi-device shard`) and onnx-graphsurgeon: "
            f"pip install polygraphy onnx-graphsurgeon ({error})"
        ) from error
    return Shard, G_LOGGER


def shard(
    model: onnx.ModelProto | str | os.PathLike,
    hints: Mapping[str, Any] | str | os.PathLike,
    ranks: int | None = None,
    *,
    verbose: bool = False,
) -> onnx.ModelProto:
    """Shard ``model`` for ``ranks`` devices with polygraphy's ``multi-device shard``.

    Args:
        model: the single-device model (``onnx.ModelProto`` or path).
        hints: sharding hints in polygraphy's ShardHints JSON schema (dict, JSON path or text);
            see ``samples/attention_mdtrt/hint.json``.
        ranks: number of devices; overrides ``dist_collectives.nb_rank`` of the hints. ``None``
            keeps the hints' value.
        verbose: let polygraphy log what it inserts.

    Returns:
        The sharded model: every rank runs this same graph (context parallelism).
    """
    hint_dict = load_hints(hints)
    if hint_dict.get("parallelism", "CP") != "CP":
        raise ValueError(
            f"only context parallelism (\"parallelism\": \"CP\") is supported, the hints ask for "
            f"{hint_dict.get('parallelism')!r} (tensor parallelism writes one model per rank)"
        )
    collectives = hint_dict.setdefault(
        "dist_collectives", {"polygraphy_class": "DistCollective", "group_size": 0, "root": -1, "groups": []}
    )
    if ranks is not None:
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        collectives["nb_rank"] = ranks
    if not isinstance(collectives.get("nb_rank"), int) or collectives["nb_rank"] < 1:
        raise ValueError("give ranks, or set dist_collectives.nb_rank in the hints")

    source = _load_model(model)
    _check_hints_against_model(hint_dict, source)
    Shard, logger = _import_shard_tool()

    with tempfile.TemporaryDirectory(prefix="mdtrt-shard-") as workdir:
        source_path = os.path.join(workdir, "single_device.onnx")
        hints_path = os.path.join(workdir, "hints.json")
        sharded_path = os.path.join(workdir, "multi_device.onnx")
        onnx.save(source, source_path)
        with open(hints_path, "w") as file:
            json.dump(hint_dict, file)

        tool = Shard()
        parser = tool.setup_parser()
        args = parser.parse_args([source_path, "-s", hints_path, "-o", sharded_path])
        severity = logger.INFO if verbose else logger.ERROR
        try:
            with logger.verbosity(severity):
                tool.parse(args)
                status = tool.run(args)
        except Exception as error:  # polygraphy reports bad hints with its own exception type
            raise ValueError(f"polygraphy multi-device shard failed: {error}") from error
        finally:
            args.hint_file.close()
        if status not in (0, None) or not os.path.isfile(sharded_path):
            raise RuntimeError(f"polygraphy multi-device shard failed (status {status})")
        return onnx.load(sharded_path)
