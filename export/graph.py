"""A small ONNX node builder and the shape facts the gradient rules need.

No global "graph under construction": every builder is an object passed explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.errors import UserError
from contract.onnx_scan import LOOP_OPS

__all__ = ["NARROW_FLOATS", "Builder", "ExportError", "Shapes", "check_ops", "forward_flops",
           "infer_shapes", "lowest_ir_version", "name_nodes", "reads", "static_shape"]

# float types other than float32, by name: weights stored so train in float32 behind a Cast;
# computed in them, the backward (built in float32) may not load
NARROW_FLOATS = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
                 TensorProto.DOUBLE: "float64"}

Dim = int | str | None


class ExportError(UserError, ValueError):
    """A model or option the exporter cannot handle; the message says what and what to do."""


class Builder:
    """Appends nodes (and small constant initializers) for one graph.

    ``prefix`` keeps the generated tensor names of the forward extras, the backward and the loss
    apart and readable in Netron (``grad/fc1/MatMul_output_0``).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}
        # For forward extras: the forward node each new node is placed right after, so that
        # e.g. a compression node runs as soon as its input exists (DESIGN.md §2: node order).
        self.anchor: str | None = None
        self.anchors: list[str | None] = []

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None,
           out: str | None = None, **attrs) -> str:
        """Add one node with a single output (named ``out`` or a fresh name); return its name."""
        name = out or self.fresh(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [name],
                                           name=self.fresh(f"{op_type}_node"), **attrs))
        self.anchors.append(self.anchor)
        return name

    def op_multi(self, op_type: str, inputs: Sequence[str], n_out: int,
                 hint: str | None = None, **attrs) -> list[str]:
        outs = [self.fresh(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=self.fresh(f"{op_type}_node"), **attrs))
        self.anchors.append(self.anchor)
        return outs

    def const(self, value, dtype=np.float32) -> str:
        """A constant initializer, deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor ``node`` reads: its inputs and, for a control-flow node (``If``), the names
    its subgraphs take from the enclosing graph (ONNX subgraphs read outer values by name)."""
    out = [i for i in node.input if i]
    for a in node.attribute:
        subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for g in subs:
            inner = {t.name for t in g.initializer} | {i.name for i in g.input}
            for n in g.node:
                out.extend(i for i in reads(n) if i not in inner)
                inner.update(o for o in n.output if o)
    return out


def static_shape(vi: onnx.ValueInfoProto) -> list[Dim] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


