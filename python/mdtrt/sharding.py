"""Shard a single-device ONNX attention model for context parallelism on several devices.

Three strategies (see :mod:`mdtrt.context_parallel` for what each moves and holds):

- ``allgather_kv``: ``polygraphy multi-device shard`` (polygraphy >= 0.53) inserts the
  ``DistCollective`` nodes: a reduce-scatter of the inputs along the sequence axis, all-gathers
  of K and V before attention and of the outputs.
- ``ulysses`` and ``ring``: polygraphy shards the inputs and outputs the same way (with the
  attention left local), then :mod:`mdtrt.context_parallel` rewrites each attention layer the
  hints name with onnx-graphsurgeon.

This module checks the hints up front (so that a typo is an error here instead of a silently
unsharded attention layer), runs polygraphy in-process, and after sharding checks that every
attention layer the hints name got the collectives its strategy needs.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import onnx

from . import arguments
from .arguments import input_file
from .context_parallel import STRATEGIES, check_collectives, find_attention_layers, rewrite
from .errors import InvalidArgumentError
from .onnx_graph import load_model, save_model, too_large_to_serialize, toposort_nodes

__all__ = ["shard", "check_hints", "load_hints", "declared_ranks", "toposort_nodes", "STRATEGIES", "HINT_FIELDS", "KNOWN_FIELDS"]

#: The top-level fields of the ShardHints JSON and what each means (errors quote these).
HINT_FIELDS = {
    "parallelism": '"CP" (context parallelism: every rank runs the same graph on its part of the sequence)',
    "attention_layers": 'a list with one {"q": <tensor>, "gather_kv": bool, "gather_q": bool} per attention layer; '
                        "q is the Q tensor feeding the attention's first MatMul",
    "dist_collectives": 'the collectives\' settings: {"nb_rank": ranks, "reduce_op": "max", "root": -1, '
                        '"group_size": 0, "groups": []}',
    "inputs": 'a list of {"name": <model input>, "seq_len_idx": <its sequence axis>, "rank": <its number of axes>}: '
              "inputs split along the sequence",
    "outputs": 'a list of {"name": <model output>, "seq_len_idx": <its sequence axis>, "rank": <its number of '
               'axes>}: outputs gathered along the sequence',
    "k_seq_len_idx": "the sequence axis of K as the attention's first MatMul reads it (3 for K stored transposed "
                     "as (batch, heads, head_dim, sequence), 2 for (batch, heads, sequence, head_dim))",
    "v_seq_len_idx": "the sequence axis of V as the attention's second MatMul reads it (2 for (batch, heads, "
                     "sequence, head_dim))",
    "kv_rank": "the number of axes of Q, K and V at the attention (4 for (batch, heads, sequence, head_dim))",
}
#: The fields each object of the hints may have (polygraphy's ShardHints schema; "strategy" is mdtrt's).
#: Anything else is refused: polygraphy ignores what it does not know, so a misspelt field would
#: silently fall back to its default.
KNOWN_FIELDS = {
    "hints": (*HINT_FIELDS, "strategy", "polygraphy_class"),
    "attention_layers": ("q", "gather_kv", "gather_q", "replace", "polygraphy_class"),
    "dist_collectives": ("nb_rank", "reduce_op", "root", "group_size", "groups", "polygraphy_class"),
    "inputs": ("name", "seq_len_idx", "rank", "polygraphy_class"),
    "outputs": ("name", "seq_len_idx", "rank", "polygraphy_class"),
}
# The input reduce-scatter reduces identical copies of the input: only these leave them unchanged.
_SCATTER_REDUCE_OPS = ("max", "min")


def _hint_error(field: str, problem: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"hints field {field!r} {problem}; it must be {HINT_FIELDS.get(field, 'set')}")


def load_hints(hints: Mapping[str, Any] | str | os.PathLike) -> dict:
    """Return the hints as a dict.

    Parameters
    ----------
    hints : dict, path or str
        A dict in polygraphy's ShardHints JSON schema, a path to such a JSON file, or the JSON
        text itself.

    Raises
    ------
    InvalidArgumentError
        The file does not exist or is a directory, is not valid JSON, or does not hold a JSON
        object.
    """
    if isinstance(hints, Mapping):
        return copy.deepcopy(dict(hints))
    if isinstance(hints, (str, os.PathLike)):
        text = str(hints)
        if isinstance(hints, str) and text.lstrip().startswith("{"):
            source = "the hints text"
        else:
            path = Path(input_file(hints, "hints: file", "give a ShardHints JSON file"))
            source, text = f"hints file {path}", path.read_text()
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidArgumentError(f"{source} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise InvalidArgumentError(f"{source} must hold a JSON object (polygraphy's ShardHints)")
        return loaded
    raise InvalidArgumentError(
        f"hints must be a dict, a JSON file path or JSON text, got {type(hints).__name__}"
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_known_fields(where: str, entry: dict, known_as: str) -> None:
    unknown = [name for name in entry if name not in KNOWN_FIELDS[known_as]]
    if unknown:
        # polygraphy_class is left out of the list: mdtrt fills it in, nobody needs to write it.
        known = ", ".join(name for name in KNOWN_FIELDS[known_as] if name != "polygraphy_class")
        raise InvalidArgumentError(
            f"hints: {where} has unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"the known ones are {known}")


def declared_ranks(hints: Mapping[str, Any], source: str = "the hints") -> int:
    """The hints' ``dist_collectives.nb_rank``, which a hints file must give.

    Raises
    ------
    InvalidArgumentError
        ``dist_collectives.nb_rank`` is missing or not a positive integer.
    """
    collectives = hints.get("dist_collectives")
    declared = collectives.get("nb_rank") if isinstance(collectives, Mapping) else None
    if declared is None:
        raise InvalidArgumentError(
            f"{source} have no dist_collectives.nb_rank: set it to the number of ranks the hints are for")
    return _checked_nb_rank(declared)


def _checked_nb_rank(declared) -> int:
    if not _is_int(declared) or declared < 1:
        raise _hint_error("dist_collectives", f"has nb_rank {declared!r}, not a positive integer")
    return declared


def _check_hints(hints: dict, strategy: str) -> None:
    """Refuse malformed hints with the field and what it means, before polygraphy sees them."""
    _check_known_fields("the top level", hints, "hints")
    if hints.get("parallelism", "CP") != "CP":
        raise InvalidArgumentError(
            f"only context parallelism (\"parallelism\": \"CP\") is supported, the hints ask for "
            f"{hints.get('parallelism')!r} (tensor parallelism writes one model per rank)"
        )
    for field in ("attention_layers", "inputs", "outputs", "k_seq_len_idx", "v_seq_len_idx", "kv_rank"):
        if field not in hints:
            raise _hint_error(field, "is missing")
    kv_rank = hints["kv_rank"]
    if not _is_int(kv_rank) or kv_rank < 2:
        raise _hint_error("kv_rank", f"is {kv_rank!r}")
    if strategy == "ulysses" and kv_rank < 3:
        raise _hint_error("kv_rank", f"is {kv_rank}, and ulysses needs a heads axis before (sequence, head_dim)")
    for field in ("k_seq_len_idx", "v_seq_len_idx"):
        value = hints[field]
        if not _is_int(value) or not 0 <= value < kv_rank:
            raise _hint_error(field, f"is {value!r}, not an axis of the {kv_rank} axes kv_rank gives")
    for field in ("inputs", "outputs"):
        entries = hints[field]
        if not isinstance(entries, list):
            raise _hint_error(field, f"is {type(entries).__name__}")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not _is_int(entry.get("seq_len_idx")):
                raise _hint_error(field, f"has entry {entry!r}")
            _check_known_fields(f"{field} entry {entry['name']!r}", entry, field)
            if entry.get("rank") is not None and not 0 <= entry["seq_len_idx"] < entry["rank"]:
                raise _hint_error(field, f"entry {entry['name']!r} has seq_len_idx {entry['seq_len_idx']} outside "
                                         f"its {entry['rank']} axes")
    layers = hints["attention_layers"]
    if not isinstance(layers, list) or not layers:
        raise _hint_error("attention_layers", "is empty" if isinstance(layers, list) else f"is {layers!r}")
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("q"), str):
            raise _hint_error("attention_layers", f"has entry {layer!r} without a q tensor name")
        _check_known_fields(f"attention layer q={layer['q']!r}", layer, "attention_layers")
        if strategy == "allgather_kv" and layer.get("gather_kv") is not True:
            raise InvalidArgumentError(
                f"attention layer q={layer['q']!r} has gather_kv {json.dumps(layer.get('gather_kv'))}: with the "
                "allgather_kv strategy each "
                "rank would attend to its own part of the sequence only; set \"gather_kv\": true"
            )
        if strategy != "allgather_kv" and layer.get("gather_q", False):
            raise InvalidArgumentError(
                f"attention layer q={layer['q']!r} has gather_q true, which {strategy} does not use (Q stays "
                "sharded); set \"gather_q\": false"
            )
    collectives = hints.setdefault("dist_collectives", {})
    if not isinstance(collectives, dict):
        raise _hint_error("dist_collectives", f"is {collectives!r}")
    _check_known_fields("dist_collectives", collectives, "dist_collectives")
    if collectives.get("nb_rank") is not None:  # not given: shard's ranks sets it
        _checked_nb_rank(collectives["nb_rank"])
    for key, default in (("group_size", 0), ("root", -1), ("groups", []), ("reduce_op", "max")):
        collectives.setdefault(key, default)
    reduce_op = collectives["reduce_op"]
    if reduce_op not in _SCATTER_REDUCE_OPS:
        raise InvalidArgumentError(
            f"hints field 'dist_collectives.reduce_op' is {reduce_op!r}: it is the reduction of the inputs' "
            "reduce-scatter, which every rank feeds the same full input, so only \"max\" or \"min\" leave the "
            "input unchanged (\"sum\" would multiply it by the number of ranks)"
        )


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
                raise InvalidArgumentError(
                    f"hint {section} entry {entry.get('name')!r} is not a model {section[:-1]}; "
                    f"the model's {section} are {names}"
                )
    for layer in hints.get("attention_layers", []) or []:
        if layer.get("q") not in tensor_names:
            raise InvalidArgumentError(
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


def _resolve_ranks(hints: dict, ranks: int | None) -> int:
    collectives = hints.setdefault("dist_collectives", {})
    declared = collectives.get("nb_rank")
    if ranks is not None:
        arguments.rank_count(ranks)
        if declared is not None and declared != ranks:
            raise InvalidArgumentError(
                f"ranks is {ranks} but the hints are for {declared} ranks (dist_collectives.nb_rank); "
                f"set nb_rank to {ranks} in the hints, or shard for {declared} ranks"
            )
        collectives["nb_rank"] = ranks
        return ranks
    if not _is_int(declared) or declared < 1:
        raise InvalidArgumentError("give ranks, or set dist_collectives.nb_rank in the hints")
    return declared


def _resolve_strategy(hints: dict, strategy: str | None) -> str:
    # "strategy" is mdtrt's field: polygraphy's schema has none, so it never reaches polygraphy.
    declared = hints.pop("strategy", None)
    for name, value in (("strategy", strategy), ("hints field 'strategy'", declared)):
        if value is not None:
            arguments.choice(value, name, STRATEGIES)
    if strategy is not None and declared is not None and strategy != declared:
        raise InvalidArgumentError(
            f"strategy is {strategy!r} but the hints say {declared!r}; drop one of them or make them agree"
        )
    return strategy or declared or "allgather_kv"


def _with_polygraphy_classes(hints: dict) -> dict:
    """polygraphy decodes each JSON object by its "polygraphy_class" field and fails obscurely on
    an object without one; the schema position says which class it is, so fill in what is missing."""
    hints = copy.deepcopy(hints)
    hints.setdefault("polygraphy_class", "ShardHints")
    hints.setdefault("parallelism", "CP")
    hints["dist_collectives"].setdefault("polygraphy_class", "DistCollective")
    for layer in hints["attention_layers"]:
        layer.setdefault("polygraphy_class", "AttentionLayerHint")
        layer.setdefault("gather_q", False)
    for entry in [*hints["inputs"], *hints["outputs"]]:
        entry.setdefault("polygraphy_class", "ShardTensor")
    return hints


def _run_polygraphy(source: onnx.ModelProto, hints: dict, verbose: bool) -> onnx.ModelProto:
    Shard, logger, graphsurgeon_logger = _import_shard_tool()
    hints = _with_polygraphy_classes(hints)
    with tempfile.TemporaryDirectory(prefix="mdtrt-shard-") as workdir:
        source_path = os.path.join(workdir, "single_device.onnx")
        hints_path = os.path.join(workdir, "hints.json")
        sharded_path = os.path.join(workdir, "multi_device.onnx")
        save_model(source, source_path)
        with open(hints_path, "w") as file:
            json.dump(hints, file)

        tool = Shard()
        parser = tool.setup_parser()
        # Past protobuf's 2 GiB the sharded model's weights go to a data file beside it.
        large = ["--external-data-path", "multi_device.onnx.data"] if too_large_to_serialize(source) else []
        args = parser.parse_args([source_path, "-s", hints_path, "-o", sharded_path, *large])
        # Both loggers print every pattern-matching step at INFO, and polygraphy prints a critical
        # message before raising it: silent unless asked, the exception below carries the message once.
        saved_severity = graphsurgeon_logger.severity
        graphsurgeon_logger.severity = graphsurgeon_logger.INFO if verbose else graphsurgeon_logger.CRITICAL + 10
        try:
            with logger.verbosity(logger.INFO if verbose else logger.CRITICAL + 10):
                tool.parse(args)
                status = tool.run(args)
        except Exception as error:  # polygraphy reports bad hints with its own exception type
            raise InvalidArgumentError(f"polygraphy multi-device shard failed: {error}") from error
        finally:
            graphsurgeon_logger.severity = saved_severity
            args.hint_file.close()
        if status not in (0, None) or not os.path.isfile(sharded_path):
            raise InvalidArgumentError(f"polygraphy multi-device shard failed (status {status})")
        return onnx.load(sharded_path)


def _checked_hints(hints, strategy: str | None) -> tuple[dict, str]:
    hint_dict = load_hints(hints)
    strategy = _resolve_strategy(hint_dict, strategy)
    _check_hints(hint_dict, strategy)
    return hint_dict, strategy


def check_hints(hints: Mapping[str, Any] | str | os.PathLike, strategy: str | None = None) -> None:
    """What :func:`shard` checks in the hints before it reads the model, for callers that want
    bad hints refused before they build one.

    Raises
    ------
    InvalidArgumentError
        As :func:`shard` for the hints alone: a missing, unknown or out-of-range field, a strategy
        the hints contradict.
    """
    _checked_hints(hints, strategy)


def shard(
    model: onnx.ModelProto | str | os.PathLike,
    hints: Mapping[str, Any] | str | os.PathLike,
    ranks: int | None = None,
    *,
    strategy: str | None = None,
    verbose: bool = False,
) -> onnx.ModelProto:
    """Shard ``model`` for ``ranks`` devices with context parallelism.

    Parameters
    ----------
    model : onnx.ModelProto or path
        The single-device model.
    hints : dict, path or str
        Sharding hints in polygraphy's ShardHints JSON schema (dict, JSON path or text), see
        ``samples/attention_mdtrt/hint.json`` and :data:`HINT_FIELDS`; may carry a
        ``"strategy"`` field (mdtrt's; it is removed before polygraphy reads the hints).
    ranks : int, optional
        Number of devices; must equal the hints' ``dist_collectives.nb_rank`` when both are
        given. ``None`` keeps the hints' value.
    strategy : {"allgather_kv", "ulysses", "ring"}, optional
        How each rank's queries see the whole sequence (:mod:`mdtrt.context_parallel`). Default:
        the hints' ``strategy`` field, else ``"allgather_kv"``.
    verbose : bool
        Let polygraphy log what it inserts.

    Returns
    -------
    onnx.ModelProto
        The sharded model, which every rank runs (inputs and outputs keep their names and full
        shapes: each rank is fed the whole input).

    Raises
    ------
    InvalidArgumentError
        Bad arguments or hints (naming the field and what it means), hints naming tensors the
        model lacks or a tensor that is not an attention's query, ``ulysses`` with a head count
        the ranks do not divide, or a sharded model in which a hinted attention layer lacks a
        collective its strategy needs.
    ImportError
        polygraphy or onnx-graphsurgeon are missing.
    """
    hint_dict, strategy = _checked_hints(hints, strategy)
    ranks = _resolve_ranks(hint_dict, ranks)
    source = load_model(model)
    _check_hints_against_model(hint_dict, source)
    layers = find_attention_layers(source, [layer["q"] for layer in hint_dict["attention_layers"]],
                                   hint_dict["kv_rank"])

    polygraphy_hints = copy.deepcopy(hint_dict)
    if strategy != "allgather_kv":
        # polygraphy then only splits the inputs and gathers the outputs; the attention is ours.
        for layer in polygraphy_hints["attention_layers"]:
            layer["gather_kv"] = layer["gather_q"] = False
    sharded = _run_polygraphy(source, polygraphy_hints, verbose)
    toposort_nodes(sharded.graph)
    _restore_output_names(sharded, list(source.graph.output))
    if strategy != "allgather_kv":
        sharded = rewrite(sharded, layers, hint_dict, ranks, strategy)
        toposort_nodes(sharded.graph)
    check_collectives(sharded, layers, strategy, ranks)
    return sharded
