"""ONNX-level reverse-mode autodiff: one gradient rule per op (see ``export/rules.py``).

``build_training_graphs`` takes a forward graph that already ends in a scalar loss and produces a
*pair* of graphs (DESIGN.md §2: separate sessions make memory deterministic):

* the forward graph, extended with extra outputs: every forward tensor the backward needs
  ("saved tensors"), compressed activations in ``instant`` mode, and Gram matrices in ``calib``
  mode;
* the backward graph, whose inputs are those saved tensors plus what the runtime feeds anyway
  (trainable parameters, the batch, INSTANT bases), and whose outputs are the parameter gradients
  (and the output-gradient Gram matrices in ``calib`` mode).

Modes: ``vanilla`` (exact backward), ``instant`` (compressed rules for the layers in ``layers``),
``calib`` (exact backward with no parameter gradients, emitting per-layer Gram matrices).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import Builder, ExportError, Shapes

__all__ = [
    "BACKWARD_PASSES",
    "GRADIENTS",
    "GRAD_ACC",
    "LOSS_SCALE",
    "CompressedLayer",
    "GradContext",
    "TrainingGraphs",
    "build_training_graphs",
    "find_compressible_layers",
    "gradient",
]

MODES = ("vanilla", "instant", "calib")
LOSS_SCALE = "loss_scale"  # backward input: the seed dL/dloss (training modes)
GRAD_ACC = "grad_acc."  # backward inputs grad_acc.<param>: the gradient accumulated so far

Rule = Callable[["GradContext", onnx.NodeProto, list], list]
# Rewrites of the whole backward once every rule has run (registered by export/rules.py).
BACKWARD_PASSES: list[Callable[[GradContext], None]] = []
GRADIENTS: dict[str, Rule] = {}


def gradient(op_type: str) -> Callable[[Rule], Rule]:
    """Register the gradient rule of one ONNX op. A second rule for the same op raises."""

    def register(fn: Rule) -> Rule:
        if op_type in GRADIENTS:
            raise ValueError(f"gradient rule for op '{op_type}' registered twice "
                             f"({GRADIENTS[op_type].__name__} and {fn.__name__})")
        GRADIENTS[op_type] = fn
        return fn

    return register


@dataclass
class CompressedLayer:
    """A trainable Linear / 1x1 Conv whose backward INSTANT compresses.

    The per-sample activation is a matrix whose two last axes are ``(L, C)`` for a Linear
    (channels last) and ``(C, L)`` for a 1x1 Conv (channels first, spatial positions flattened).
    ``x_axis``/``g_axis`` say which of the two a basis projects: ``token`` (L) or ``channel`` (C),
    chosen as in the paper (token when L <= C); 2-D activations (L = 1) always use ``channel``.
    """

    name: str
    kind: str  # "linear" | "conv1x1"
    node: str
    x: str
    y: str
    weight: str
    weight_layout: str  # "in_out" (MatMul B, [Cx, Cy]) | "out_in" (Gemm transB / Conv, [Cy, Cx])
    tokens: int
    cx: int
    cy: int
    x_axis: str
    g_axis: str
    rank3: bool = True  # False for a 2-D [N, C] activation
    p_input: str = ""
    q_input: str = ""

    @property
    def x_dim(self) -> int:
        return self.tokens if self.x_axis == "token" else self.cx

    @property
    def g_dim(self) -> int:
        return self.tokens if self.g_axis == "token" else self.cy

    def to_json(self) -> dict:
        d = asdict(self)
        d["x_dim"], d["g_dim"] = self.x_dim, self.g_dim
        return d


def _axis_mode(tokens: int, channels: int, rank3: bool) -> str:
    if not rank3:
        return "channel"
    return "token" if tokens <= channels else "channel"


def find_compressible_layers(model: onnx.ModelProto, shapes: Shapes, trainable: set[str],
                             param_names: dict[str, str], exclude: Iterable[str] | None = None,
                             ) -> list[CompressedLayer]:
    """Every trainable Linear (Gemm/MatMul with a 2-D weight) and 1x1 Conv, in graph order.

    ``exclude`` holds globs on layer names; ``None`` excludes the classifier head (the last such
    layer before the loss), as the paper does.
    """
    found: list[CompressedLayer] = []
    for node in model.graph.node:
        layer = _as_layer(node, shapes, trainable, param_names)
        if layer is not None:
            found.append(layer)
    if exclude is None:
        return found[:-1]
    pats = list(exclude)
    return [ly for ly in found if not any(fnmatch.fnmatch(ly.name, p) for p in pats)]


def _layer_name(weight: str, param_names: dict[str, str]) -> str:
    name = param_names.get(weight, weight)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _as_layer(node, shapes: Shapes, trainable, param_names) -> CompressedLayer | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Gemm", "MatMul"):
        if len(node.input) < 2 or node.input[1] not in trainable:
            return None
        x, w = node.input[0], node.input[1]
        ws = shapes.of(w)
        xs = shapes.of(x)
        if len(ws) != 2 or len(xs) not in (2, 3) or attrs.get("transA", 0):
            return None
        if node.op_type == "Gemm" and attrs.get("alpha", 1.0) != 1.0:
            return None
        out_in = node.op_type == "Gemm" and attrs.get("transB", 0) == 1
        cy, cx = (ws[0], ws[1]) if out_in else (ws[1], ws[0])
        rank3 = len(xs) == 3
        tokens = xs[1] if rank3 else 1
        if not all(isinstance(v, int) for v in (cx, cy, tokens)):
            return None
        return CompressedLayer(
            name=_layer_name(w, param_names), kind="linear", node=node.name, x=x,
            y=node.output[0], weight=w, weight_layout="out_in" if out_in else "in_out",
            tokens=tokens, cx=cx, cy=cy, rank3=rank3,
            x_axis=_axis_mode(tokens, cx, rank3), g_axis=_axis_mode(tokens, cy, rank3))
    if node.op_type == "Conv" and node.input[1] in trainable:
        w = node.input[1]
        ws = shapes.of(w)
        xs = shapes.of(node.input[0])
        one = (len(ws) == 4 and ws[2:] == [1, 1] and attrs.get("group", 1) == 1
               and all(s == 1 for s in attrs.get("strides", [1, 1]))
               and all(p == 0 for p in attrs.get("pads", [0, 0, 0, 0]))
               and len(xs) == 4 and all(isinstance(d, int) for d in xs[1:]))
        if not one:
            return None
        tokens = int(xs[2]) * int(xs[3])
        cy, cx = int(ws[0]), int(ws[1])
        return CompressedLayer(
            name=_layer_name(w, param_names), kind="conv1x1", node=node.name, x=node.input[0],
            y=node.output[0], weight=w, weight_layout="out_in", tokens=tokens, cx=cx, cy=cy,
            x_axis=_axis_mode(tokens, cx, True), g_axis=_axis_mode(tokens, cy, True))
    return None


class GradContext:
    """What a gradient rule may use: the two builders, shapes, and the layer being compressed."""

    def __init__(self, shapes: Shapes, mode: str, fwd: Builder, bwd: Builder,
                 requires_grad: set[str], params: set[str], param_grads: bool,
                 layers: dict[str, CompressedLayer]) -> None:
        self.shapes = shapes
        self.mode = mode
        self.fwd = fwd
        self.bwd = bwd
        self._requires = requires_grad
        self._params = params
        self._param_grads = param_grads
        self._layers = layers
        self._shape_cache: dict[str, str] = {}
        self.fwd_outputs: list[str] = []  # extra forward outputs (compressed activations, Grams)
        self.bwd_outputs: list[str] = []  # extra backward outputs (Grams)
        self.referenced_in_bwd: set[str] = set()
        self.constants: dict[str, np.ndarray] = {}
        # Backward tensors made by a MatMul of a batch-major operand [N, ...] and a matrix, that a
        # consumer may recompute per half-batch instead: {output: (node, batched input index)}.
        self.batch_splittable: dict[str, tuple[onnx.NodeProto, int]] = {}
        # Backward tensors that are only an Expand of a smaller one (reduction backward): an
        # elementwise consumer may broadcast the small one instead. {output: (Expand node, small)}
        self.expanded: dict[str, tuple[onnx.NodeProto, str]] = {}
        # Per-half-batch results and their Concat, and backward nodes separable along the batch
        # (name -> batched input index): see rules.push_half_concats.
        self.half_concats: dict[str, tuple[onnx.NodeProto, list[str]]] = {}
        self.batch_major: dict[str, int] = {}

    def bwd_constant(self, name: str) -> np.ndarray | None:
        """Value of a constant the backward builder made (None: not one of them)."""
        for t in self.bwd.initializers:
            if t.name == name:
                return numpy_helper.to_array(t)
        return None

    def constant_value(self, name: str) -> np.ndarray:
        if name not in self.constants:
            raise ExportError(f"tensor '{name}' must be a constant (initializer or Constant node)")
        return self.constants[name]

    def needs_grad(self, name: str) -> bool:
        if name not in self._requires:
            return False
        return self._param_grads or name not in self._params

    def layer(self, node: onnx.NodeProto) -> CompressedLayer | None:
        if self.mode == "vanilla":
            return None
        return self._layers.get(node.name)

    def shape(self, name: str) -> str:
        """The runtime shape of forward tensor ``name``, usable in the backward.

        Static shapes become constants; a shape with a symbolic dim is taken by a ``Shape`` node in
        the forward graph (an int64 vector: the only thing saved, never the tensor itself).
        """
        dims = self.shapes.of(name)
        if all(isinstance(d, int) for d in dims):
            return self.bwd.ints(dims)
        if name not in self._shape_cache:
            self._shape_cache[name] = self.fwd.op("Shape", [name], hint="shape")
        return self._shape_cache[name]

    def is_saved_already(self, name: str) -> bool:
        """True when some backward node already reads forward tensor ``name`` (so it stays alive)."""
        return name in self.referenced_in_bwd


@dataclass
class TrainingGraphs:
    forward: onnx.ModelProto
    backward: onnx.ModelProto
    saved: list[str] = field(default_factory=list)
    grads: dict[str, str] = field(default_factory=dict)  # param -> backward output name
    fwd_grams: dict[str, str] = field(default_factory=dict)  # layer -> forward output
    bwd_grams: dict[str, str] = field(default_factory=dict)  # layer -> backward output


def _requires_grad(graph: onnx.GraphProto, shapes: Shapes, roots: set[str]) -> set[str]:
    req = set(roots)
    for node in graph.node:
        if any(i in req for i in node.input if i):
            for o in node.output:
                if o and shapes.is_float(o):
                    req.add(o)
    return req


def build_training_graphs(fwd_model: onnx.ModelProto, loss: str, params: list[str],
                          mode: str, layers: list[CompressedLayer], opset: int,
                          ) -> TrainingGraphs:
    """Differentiate ``loss`` w.r.t. ``params`` and split into forward and backward graphs.

    Raises:
        ExportError: an op without a gradient rule (naming node, op and the supported ops).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fwd_model = copy.deepcopy(fwd_model)  # rules may extend forward nodes (MaxPool indices)
    g = fwd_model.graph
    shapes = Shapes(fwd_model)
    param_set = set(params)
    requires = _requires_grad(g, shapes, param_set)
    fwd = Builder("fwd")
    bwd = Builder("grad")
    by_node = {ly.node: ly for ly in layers} if mode != "vanilla" else {}
    ctx = GradContext(shapes, mode, fwd, bwd, requires, param_set,
                      param_grads=(mode != "calib"), layers=by_node)
    ctx.constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    ctx.constants[n.output[0]] = numpy_helper.to_array(a.t)

    # The backward's seed dL/dloss is a graph input in the training modes: the runtime feeds each
    # micro-batch's share of the batch (m / n), so gradients arrive already weighted.
    seed = LOSS_SCALE if mode != "calib" else bwd.const(1.0)
    contrib: dict[str, list[str]] = {loss: [seed]}
    fused = _fuse_gelu(g, ctx.constants)
    for node in reversed(list(g.node)):
        node = fused.get(node.name, node)
        if not any(o in contrib for o in node.output):
            continue
        if not any(ctx.needs_grad(i) for i in node.input if i) and not (
                mode == "calib" and node.name in by_node):  # calib still wants its Grams
            continue
        rule = GRADIENTS.get(node.op_type)
        if rule is None:
            raise ExportError(
                f"no gradient rule for op '{node.op_type}' at node '{node.name}'; supported: "
                f"{', '.join(sorted(GRADIENTS))}. Freeze the layers up to and including this node "
                "(--trainable) or add a rule in export/rules.py")
        gouts = [_sum_grads(bwd, contrib.pop(o)) if o in contrib else None for o in node.output]
        n_before = len(bwd.nodes)
        fwd.anchor = node.name
        gins = rule(ctx, node, gouts)
        for n in bwd.nodes[n_before:]:
            ctx.referenced_in_bwd.update(n.input)
        if len(gins) != len(node.input):
            raise AssertionError(f"rule for {node.op_type} returned {len(gins)} grads "
                                 f"for {len(node.input)} inputs")
        for inp, gi in zip(node.input, gins, strict=True):
            if gi is not None and ctx.needs_grad(inp):
                contrib.setdefault(inp, []).append(gi)

    for rewrite in BACKWARD_PASSES:
        rewrite(ctx)
    grads: dict[str, str] = {}
    extra: dict[str, onnx.ValueInfoProto] = {}
    if mode != "calib":
        extra[LOSS_SCALE] = helper.make_tensor_value_info(LOSS_SCALE, onnx.TensorProto.FLOAT, [])
        for p in params:
            if p not in contrib:
                raise ExportError(f"trainable parameter '{p}' does not reach the loss; "
                                  "remove it from --trainable")
            # Accumulate in the graph: grad = acc + this micro-batch's gradient. The runtime binds
            # the output to the acc input's own buffer, so a step holds one gradient buffer per
            # parameter, not two, and each fresh gradient dies as soon as it is added.
            acc, out = f"{GRAD_ACC}{p}", f"grad.{p}"
            dtype = shapes.dtype.get(p, onnx.TensorProto.FLOAT)
            extra[acc] = helper.make_tensor_value_info(acc, dtype, list(shapes.shape[p]))
            bwd.nodes.append(helper.make_node("Add", [acc, _sum_grads(bwd, contrib.pop(p))],
                                              [out], name=f"grad_out_{p}"))
            grads[p] = out
    return _split(fwd_model, fwd, bwd, ctx, grads, opset, mode, extra)