# an initializer at least this large that holds no integers is given to shape inference as a
# typed input: its values never decide a shape (Resize scales and Range bounds are small)
_LIGHT_MIN_ELEMENTS = 4096
_INT_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
              TensorProto.UINT64, TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8,
              TensorProto.BOOL}


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` on the graph without its large float weights.

    Shape inference copies the whole model through a serialisation; with the weights that is
    ~0.15 s per call on MiniLM and fails past protobuf's 2 GB. Each large non-integer
    initializer is declared as a graph input of its type and shape instead: the inferred
    shapes are the same, since no such value decides a shape. The result's graph holds the
    nodes and value_info, not those weights."""
    g = model.graph
    big = [t for t in g.initializer if t.data_type not in _INT_TYPES
           and int(np.prod(t.dims, dtype=np.int64)) >= _LIGHT_MIN_ELEMENTS]
    if not big:
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    big_names = {t.name for t in big}
    lg.initializer.extend(t for t in g.initializer if t.name not in big_names)
    lg.sparse_initializer.extend(g.sparse_initializer)
    declared = {vi.name for vi in g.input}
    lg.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                    for t in big if t.name not in declared)
    return onnx.shape_inference.infer_shapes(light, **kwargs)


class Shapes:
    """Shapes and element types of every tensor of the forward graph (from ONNX shape inference)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        inferred = infer_shapes(model, strict_mode=False, data_prop=True)
        g = inferred.graph
        self.shape: dict[str, list[Dim] | None] = {}
        self.dtype: dict[str, int] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self.shape[vi.name] = static_shape(vi)
            self.dtype[vi.name] = vi.type.tensor_type.elem_type
        for init in model.graph.initializer:
            self.shape[init.name] = list(init.dims)
            self.dtype[init.name] = init.data_type

    def rank(self, name: str) -> int:
        s = self.of(name)
        return len(s)

    def of(self, name: str) -> list[Dim]:
        s = self.shape.get(name)
        if s is None:
            raise ExportError(f"shape of tensor '{name}' is unknown after ONNX shape inference; "
                              "export with static shapes except the batch dimension, or give "
                              "the inputs' shapes with --input-shape")
        return s

    def is_float(self, name: str) -> bool:
        return self.dtype.get(name, TensorProto.FLOAT) in (
            TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)

    def numel_static(self, name: str, axes: Sequence[int]) -> int | None:
        dims = self.of(name)
        n = 1
        for a in axes:
            d = dims[a]
            if not isinstance(d, int):
                return None
            n *= d
        return n


def name_nodes(model: onnx.ModelProto) -> None:
    """A unique name for every node that has none or shares one (ONNX allows both; the exporter
    finds a node's compressed layer, and reports errors, by its name)."""
    seen = {n.name for n in model.graph.node if n.name}
    named: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in named:
            named.add(node.name)
            continue
        k, base = i, f"{node.name or node.op_type}_{i}"
        name = base
        while name in seen or name in named:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        named.add(name)


def check_ops(model: onnx.ModelProto, path: str) -> None:
    """Only standard ONNX ops: the exporter differentiates and onnxruntime runs those."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ExportError(f"ONNX model '{path}': node '{node.name or node.output[0]}' is "
                              f"'{node.op_type}' of domain '{node.domain}', not a standard ONNX "
                              "op; export the model again without custom or fused operators")
        if not onnx.defs.has(node.op_type):
            raise ExportError(f"ONNX model '{path}': node '{node.name or node.output[0]}' is "
                              f"'{node.op_type}', which is not an ONNX operator; export the "
                              "model again with standard ops")
        if node.op_type in LOOP_OPS:  # the runtime refuses loops
            raise ExportError(f"ONNX model '{path}': '{node.op_type}' node '{node.name}' (a loop "
                              "is not run); export the model with its loop unrolled")


def lowest_ir_version(model: onnx.ModelProto) -> None:
    """Set ``model``'s IR version to the lowest its opsets allow (opset 17: IR 8). An ONNX file
    written by a new ``onnx`` package carries that package's IR version (14 with onnx 1.20):
    onnxruntime 1.31 (the newest onnxruntime-gpu in 2026-12) and older refuse it ("Unsupported
    model IR version: 14, max supported IR version: 13"), though its opsets are old. A bundle's
    graphs use no IR feature beyond its opsets' (float32/int64/bool/uint8 tensors)."""
    from onnx import helper

    need = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if need < model.ir_version:
        model.ir_version = need


def forward_flops(model: onnx.ModelProto, shapes: Shapes, params: set[str]) -> tuple[int, int]:
    """(forward FLOPs per sample of MatMul/Gemm/Conv nodes, the part in nodes whose output
    depends on a trainable parameter): what ``plan`` turns into a step-time estimate with a
    profile's GFLOP/s."""
    from .autodiff import _requires_grad

    req = _requires_grad(model.graph, shapes, params)
    total = trainable = 0
    for n in model.graph.node:
        try:
            if n.op_type in ("MatMul", "Gemm"):
                out = shapes.of(n.output[0])
                k = shapes.of(n.input[0])[-1] if n.op_type == "MatMul" or not any(
                    a.name == "transA" and a.i for a in n.attribute) else shapes.of(n.input[0])[0]
                f = 2 * int(np.prod([d for d in out[1:] if isinstance(d, int)])) * int(k)
            elif n.op_type == "Conv":
                out, w = shapes.of(n.output[0]), shapes.of(n.input[1])
                f = 2 * int(np.prod(out[1:])) * int(np.prod(w[1:]))
            else:
                continue
        except (ExportError, TypeError, ValueError):
            continue
        total += f
        if n.output[0] in req:
            trainable += f
    return total, trainable
