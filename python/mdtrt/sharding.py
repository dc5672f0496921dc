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

from .onnx_graph import load_model, save_model, too_large_to_serialize, toposort_nodes

__all__ = ["shard", "load_hints", "toposort_nodes"]

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


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new
    for value in list(graph.value_info) + list(graph.output):
        if value.name == old:
            value.name = new


def _restore_output_names(sharded: onnx.ModelProto, original_outputs: list[onnx.ValueInfoProto]) -> None:
    """Polygraphy names a gathered output after its DistCollective (``shard_41``) and leaves the
    original name on the rank-local tensor. Give the model outputs their original names back,
    so that single- and multi-device models have the same interface, and call the rank-local
    tensor ``<name>.rank_local``."""
    graph = sharded.graph
    for index, original_value in enumerate(original_outputs):
        original = original_value.name
        current = graph.output[index].name
        if current == original:
            continue
        _rename_tensor(graph, original, f"{original}.rank_local")
        _rename_tensor(graph, current, original)
        # The gathered output has the original's full shape; polygraphy leaves it unset.
        if not graph.output[index].type.tensor_type.HasField("shape"):
            graph.output[index].type.CopyFrom(original_value.type)


def _import_shard_tool():
    try:
        import onnx_graphsurgeon as gs
        from polygraphy.logger import G_LOGGER
        from polygraphy.tools.multi_device.subtool.shard import Shard
    except ImportError as error:
        raise ImportError(
            "sharding needs polygraphy >= 0.53 (with `multi-device shard`) and onnx-graphsurgeon: "
            f"pip install polygraphy onnx-graphsurgeon ({error})"
        ) from error
    return Shard, G_LOGGER, gs.logger.G_LOGGER


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

    source = load_model(model)
    _check_hints_against_model(hint_dict, source)
    Shard, logger, graphsurgeon_logger = _import_shard_tool()

    with tempfile.TemporaryDirectory(prefix="mdtrt-shard-") as workdir:
        source_path = os.path.join(workdir, "single_device.onnx")
        hints_path = os.path.join(workdir, "hints.json")
        sharded_path = os.path.join(workdir, "multi_device.onnx")
        save_model(source, source_path)
        with open(hints_path, "w") as file:
            json.dump(hint_dict, file)

        tool = Shard()
        parser = tool.setup_parser()
        # Past protobuf's 2 GiB the sharded model's weights go to a data file beside it.
        large = ["--external-data-path", "multi_device.onnx.data"] if too_large_to_serialize(source) else []
        args = parser.parse_args([source_path, "-s", hints_path, "-o", sharded_path, *large])
        # Both loggers print every pattern-matching step at INFO; keep them quiet unless asked.
        saved_severity = graphsurgeon_logger.severity
        graphsurgeon_logger.severity = graphsurgeon_logger.INFO if verbose else graphsurgeon_logger.ERROR
        try:
            with logger.verbosity(logger.INFO if verbose else logger.ERROR):
                tool.parse(args)
                status = tool.run(args)
        except Exception as error:  # polygraphy reports bad hints with its own exception type
            raise ValueError(f"polygraphy multi-device shard failed: {error}") from error
        finally:
            graphsurgeon_logger.severity = saved_severity
            args.hint_file.close()
        if status not in (0, None) or not os.path.isfile(sharded_path):
            raise RuntimeError(f"polygraphy multi-device shard failed (status {status})")
        sharded = onnx.load(sharded_path)
    toposort_nodes(sharded.graph)
    _restore_output_names(sharded, list(source.graph.output))
    return sharded
