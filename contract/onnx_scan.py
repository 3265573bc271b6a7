"""Find every tensor in a serialized ONNX model that keeps its data outside the model (external
data), without onnx or protobuf: a bundle's graph is untrusted, and the runtime must know every
file a graph could make onnxruntime read before it hands the graph over.

The wire format is walked directly. Tensors can sit in a graph's initializers and sparse
initializers, in node attributes (``t``, ``tensors``, sparse tensors: a ``Constant`` node), and
in graphs nested in attributes (``If``, ``Loop``, ``Scan``), in model-local functions (their
nodes and their attributes' default values) and in the training-info graphs; all are visited.
Field numbers are ONNX's (``onnx/onnx.proto``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LOOP_OPS", "ExternalRef", "Graph", "OnnxScanError", "external_data_refs",
           "main_graph", "op_types", "sized_by_values"]

# ops that repeat a subgraph a data-given number of times: the exporter never writes one (and
# refuses a model with one), the runtime refuses a bundle graph with one (a tampered graph
# could run a step for ever)
LOOP_OPS = frozenset({"Loop", "Scan", "SequenceMap"})

# message type -> {field number: message type of that (length-delimited) field}
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto: initialization, algorithm
    "function": {7: "node", 11: "attribute"},  # 11: attribute_proto (default attribute values)
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
_MAX_DEPTH = 64


class OnnxScanError(ValueError):
    """The bytes are not a well-formed ONNX protobuf message."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str
    location: str | None
    offset: int
    length: int | None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxScanError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(field number, wire type, value or (start, end)) of one message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:  # illegal in protobuf (a session 46 probe hid an ORT model's header so)
            raise OnnxScanError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise OnnxScanError("length-delimited field runs past its message")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise OnnxScanError(f"unsupported wire type {wire}")
    if pos != end:
        raise OnnxScanError("message overruns its length")


def _tensor(buf: bytes, start: int, end: int) -> ExternalRef | None:
    name, location, external = "", None, False
    entries: dict[str, str] = {}
    for field, wire, value in _fields(buf, start, end):
        if field == 8 and wire == 2:
            name = buf[value[0]:value[1]].decode("utf-8", "replace")
        elif field == 14 and wire == 0:
            external = value == 1
        elif field == 13 and wire == 2:
            key = val = ""
            for f2, w2, v2 in _fields(buf, *value):
                if w2 == 2 and f2 in (1, 2):
                    text = buf[v2[0]:v2[1]].decode("utf-8", "replace")
                    key, val = (text, val) if f2 == 1 else (key, text)
            entries[key] = val
    if not external and not entries:
        return None
    location = entries.get("location")

    def num(k: str) -> int | None:  # plain decimal digits, as onnx writes them; else -1
        if k not in entries:
            return None
        text = entries[k]
        return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else -1

    return ExternalRef(name, location, num("offset") or 0, num("length"))


def _walk(buf: bytes, start: int, end: int, kind: str, depth: int, out: list,
          ops: set | None = None) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxScanError("graphs nested too deeply")
    if kind == "tensor":
        ref = _tensor(buf, start, end)
        if ref is not None:
            out.append(ref)
        return
    sub = _SCHEMA[kind]
    for field, wire, value in _fields(buf, start, end):
        if wire == 2 and field in sub:
            _walk(buf, value[0], value[1], sub[field], depth + 1, out, ops)
        elif ops is not None and kind == "node" and field == 4 and wire == 2:  # op_type
            ops.add(buf[value[0]:value[1]].decode("utf-8", "replace"))


def external_data_refs(model: bytes) -> list[ExternalRef]:
    """Every tensor of the serialized ``model`` whose data is external, with its location,
    offset and length (as the file states them).

    Raises:
        OnnxScanError: the bytes are not a well-formed ONNX model.
    """
    out: list[ExternalRef] = []
    _walk(model, 0, len(model), "model", 0, out)
    return out


def op_types(model: bytes) -> set[str]:
    """Every node op type in the serialized ``model``, nested graphs and functions included.

    Raises:
        OnnxScanError: the bytes are not a well-formed ONNX model.
    """
    ops: set[str] = set()
    _walk(model, 0, len(model), "model", 0, [], ops)
    return ops


# Value-sized tensors (a session 44 probe): the inputs of each op whose *values* set the size of
# what it makes (or, for If, which branch runs); None: every input. A bundle's graphs size their
# tensors by the data's shapes only; a graph that sized one by the trainable weights' values
# passed the planning probes at the initial weights, then grew past any budget once they moved
# (a Unique's working memory is outside onnxruntime's capped arena).
SIZED_BY: dict[str, tuple[int, ...] | None] = {
    "Range": None, "ConstantOfShape": (0,), "Expand": (1,), "Tile": (1,), "Reshape": (1,),
    "Slice": (1, 2, 3, 4), "Pad": (1,), "Resize": (2, 3), "Upsample": (1,), "OneHot": (1,),
    "TopK": (1,), "NonZero": (0,), "Unique": (0,), "Compress": (1,), "Split": (1,),
    "CenterCropPad": (1,), "NonMaxSuppression": None, "If": (0,), "Loop": None, "Scan": None,
    "HannWindow": (0,), "HammingWindow": (0,), "BlackmanWindow": (0,), "Col2Im": (1, 2),
    "MaxUnpool": (2,), "AffineGrid": (1,), "DFT": (1, 2), "STFT": (1, 2, 3),
    "MelWeightMatrix": None, "SplitToSequence": (1,), "StringSplit": None}
