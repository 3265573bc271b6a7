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

__all__ = ["LOOP_OPS", "ExternalRef", "OnnxScanError", "external_data_refs", "op_types"]

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