def _fuse_gelu(g: onnx.GraphProto, consts: dict[str, np.ndarray]) -> dict[str, onnx.NodeProto]:
    """Find torch's erf GELU, ``0.5 · x · (1 + erf(x / √2))`` as Div, Erf, Add, Mul, Mul, and
    differentiate it as one ``Gelu`` (the forward keeps its five standard ops).

    Node by node, the backward would keep three [N, L, 4C] intermediates alive per GELU; the
    fused rule keeps only ``x`` (measured on MiniLM: 2.4 of 3.8 MB saved per sample were GELU
    intermediates). Returns {name of the last Mul: a virtual Gelu node}.
    """
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    def const(name: str, value: float) -> bool:
        v = consts.get(name)
        return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - value) < 1e-4

    def other(n: onnx.NodeProto, value: float) -> str | None:
        a, b = n.input[0], n.input[1]
        return a if const(b, value) else b if const(a, value) else None

    out: dict[str, onnx.NodeProto] = {}
    for last in g.node:
        if last.op_type != "Mul" or len(last.input) != 2:
            continue
        m_name = other(last, 0.5)
        m = producer.get(m_name or "")
        if m is None or m.op_type != "Mul" or uses.get(m_name, 0) != 1:
            continue
        for x, a_name in ((m.input[0], m.input[1]), (m.input[1], m.input[0])):
            a = producer.get(a_name)
            if a is None or a.op_type != "Add" or uses.get(a_name, 0) != 1:
                continue
            e = producer.get(other(a, 1.0) or "")
            if e is None or e.op_type != "Erf" or uses.get(e.output[0], 0) != 1:
                continue
            d = producer.get(e.input[0])
            if (d is not None and d.op_type == "Div" and d.input[0] == x
                    and const(d.input[1], float(np.sqrt(2.0)))
                    and uses.get(d.output[0], 0) == 1):
                out[last.name] = helper.make_node("Gelu", [x], list(last.output), name=last.name)
                break
    return out


