"""ONNX graph facts shared by sharding and CPU simulation: what a node reads (its subgraphs'
reads of the outer graph included), a topological order, and loading models that may carry
external data or be too large for one protobuf message.
"""

from __future__ import annotations

import heapq
import os
from typing import Iterable

import onnx

from .arguments import input_file
from .errors import InvalidArgumentError

__all__ = ["PROTOBUF_LIMIT", "node_inputs", "outer_scope_inputs", "toposort_nodes", "load_model",
           "has_external_data", "too_large_to_serialize", "save_model"]

# Protobuf refuses to serialize a message of 2 GiB or more; models past it keep their weights in
# external data files. A module constant, so that tests can exercise the large-model path with small
# models.
PROTOBUF_LIMIT = 2**31 - 1


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _graph_outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Names `graph` (a subgraph) reads without defining them: values of an enclosing scope."""
    defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    defined |= {i.values.name for i in graph.sparse_initializer}
    reads: list[str] = []
    for node in graph.node:
        defined.update(name for name in node.output if name)
    for node in graph.node:
        reads.extend(name for name in node_inputs(node) if name not in defined)
    reads.extend(v.name for v in graph.output if v.name not in defined)
    return reads


def outer_scope_inputs(node: onnx.NodeProto) -> list[str]:
    """Names that the subgraphs of ``node`` (If branches, Loop and Scan bodies, nested ones too)
    read from the graph around the node, in first-read order without repeats.

    Parameters
    ----------
    node : onnx.NodeProto

    Returns
    -------
    list of str
        Tensor names; empty for a node without GRAPH or GRAPHS attributes.
    """
    seen: dict[str, None] = {}
    for graph in _subgraphs(node):
        for name in _graph_outer_reads(graph):
            seen.setdefault(name, None)
    return list(seen)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor ``node`` reads: its inputs and what its subgraphs read from the outer graph.
    A subgraph's outer reads are inputs of the node that holds it: they must be computed first.

    Parameters
    ----------
    node : onnx.NodeProto

    Returns
    -------
    list of str
        ``node.input`` without empty (omitted optional) names, then the outer reads not already
        listed, without repeats.
    """
    names = [name for name in node.input if name]
    extra = [name for name in outer_scope_inputs(node) if name not in names]
    return names + extra


def toposort_nodes(graph: onnx.GraphProto) -> None:
    """Sort ``graph.node`` in place into a topological order (stable: ready nodes keep their
    relative order). ``polygraphy multi-device shard`` appends the nodes it inserts at the end
    of the list, which onnxruntime and TensorRT's parser refuse. Tensors a node's subgraphs read
    from the outer graph count as inputs of the node.

    Parameters
    ----------
    graph : onnx.GraphProto
        Changed in place, only when its order is not topological already.

    Raises
    ------
    InvalidArgumentError
        The graph has a cycle.
    """
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    waiting_on = [
        {producer[name] for name in node_inputs(node) if name in producer and producer[name] != index}
        for index, node in enumerate(nodes)
    ]
    consumers: dict[int, list[int]] = {index: [] for index in range(len(nodes))}
    for index, needs in enumerate(waiting_on):
        for need in needs:
            consumers[need].append(index)
    ready = [index for index, needs in enumerate(waiting_on) if not needs]
    order = []
    heapq.heapify(ready)
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for consumer in consumers[index]:
            waiting_on[consumer].discard(index)
            if not waiting_on[consumer]:
                heapq.heappush(ready, consumer)
    if len(order) != len(nodes):
        placed = set(order)
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if i not in placed]
        raise InvalidArgumentError(f"the graph has a cycle through nodes {stuck[:5]}")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer of the main graph still points at an external data file.

    Parameters
    ----------
    model : onnx.ModelProto

    Returns
    -------
    bool
    """
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def too_large_to_serialize(model: onnx.ModelProto) -> bool:
    """Whether protobuf would refuse to serialize ``model`` in one message.

    Parameters
    ----------
    model : onnx.ModelProto

    Returns
    -------
    bool
        ``model.ByteSize() >= PROTOBUF_LIMIT`` (2**31 - 1 bytes, protobuf's limit for one message).
    """
    return model.ByteSize() >= PROTOBUF_LIMIT


def load_model(model, *, argument: str = "model") -> onnx.ModelProto:
    """``model`` as an ``onnx.ModelProto``: returned as is, or loaded from a path together with
    its external data files (which must sit where the model's ``location`` entries say, relative
    to the model's folder).

    Parameters
    ----------
    model : onnx.ModelProto, str or os.PathLike
        A model, or the path of an .onnx file.
    argument : str, optional
        How error messages name ``model`` (default "model").

    Returns
    -------
    onnx.ModelProto
        ``model`` itself when it is one; else the loaded model with its weights in memory.

    Raises
    ------
    InvalidArgumentError
        ``model`` is neither a ModelProto nor a path, the file does not exist, is not an ONNX
        model, or its external data cannot be read (also a ModelProto whose weights were left in
        external files). The message names ``argument``.
    """
    if isinstance(model, onnx.ModelProto):
        external = [init for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            # The file these point at is relative to a folder this ModelProto does not know.
            location = next((e.value for e in external[0].external_data if e.key == "location"), "?")
            raise InvalidArgumentError(
                f"{argument}: initializer {external[0].name!r} (and {len(external) - 1} more) keeps its data in "
                f"an external file ({location!r}) that this ModelProto cannot find: pass the model's path instead, "
                "or load the data first (onnx.load(path) does)")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"{argument} must be an onnx.ModelProto or the path of an .onnx file, got {type(model).__name__}")
    path = input_file(model, f"{argument}: ONNX model file", "give the path of an .onnx file or an onnx.ModelProto")
    try:
        loaded = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and kin: not an ONNX file
        raise InvalidArgumentError(f"{argument}: {path} is not a readable ONNX model ({error})") from None
    if has_external_data(loaded):
        try:
            onnx.load_external_data_for_model(loaded, os.path.dirname(os.path.abspath(path)))
        except Exception as error:  # onnx raises ValidationError, OSError, ... for a missing or short file
            raise InvalidArgumentError(
                f"{argument}: {path} refers to external data that cannot be read ({error}); keep the data files "
                "next to the model, where it was saved with them") from None
    return loaded


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path``; a model too large for one protobuf message keeps its weights in
    ``<path>.data`` beside it (ONNX's external data). The caller's model is left unchanged.

    Parameters
    ----------
    model : onnx.ModelProto
    path : str or os.PathLike
        The .onnx file to write; its folder must exist.

    Raises
    ------
    OSError
        The file (or its ``.data`` file) cannot be written.
    """
    path = os.fspath(path)
    if not too_large_to_serialize(model):
        onnx.save(model, path)
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data moves the weights out of the message it is given
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)