_SHAPE_ONLY = frozenset({"Shape", "Size"})  # their outputs do not depend on values


@dataclass
class Node:
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    graphs: list[Graph]
    overload: str = ""  # (IR 10: a local function's overload)


@dataclass
class Graph:
    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]
    functions: dict[tuple[str, str, str], list[Node]] | None = None  # (domain, name,
    # overload): body


def _text(buf: bytes, value: tuple[int, int]) -> str:
    return buf[value[0]:value[1]].decode("utf-8", "replace")


def _node(buf: bytes, start: int, end: int, depth: int) -> Node:
    node = Node("", "", [], [], [])
    for field, wire, value in _fields(buf, start, end):
        if wire != 2:
            continue
        if field in (1, 2):
            (node.inputs if field == 1 else node.outputs).append(_text(buf, value))
        elif field in (4, 7, 8):
            setattr(node, {4: "op", 7: "domain", 8: "overload"}[field], _text(buf, value))
        elif field == 5:  # an attribute: its graphs (g, graphs)
            one = None  # g (6) is one graph: written twice, protobuf merges the parts
            for f, w, v in _fields(buf, *value):
                if w == 2 and f == 6:
                    one = _graph(buf, *v, depth + 1, into=one)
                elif w == 2 and f == 11:
                    node.graphs.append(_graph(buf, *v, depth + 1))
            node.graphs += [one] if one is not None else []
    return node


def _graph(buf: bytes, start: int, end: int, depth: int, into: Graph | None = None) -> Graph:
    """The graph at ``buf[start:end]``; with ``into``, that graph with this part merged in
    (a singular message field written twice is one message to protobuf: its repeated fields,
    nodes, inputs and outputs, concatenated)."""
    if depth > _MAX_DEPTH:
        raise OnnxScanError("graphs nested too deeply")
    g = into if into is not None else Graph([], [], [])
    for field, wire, value in _fields(buf, start, end):
        if wire == 2 and field == 1:
            g.nodes.append(_node(buf, *value, depth + 1))
        elif wire == 2 and field in (11, 12):  # a ValueInfoProto: its name
            names = [_text(buf, v) for f, w, v in _fields(buf, *value) if f == 1 and w == 2]
            (g.inputs if field == 11 else g.outputs).append(names[0] if names else "")
    return g


def main_graph(model: bytes) -> Graph:
    """The serialized ``model``'s graph: its inputs, outputs and nodes (with their nested
    graphs), and its model-local functions' bodies.

    Raises:
        OnnxScanError: the bytes are not a well-formed ONNX model.
    """
    g, functions = Graph([], [], []), {}
    for field, wire, value in _fields(model, 0, len(model)):
        if wire == 2 and field == 7:  # every part (a probe split the graph in two: the scan
            g = _graph(model, *value, 1, into=g)  # saw the last part, onnxruntime both)
        elif wire == 2 and field == 25:  # a FunctionProto: name 1, nodes 7, domain 10,
            key, body = {1: "", 10: "", 13: ""}, []  # overload 13
            for f, w, v in _fields(model, *value):
                if w == 2 and f in key:
                    key[f] = _text(model, v)
                elif w == 2 and f == 7:
                    body.append(_node(model, *v, 2))
            # (one key twice: both bodies are scanned, whichever onnxruntime takes)
            functions.setdefault((key[10], key[1], key[13]), []).extend(body)
    g.functions = functions
    return g


def sized_by_values(graph: Graph, changing: set[str]) -> tuple[str, str] | None:
    """The first node of ``graph`` (nested graphs and called local functions included) that
    sizes a tensor by, or picks a branch on, values derived from the tensors ``changing``, as
    (op type, input name); None where none does. ``changing`` grows by every tensor derived
    from it (:data:`SIZED_BY`; Shape and Size outputs derive from shapes only), over as many
    passes as it grows: nodes out of topological order, which onnxruntime sorts, are followed
    (a session 44 review: a Range listed before the nodes making its limit passed)."""
    functions = graph.functions or {}

    def walk(nodes: list[Node], seen: frozenset) -> tuple[str, str] | None:
        for n in nodes:
            pick = SIZED_BY.get(n.op, ())
            if n.domain not in ("", "ai.onnx") and (n.domain, n.op, n.overload) not in functions:
                pick = None  # (another domain's op: the exporter writes none; any input may)
            for i in range(len(n.inputs)) if pick is None else pick:
                if i < len(n.inputs) and n.inputs[i] in changing:
                    return n.op, n.inputs[i]
            if n.op in _SHAPE_ONLY:
                continue
            derived = any(i in changing for i in n.inputs if i)
            for sub in n.graphs:  # (a branch reads outer names; its outputs become the node's)
                hit = walk(sub.nodes, seen)
                if hit is not None:
                    return hit
                derived = derived or any(o in changing for o in sub.outputs)
            key = (n.domain, n.op, n.overload)
            body = functions.get(key)
            if body is not None and derived and key not in seen:
                changing.update(i for b in body for i in b.inputs if i)  # (a body's values:
                hit = walk(body, seen | {key})  # taken as all changing)
                if hit is not None:
                    return hit
            if derived:
                changing.update(o for o in n.outputs if o)
        return None

    while True:
        before = len(changing)
        hit = walk(graph.nodes, frozenset())
        if hit is not None or len(changing) == before:
            return hit