def _sum_grads(bwd: Builder, terms: list[str]) -> str:
    acc = terms[0]
    for t in terms[1:]:
        acc = bwd.op("Add", [acc, t], hint="gsum")
    return acc


def _split(fwd_model, fwd: Builder, bwd: Builder, ctx: GradContext,
           grads: dict[str, str], opset: int, mode: str,
           extra: dict[str, onnx.ValueInfoProto]) -> TrainingGraphs:
    g = fwd_model.graph
    produced_bwd = {o for n in bwd.nodes for o in n.output} | {i.name for i in bwd.initializers}
    fwd_inputs = {i.name: i for i in g.input}
    fwd_inits = {i.name: i for i in g.initializer}
    fwd_produced = {o for n in list(g.node) + fwd.nodes for o in n.output}

    bwd_inputs: list[onnx.ValueInfoProto] = []
    bwd_inits: list[onnx.TensorProto] = list(bwd.initializers)
    saved: list[str] = []
    seen: set[str] = set()
    for n in bwd.nodes:
        for name in n.input:
            if not name or name in produced_bwd or name in seen:
                continue
            seen.add(name)
            if name in extra:
                bwd_inputs.append(extra[name])
            elif name in fwd_inputs:
                bwd_inputs.append(fwd_inputs[name])
            elif name in fwd_inits:
                bwd_inits.append(fwd_inits[name])
            elif name in fwd_produced:
                saved.append(name)
            else:
                raise AssertionError(f"backward reads unknown tensor {name!r}")

    fg = onnx.GraphProto()
    fg.CopyFrom(g)
    # Place each forward extra right after the node whose rule made it (DESIGN.md §2: a
    # compression node scheduled late keeps the full activation alive).
    extras: dict[str | None, list[onnx.NodeProto]] = {}
    for n, anchor in zip(fwd.nodes, fwd.anchors, strict=True):
        extras.setdefault(anchor, []).append(n)
    del fg.node[:]
    for n in g.node:
        fg.node.append(n)
        fg.node.extend(extras.pop(n.name, []))
    for rest in extras.values():
        fg.node.extend(rest)
    fg.initializer.extend(fwd.initializers)
    f_model = helper.make_model(fg, opset_imports=[helper.make_opsetid("", opset)],
                                producer_name="instant-runtime-export")
    f_model.ir_version = fwd_model.ir_version
    typed = Shapes(f_model)

    def vi(name: str) -> onnx.ValueInfoProto:
        dims = typed.shape.get(name)
        dtype = typed.dtype.get(name, onnx.TensorProto.FLOAT)
        return helper.make_tensor_value_info(
            name, dtype, None if dims is None else [d if d is not None else "?" for d in dims])

    saved_vi = [vi(s) for s in saved]
    f_model.graph.output.extend(saved_vi)
    fwd_grams: dict[str, str] = {}
    for name in ctx.fwd_outputs:
        f_model.graph.output.append(vi(name))
        fwd_grams[name.split("gram_x.", 1)[-1]] = name

    bg = helper.make_graph(bwd.nodes, f"{g.name or 'model'}_backward_{mode}",
                           bwd_inputs + saved_vi, [], initializer=bwd_inits)
    b_model = helper.make_model(bg, opset_imports=[helper.make_opsetid("", opset)],
                                producer_name="instant-runtime-export")
    b_model.ir_version = fwd_model.ir_version
    btyped = Shapes(b_model)
    bwd_grams: dict[str, str] = {}
    for out in list(grads.values()) + ctx.bwd_outputs:
        dims = btyped.shape.get(out)
        b_model.graph.output.append(helper.make_tensor_value_info(
            out, onnx.TensorProto.FLOAT,
            None if dims is None else [d if d is not None else "?" for d in dims]))
    for name in ctx.bwd_outputs:
        bwd_grams[name.split("gram_g.", 1)[-1]] = name
    return TrainingGraphs(f_model, b_model, saved, grads, fwd_grams, bwd_grams)
