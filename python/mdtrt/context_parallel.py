"""Context-parallel rewrites of attention layers: Ulysses and Ring, and the per-layer check that a
sharded model got the collectives its strategy needs.

Every strategy starts from the same sequence sharding: each rank keeps ``sequence / ranks`` rows
of the inputs (polygraphy's reduce-scatter, as the hints' ``inputs`` say) and computes its rows of
Q, K and V; the outputs are all-gathered (the hints' ``outputs``). The strategies differ in how a
rank's queries get to see the keys and values of the whole sequence:

``allgather_kv`` (polygraphy's own rewrite)
    K and V are all-gathered before the attention. Per rank and layer it receives
    ``2 (N-1)/N x S x B x H x D`` elements and holds the full K and V.
``ulysses`` (DeepSpeed Ulysses)
    all_to_all turns the sequence-sharded Q, K, V ``(B, H, S/N, D)`` into head-sharded
    ``(B, H/N, S, D)``; each rank attends over the whole sequence for its ``H/N`` heads, and a
    second all_to_all turns the result back. It moves ``4 (N-1)/N x S/N x B x H x D`` elements per
    rank and layer (Q, K, V and the output, each ``(N-1)/N`` of a rank's shard): the same as
    ``allgather_kv`` on 2 ranks, ``2/N`` of it beyond. Needs ``heads % ranks == 0``.
``ring``
    K/V chunks are streamed: in step ``t`` every rank receives rank ``t``'s K and V chunk and
    folds it into an online softmax (running max ``m``, running sum ``l`` of ``exp(s - m)``,
    i.e. the log-sum-exp ``m + log l``, and the un-normalised output), accumulated in float32
    whatever the model's dtype. No rank ever holds more than one remote chunk of K and V.

    ONNX has no point-to-point send/receive, and the sharded graph is the same on every rank (it
    cannot name "my neighbour"). The ring step is therefore a DistCollective ``broadcast`` with
    ``root = t``: the bytes each rank receives are those of a ring (``(N-1)/N`` of K and V), but a
    step is one root sending to all, which on more than two ranks uses the links less evenly than
    a ring pass would (an all_to_all rotation would send ``N-1`` times more bytes, mostly zeros).

    The online softmax is written with elementary ONNX ops (MatMul, ReduceMax, Exp, ReduceSum),
    which TensorRT does not fuse into its flash-attention kernel as it does the plain
    MatMul -> Softmax -> MatMul chain: each step materialises its ``(S/N) x (S/N)`` float32
    scores per head. Ring therefore bounds K/V memory, not the scores' memory; at long sequences
    on few ranks ulysses or allgather_kv (fused attention) are the faster and smaller choice.

The graph rewriting uses onnx-graphsurgeon; the ``DistCollective`` nodes carry the attributes
polygraphy writes (``collective_operation``, ``reduce_op``, ``root``, ``nb_rank``,
``group_size``, ``groups``, default ONNX domain), which is what TensorRT's ONNX parser and
:func:`mdtrt.simulate` read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from . import arguments
from .errors import InvalidArgumentError

__all__ = ["STRATEGIES", "AttentionLayer", "find_attention_layers", "rewrite", "check_collectives", "traffic_per_rank"]

#: The context-parallel strategies :func:`mdtrt.shard` knows.
STRATEGIES = ("allgather_kv", "ulysses", "ring")

DIST_COLLECTIVE = "DistCollective"
# Nodes that only move or retype data: a collective reached through them still acts on the tensor.
_DATA_MOVEMENT = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"})


@dataclass(frozen=True)
class AttentionLayer:
    """Tensor names of one ``MatMul(Q, K) -> Softmax -> MatMul(P, V)`` attention layer."""

    q: str
    k: str
    v: str
    output: str
    dtype: np.dtype
    heads: int | None  # size of the heads axis (kv_rank - 3) when the model fixes it


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name:
                found.setdefault(name, []).append((node, index))
    return found


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def find_attention_layers(model: onnx.ModelProto, q_names: list[str], kv_rank: int) -> list[AttentionLayer]:
    """The attention layers whose query tensors are ``q_names``, in the single-device model.

    Raises
    ------
    InvalidArgumentError
        When a name is not the first input of a ``MatMul`` that feeds a ``Softmax`` over the last
        axis that feeds a second ``MatMul`` (the pattern polygraphy matches too).
    """
    consumers = _consumers(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except ValueError:  # past protobuf's 2 GiB: the types of Q come from the graph input instead
        inferred = model
    types = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                   *inferred.graph.output]}
    first_input = next((v.type.tensor_type.elem_type for v in model.graph.input), 0)
    layers = []
    for q in q_names:
        uses = consumers.get(q, [])
        matmul = next((n for n, i in uses if n.op_type == "MatMul" and i == 0), None)
        softmax = None
        if matmul is not None:
            softmax = next((n for n, _ in consumers.get(matmul.output[0], []) if n.op_type == "Softmax"), None)
        second = None
        if softmax is not None:
            second = next((n for n, i in consumers.get(softmax.output[0], []) if n.op_type == "MatMul" and i == 0), None)
        if second is None:
            feeds = sorted({f"{n.op_type} {n.name or n.output[0]!r} (input {i})" for n, i in uses}) or ["nothing"]
            raise InvalidArgumentError(
                f"attention layer hint q={q!r} is not the query of an attention layer: it must be the first "
                f"input of a MatMul -> Softmax -> MatMul chain (Q @ K, softmax, @ V), but it feeds "
                f"{', '.join(feeds)}; give the tensor that feeds the attention's first MatMul"
            )
        axis = _attribute(softmax, "axis", -1)
        if axis not in (-1, kv_rank - 1):
            raise InvalidArgumentError(
                f"attention layer q={q!r}: its Softmax runs over axis {axis}; context parallelism needs the "
                f"softmax over the key axis, the last one (-1 or {kv_rank - 1})"
            )
        q_type = types.get(q)
        elem_type = q_type.elem_type if q_type is not None and q_type.elem_type else first_input
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type or onnx.TensorProto.FLOAT))
        heads = None
        if q_type is not None and q_type.HasField("shape") and len(q_type.shape.dim) == kv_rank and kv_rank >= 3:
            dim = q_type.shape.dim[kv_rank - 3]
            heads = dim.dim_value if dim.HasField("dim_value") else None
        layers.append(AttentionLayer(q, matmul.input[1], second.input[1], second.output[0], dtype, heads))
    return layers


# -- graph building -----------------------------------------------------------------------------

class _Builder:
    """Adds nodes to a graphsurgeon graph with unique names, DistCollectives as polygraphy writes them."""

    def __init__(self, graph, collective_attrs: dict, prefix: str):
        import onnx_graphsurgeon as gs

        self.gs = gs
        self.graph = graph
        self.collective_attrs = collective_attrs
        self.prefix = prefix
        self.opset = graph.opset
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}_{what}_{self.count}"

    def op(self, op_type, inputs, attrs=None, dtype=None, output=None):
        out = output if output is not None else self.gs.Variable(self.name(op_type.lower()), dtype=dtype)
        self.graph.nodes.append(self.gs.Node(op_type, name=self.name(op_type), inputs=list(inputs), outputs=[out],
                                             attrs=attrs or {}))
        return out

    def const(self, values, dtype=np.int64):
        return self.gs.Constant(self.name("const"), np.asarray(values, dtype=dtype))

    def collective(self, x, operation, *, root=-1, output=None):
        attrs = dict(self.collective_attrs, collective_operation=operation, reduce_op="none", root=int(root))
        return self.op(DIST_COLLECTIVE, [x], attrs, dtype=x.dtype, output=output)

    def dims(self, x, start, end=None):
        """``Shape(x)[start:end]`` (Slice, so that any opset >= 10 works)."""
        shape = self.op("Shape", [x], dtype=np.int64)
        stop = np.iinfo(np.int64).max if end is None else end
        return self.op("Slice", [shape, self.const([start]), self.const([stop])], dtype=np.int64)

    def reduce(self, op_type, x, dtype):
        # ReduceSum takes its axes as an input since opset 13, the other reductions since 18.
        if op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self.op(op_type, [x, self.const([-1])], {"keepdims": 1}, dtype=dtype)
        return self.op(op_type, [x], {"axes": [-1], "keepdims": 1}, dtype=dtype)

    def all_to_all(self, x, rank: int, split_axis: int, concat_axis: int, ranks: int, output=None):
        """The all_to_all that splits ``split_axis`` over the ranks and gathers ``concat_axis``
        (chunk ``j`` of ``split_axis`` goes to rank ``j``; what rank ``i`` sent lands as block ``i``
        of ``concat_axis``). DistCollective runs along dimension 0, so ``split_axis`` is moved there
        first; the received blocks (source rank outermost) are then moved in front of
        ``concat_axis`` and merged with it."""
        others = [axis for axis in range(rank) if axis != split_axis]
        if split_axis != 0:
            x = self.op("Transpose", [x], {"perm": [split_axis, *others]}, dtype=x.dtype)
        received = self.collective(x, "all_to_all")
        # (N * split/N, rest...) -> (N, split/N, rest...): the source rank gets its own axis.
        split = self.op("Reshape", [received, self.op("Concat", [self.const([ranks, -1]), self.dims(received, 1)],
                                                    {"axis": 0}, dtype=np.int64)], dtype=x.dtype)
        position = {split_axis: 1, **{axis: 2 + index for index, axis in enumerate(others)}}
        perm = []
        for axis in range(rank):
            if axis == concat_axis:
                perm.append(0)
            perm.append(position[axis])
        moved = self.op("Transpose", [split], {"perm": perm}, dtype=x.dtype)
        # Merge (N, concat) into one axis; Reshape's 0 keeps the leading sizes as they are.
        head = self.const([0] * concat_axis + [-1])
        if concat_axis + 1 < rank:
            shape = self.op("Concat", [head, self.dims(moved, concat_axis + 2)], {"axis": 0}, dtype=np.int64)
        else:
            shape = head
        return self.op("Reshape", [moved, shape], dtype=x.dtype, output=output)


def _detach(node) -> None:
    node.inputs.clear()
    node.outputs.clear()


def _ulysses(builder: _Builder, tensors: dict, layer: AttentionLayer, hints: dict, ranks: int) -> None:
    kv_rank = hints["kv_rank"]
    heads_axis, q_seq = kv_rank - 3, kv_rank - 2
    first = next(n for n in tensors[layer.q].outputs if n.op == "MatMul" and n.inputs[0] is tensors[layer.q])
    output = tensors[layer.output]
    second = output.inputs[0]
    q, k, v = first.inputs[0], first.inputs[1], second.inputs[1]
    first.inputs[0] = builder.all_to_all(q, kv_rank, heads_axis, q_seq, ranks)
    first.inputs[1] = builder.all_to_all(k, kv_rank, heads_axis, hints["k_seq_len_idx"], ranks)
    second.inputs[1] = builder.all_to_all(v, kv_rank, heads_axis, hints["v_seq_len_idx"], ranks)
    local = builder.gs.Variable(builder.name("heads_local_output"), dtype=output.dtype)
    second.outputs = [local]
    builder.all_to_all(local, kv_rank, q_seq, heads_axis, ranks, output=output)


def _ring(builder: _Builder, tensors: dict, layer: AttentionLayer, ranks: int) -> None:
    first = next(n for n in tensors[layer.q].outputs if n.op == "MatMul" and n.inputs[0] is tensors[layer.q])
    softmax = next(n for n in first.outputs[0].outputs if n.op == "Softmax")
    output = tensors[layer.output]
    second = output.inputs[0]
    for what, tensor in (("scores", first.outputs[0]), ("probabilities", softmax.outputs[0])):
        readers = [n.name or n.op for n in tensor.outputs]
        if len(readers) != 1:
            raise InvalidArgumentError(
                f"ring replaces attention layer q={layer.q!r} by chunk-wise steps, so its {what} "
                f"({tensor.name!r}) never exist whole, but they are also read by {readers}; use ulysses or allgather_kv"
            )
    q, k, v = first.inputs[0], first.inputs[1], second.inputs[1]
    dtype = layer.dtype
    wide = np.float32 if dtype.itemsize < 4 else dtype.type
    to_wide = (lambda x: builder.op("Cast", [x], {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(wide))},
                                    dtype=wide)) if wide is not dtype.type else (lambda x: x)
    for node in (first, softmax, second):
        _detach(node)
    running_max = running_sum = accumulated = None
    for step in range(ranks):
        k_chunk = builder.collective(k, "broadcast", root=step)
        v_chunk = builder.collective(v, "broadcast", root=step)
        scores = to_wide(builder.op("MatMul", [q, k_chunk], dtype=dtype))
        chunk_max = builder.reduce("ReduceMax", scores, wide)
        if running_max is None:
            new_max = chunk_max
        else:
            new_max = builder.op("Max", [running_max, chunk_max], dtype=wide)
        weights = builder.op("Exp", [builder.op("Sub", [scores, new_max], dtype=wide)], dtype=wide)
        chunk_sum = builder.reduce("ReduceSum", weights, wide)
        if wide is dtype.type:
            chunk_out = builder.op("MatMul", [weights, v_chunk], dtype=wide)
        else:
            # exp(s - max) lies in [0, 1]: the P @ V product runs in the model's dtype, as flash
            # attention's does (tensor cores, no widened copy of V), and is accumulated in float32.
            narrow = builder.op("Cast", [weights], {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)}, dtype=dtype)
            chunk_out = to_wide(builder.op("MatMul", [narrow, v_chunk], dtype=dtype))
        if running_max is None:
            running_sum, accumulated = chunk_sum, chunk_out
        else:
            # exp(m_old - m_new) <= 1 rescales what was summed against the old maximum.
            rescale = builder.op("Exp", [builder.op("Sub", [running_max, new_max], dtype=wide)], dtype=wide)
            running_sum = builder.op("Add", [builder.op("Mul", [running_sum, rescale], dtype=wide), chunk_sum],
                                     dtype=wide)
            accumulated = builder.op("Add", [builder.op("Mul", [accumulated, rescale], dtype=wide), chunk_out],
                                     dtype=wide)
        running_max = new_max
    if wide is dtype.type:
        builder.op("Div", [accumulated, running_sum], dtype=dtype, output=output)
    else:
        normalised = builder.op("Div", [accumulated, running_sum], dtype=wide)
        builder.op("Cast", [normalised], {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)}, dtype=dtype,
                   output=output)


def rewrite(model: onnx.ModelProto, layers: list[AttentionLayer], hints: dict, ranks: int,
            strategy: str) -> onnx.ModelProto:
    """Rewrite the attention ``layers`` of a sequence-sharded model for ``strategy``.

    Parameters
    ----------
    model : onnx.ModelProto
        The model as polygraphy shards it without K/V gathers: inputs scattered along the
        sequence, outputs gathered, each attention over the rank's own rows only.
    layers : list of AttentionLayer
        The layers to rewrite (:func:`find_attention_layers` of the single-device model; the
        tensor names are the same).
    hints : dict
        The ShardHints (``kv_rank``, ``k_seq_len_idx``, ``v_seq_len_idx``, ``dist_collectives``).
    ranks : int
        Number of ranks (``nb_rank`` of every inserted DistCollective).
    strategy : {"ulysses", "ring"}

    Returns
    -------
    onnx.ModelProto
        A new model; nodes may need :func:`mdtrt.onnx_graph.toposort_nodes`.

    Raises
    ------
    InvalidArgumentError
        ulysses with a head count ``ranks`` does not divide; ring on a layer whose scores or
        probabilities are read by other nodes too.
    """
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for node in graph.nodes:
        if node.op == DIST_COLLECTIVE:  # re-added on export: graphsurgeon cannot export an empty list
            node.attrs.pop("groups", None)
    tensors = graph.tensors()
    collectives = hints["dist_collectives"]
    attrs = {"group_size": int(collectives.get("group_size", 0) or 0), "nb_rank": int(ranks)}
    for index, layer in enumerate(layers):
        builder = _Builder(graph, attrs, f"{strategy}{index}")
        if strategy == "ulysses":
            if layer.heads is not None and layer.heads % ranks:
                raise InvalidArgumentError(
                    f"ulysses shards the heads over the ranks: attention layer q={layer.q!r} has {layer.heads} heads "
                    f"(axis {hints['kv_rank'] - 3}), which {ranks} ranks do not divide; use a rank count that "
                    f"divides {layer.heads}, or the ring or allgather_kv strategy"
                )
            _ulysses(builder, tensors, layer, hints, ranks)
        else:
            _ring(builder, tensors, layer, ranks)
    graph.cleanup()
    sharded = gs.export_onnx(graph)
    sharded.ir_version = model.ir_version
    groups = [int(g) for g in collectives.get("groups") or []]
    for node in sharded.graph.node:
        # graphsurgeon cannot type an empty list attribute; polygraphy appends `groups` the same way.
        if node.op_type == DIST_COLLECTIVE and not any(a.name == "groups" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("groups", groups, attr_type=onnx.AttributeProto.INTS))
    return sharded


# -- checking -----------------------------------------------------------------------------------

def _reached(model: onnx.ModelProto, start: str, downstream: bool) -> list[onnx.NodeProto]:
    """DistCollective nodes reached from tensor ``start`` through data-movement nodes only."""
    found, seen, frontier = [], {start}, [start]
    producers = {name: node for node in model.graph.node for name in node.output}
    consumers = _consumers(model)
    while frontier:
        name = frontier.pop()
        if downstream:
            nodes = [node for node, index in consumers.get(name, []) if index == 0]
        else:
            nodes = [producers[name]] if name in producers else []
        for node in nodes:
            if node.op_type == DIST_COLLECTIVE:
                found.append(node)
            elif node.op_type in _DATA_MOVEMENT:
                for nxt in (node.output if downstream else node.input[:1]):
                    if nxt and nxt not in seen:
                        seen.add(nxt)
                        frontier.append(nxt)
    return found


def check_collectives(model: onnx.ModelProto, layers: list[AttentionLayer], strategy: str, ranks: int) -> None:
    """Refuse a sharded model in which an attention layer lacks a collective its strategy needs.

    Raises
    ------
    InvalidArgumentError
        Naming the layer (its Q tensor) and each missing collective.
    """
    for layer in layers:
        missing = []

        def operations(name, downstream=True):
            return [(_attribute(n, "collective_operation"), int(_attribute(n, "root", -1)))
                    for n in _reached(model, name, downstream)]

        if strategy == "allgather_kv":
            for what, name in (("K", layer.k), ("V", layer.v)):
                if not any(op == "all_gather" for op, _ in operations(name)):
                    missing.append(f"an all_gather of {what} ({name!r})")
        elif strategy == "ulysses":
            for what, name in (("Q", layer.q), ("K", layer.k), ("V", layer.v)):
                if not any(op == "all_to_all" for op, _ in operations(name)):
                    missing.append(f"an all_to_all of {what} ({name!r}) from sequence to head shards")
            if not any(op == "all_to_all" for op, _ in operations(layer.output, downstream=False)):
                missing.append(f"an all_to_all of the attention output ({layer.output!r}) back to sequence shards")
        else:
            for what, name in (("K", layer.k), ("V", layer.v)):
                roots = {root for op, root in operations(name) if op == "broadcast"}
                if roots != set(range(ranks)):
                    missing.append(f"a broadcast of {what} ({name!r}) from every rank 0..{ranks - 1} "
                                   f"(found roots {sorted(roots)})")
        if missing:
            raise InvalidArgumentError(
                f"sharding for {strategy} left attention layer q={layer.q!r} without {'; '.join(missing)}: "
                "the model would compute each rank's attention over part of the sequence only. Check that the "
                "hints' q names the tensor feeding the attention's first MatMul and the sequence axes are right"
            )


def traffic_per_rank(strategy: str, *, sequence: int, batch: int, heads: int, head_dim: int, itemsize: int,
                     ranks: int) -> dict:
    """What one rank moves and holds for one attention layer (the inputs' scatter and the
    outputs' gather, the same for every strategy, are not counted).

    Parameters
    ----------
    strategy : str
        One of :data:`STRATEGIES` (allgather_kv, ulysses, ring).
    sequence, batch, heads, head_dim : int
        The full (unsharded) attention sizes: Q, K and V each hold ``sequence * batch * heads *
        head_dim`` elements.
    itemsize : int
        Bytes per element of Q, K and V (2 for float16).
    ranks : int
        Ranks the sequence is split across.

    Returns
    -------
    dict
        ``received_bytes``: bytes a rank receives from the others; ``kv_bytes``: bytes of K and V
        a rank holds at once (for ``ring`` its own chunk plus one remote chunk: TensorRT may
        schedule the broadcasts earlier and hold more, the graph never asks for more);
        ``scores_bytes``: float32 attention scores one step materialises (``ring`` only: the other
        strategies keep the MatMul -> Softmax -> MatMul chain TensorRT fuses).

    Raises
    ------
    InvalidArgumentError
        An unknown ``strategy``.
    """
    arguments.choice(strategy, "strategy", STRATEGIES)
    full = sequence * batch * heads * head_dim * itemsize  # one of Q, K, V over the whole sequence
    share = (ranks - 1) / ranks
    if strategy == "allgather_kv":
        return {"received_bytes": int(2 * share * full), "kv_bytes": 2 * full, "scores_bytes": 0}
    if strategy == "ulysses":
        return {"received_bytes": int(4 * share * full / ranks), "kv_bytes": 2 * full // ranks, "scores_bytes": 0}
    rows = sequence // ranks
    return {"received_bytes": int(2 * share * full), "kv_bytes": min(2, ranks) * 2 * full // ranks,
            "scores_bytes": batch * heads * rows * rows * 4}
