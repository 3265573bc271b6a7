"""Gradient rules of elementwise ops and activations (exact; masks are read from the forward
tensors, and the ``mask_bits`` pass decides afterwards whether to save them as bits)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..autodiff import RuleSet
from ..graph import ExportError
from .common import attrs, needs, saved, unbroadcast

RULES = RuleSet("elementwise")


@RULES.gradient("Identity")
def identity_grad(ctx, node, gy):
    return [gy[0]]


@RULES.gradient("Add")
def add_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    return [unbroadcast(ctx, gy[0], y, a) if needs(ctx, node, 0) else None,
            unbroadcast(ctx, gy[0], y, b) if needs(ctx, node, 1) else None]


@RULES.gradient("Sub")
def sub_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    gb = None
    if needs(ctx, node, 1):
        gb = unbroadcast(ctx, ctx.bwd.op("Neg", [gy[0]]), y, b)
    return [unbroadcast(ctx, gy[0], y, a) if needs(ctx, node, 0) else None, gb]


@RULES.gradient("Mul")
def mul_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    ga = gb = None
    if needs(ctx, node, 0):
        ga = unbroadcast(ctx, ctx.bwd.op("Mul", [gy[0], b]), y, a)
    if needs(ctx, node, 1):
        gb = unbroadcast(ctx, ctx.bwd.op("Mul", [gy[0], a]), y, b)
    return [ga, gb]


@RULES.gradient("Div")
def div_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    ga = gb = None
    if needs(ctx, node, 0):
        ga = unbroadcast(ctx, ctx.bwd.op("Div", [gy[0], b]), y, a)
    if needs(ctx, node, 1):  # d(a/b)/db = -y/b
        t = ctx.bwd.op("Neg", [ctx.bwd.op("Div", [ctx.bwd.op("Mul", [gy[0], y]), b])])
        gb = unbroadcast(ctx, t, y, b)
    return [ga, gb]


@RULES.gradient("Neg")
def neg_grad(ctx, node, gy):
    return [ctx.bwd.op("Neg", [gy[0]])]


@RULES.gradient("Relu")
def relu_grad(ctx, node, gy):
    """g ⊙ (y > 0), as a Mul by the mask cast to float (onnxruntime's ``Where`` allocates two
    full-size temporaries: measured 218 MB vs 151 MB for a 67 MB gradient)."""
    b = ctx.bwd
    mask = b.op("Greater", [node.output[0], b.const(0.0)])
    return [b.op("Mul", [gy[0], b.op("Cast", [mask], to=TensorProto.FLOAT)])]


@RULES.gradient("Clip")
def clip_grad(ctx, node, gy):
    """The gradient passes where min < x < max (torch's ReLU6/hardtanh). Read from the output:
    lo < y < hi exactly where lo < x < hi, and a following layer often keeps y anyway."""
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    y, b = node.output[0], ctx.bwd
    conds = ([b.op("Greater", [y, lo])] if lo else []) + ([b.op("Less", [y, hi])] if hi else [])
    if not conds:
        return [gy[0]] + [None] * (len(node.input) - 1)
    mask = conds[0] if len(conds) == 1 else b.op("And", conds, hint="clip_mask")
    g = b.op("Mul", [gy[0], b.op("Cast", [mask], to=TensorProto.FLOAT)])
    return [g] + _clip_bound_grads(ctx, node, gy[0], lo, hi)


def _clip_bound_grads(ctx, node, g: str, lo: str | None, hi: str | None) -> list:
    """Gradients of trainable bounds (a learned clipping range, PACT): y = min(max(x, lo), hi)
    is ``hi`` where max(x, lo) > hi and ``lo`` where x < lo ≤ hi (an outside review: they
    were dropped)."""
    out: list = [None] * (len(node.input) - 1)
    b, x, y = ctx.bwd, node.input[0], node.output[0]

    def part(cond: str, bound: str) -> str:
        return unbroadcast(ctx, b.op("Mul", [g, b.op("Cast", [cond], to=TensorProto.FLOAT)]),
                           y, bound)

    if lo and needs(ctx, node, 1):
        below = b.op("Less", [x, lo])
        if hi:
            below = b.op("And", [below, b.op("Not", [b.op("Greater", [lo, hi])])])
        out[0] = part(below, lo)
    if hi and needs(ctx, node, 2):
        out[1] = part(b.op("Greater", [b.op("Max", [x, lo]) if lo else x, hi]), hi)
    return out


@RULES.gradient("Gelu")
def gelu_grad(ctx, node, gy):
    """Exact (erf) GELU: g · (Φ(x) + x·φ(x)), recomputed from the saved input alone. The rule of
    the opset-20 Gelu op, and of torch's five-op form (see the ``gelu_fusion`` hint pass).
    ``approximate='tanh'``: y = x/2 · (1 + tanh(u)), u = √(2/π)(x + 0.044715x³), so
    dy/dx = (1 + t)/2 + x/2 · (1 − t²) · √(2/π)(1 + 3·0.044715x²), t = tanh(u)."""
    approx = attrs(node).get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise ExportError(f"Gelu '{node.name}': approximate='{approx}' is not an ONNX mode "
                          "(none or tanh)")
    b = ctx.bwd
    x = saved(ctx, node.input[0])  # exact, or int8 in the compressed variant
    if approx == "tanh":
        k, c = float(np.sqrt(2.0 / np.pi)), 0.044715
        x2 = b.op("Mul", [x, x])
        t = b.op("Tanh", [b.op("Mul", [x, b.op("Mul", [b.op("Add", [b.op(
            "Mul", [x2, b.const(c)]), b.const(1.0)]), b.const(k)])])])
        du = b.op("Mul", [b.op("Add", [b.op("Mul", [x2, b.const(3 * c)]), b.const(1.0)]),
                          b.const(k)])
        one_t = b.op("Sub", [b.const(1.0), b.op("Mul", [t, t])])
        d = b.op("Add", [b.op("Add", [t, b.const(1.0)]), b.op("Mul", [x, b.op("Mul", [one_t, du])])])
        return [b.op("Mul", [gy[0], b.op("Mul", [d, b.const(0.5)])])]
    cdf = b.op("Mul", [b.op("Add", [b.op("Erf", [b.op("Div", [x, b.const(float(np.sqrt(2.0)))])]),
                                    b.const(1.0)]), b.const(0.5)])
    pdf = b.op("Mul", [b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.const(-0.5)])]),
                       b.const(float(1.0 / np.sqrt(2.0 * np.pi)))])
    return [b.op("Mul", [gy[0], b.op("Add", [cdf, b.op("Mul", [x, pdf])])])]


@RULES.gradient("Softmax")
def softmax_grad(ctx, node, gy):
    axis = attrs(node).get("axis", -1)
    y = saved(ctx, node.output[0], nonneg=True) \
        if axis in (-1, ctx.shapes.rank(node.output[0]) - 1) \
        else node.output[0]  # exact, or int8 with a scale per row of the softmax axis
    gyy = ctx.bwd.op("Mul", [gy[0], y])
    s = ctx.bwd.op("ReduceSum", [gyy, ctx.bwd.ints([axis])], keepdims=1)
    return [ctx.bwd.op("Mul", [ctx.bwd.op("Sub", [gy[0], s]), y])]


@RULES.gradient("Erf")
def erf_grad(ctx, node, gy):
    b, x = ctx.bwd, node.input[0]
    d = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])
    return [b.op("Mul", [gy[0], b.op("Mul", [d, b.const(2.0 / np.sqrt(np.pi))])])]


@RULES.gradient("Sqrt")
def sqrt_grad(ctx, node, gy):
    b = ctx.bwd
    return [b.op("Div", [gy[0], b.op("Mul", [node.output[0], b.const(2.0)])])]


@RULES.gradient("Pow")
def pow_grad(ctx, node, gy):
    x, p = node.input
    y = node.output[0]
    b = ctx.bwd
    gx = gp = None
    if needs(ctx, node, 0):
        if p in ctx.constants:  # x^(p-1) with p - 1 folded now; p = 2 needs no Pow at all
            pv = ctx.constant_value(p).astype(np.float32)
            d = (b.op("Mul", [x, b.const(pv)]) if np.all(pv == 2.0) else
                 b.op("Mul", [b.op("Pow", [x, b.const(pv - 1.0)]), b.const(pv)]))
            if np.any(pv == 0.0):  # x^0 = 1: slope 0, also at x = 0 (0^-1 · 0 was NaN)
                d = b.op("Where", [b.const(pv == 0.0, np.bool_), b.const(0.0), d])
        else:  # (an integer exponent computed in the graph: a float one here)
            pf = b.op("Cast", [p], to=TensorProto.FLOAT)
            d = b.op("Mul", [b.op("Pow", [x, b.op("Sub", [pf, b.const(1.0)])]), pf])
        gx = unbroadcast(ctx, b.op("Mul", [gy[0], d]), y, x)
    if needs(ctx, node, 1):  # d(x^p)/dp = y log x, 0 where x = 0 (y = 0 there; log x = -inf)
        ylog = b.op("Mul", [y, b.op("Log", [x])])
        ylog = b.op("Where", [b.op("Equal", [x, b.const(0.0)]), b.const(0.0), ylog])
        gp = unbroadcast(ctx, b.op("Mul", [gy[0], ylog]), y, p)
    return [gx, gp]


@RULES.gradient("Tanh")
def tanh_grad(ctx, node, gy):
    b, y = ctx.bwd, node.output[0]
    return [b.op("Mul", [gy[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]


@RULES.gradient("Sigmoid")
def sigmoid_grad(ctx, node, gy):
    b, y = ctx.bwd, node.output[0]
    return [b.op("Mul", [gy[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


@RULES.gradient("Exp")
def exp_grad(ctx, node, gy):
    return [ctx.bwd.op("Mul", [gy[0], node.output[0]])]


@RULES.gradient("Log")
def log_grad(ctx, node, gy):
    return [ctx.bwd.op("Div", [gy[0], node.input[0]])]


@RULES.gradient("Where")
def where_grad(ctx, node, gy):
    c, x, other = node.input
    y = node.output[0]
    b = ctx.bwd
    zero = b.const(0.0)
    gx = unbroadcast(ctx, b.op("Where", [c, gy[0], zero]), y, x) if needs(ctx, node, 1) else None
    go = (unbroadcast(ctx, b.op("Where", [c, zero, gy[0]]), y, other)
          if needs(ctx, node, 2) else None)
    return [None, gx, go]


@RULES.gradient("Cast")
def cast_grad(ctx, node, gy):
    src, dst = ctx.shapes.dtype.get(node.input[0]), attrs(node)["to"]
    if not ctx.shapes.is_float(node.output[0]):
        return [None]  # float -> int/bool: no gradient
    return [gy[0] if src == dst else ctx.bwd.op("Cast", [gy[0]], to=src)]


@RULES.gradient("Dropout")
def dropout_grad(ctx, node, gy):
    if len(node.input) > 2 and node.input[2] and ctx.constant_value(node.input[2]).item():
        raise ExportError(f"Dropout '{node.name}' is in training mode; export the model in eval "
                          "mode (dropout is then the identity), and where the forward asks for "
                          "it itself (F.dropout(x, p, training=True), Monte Carlo dropout) pass "
                          "training=self.training")
    return [gy[0]] + [None] * (len(node.input) - 1)


@RULES.gradient("LogSoftmax")
def logsoftmax_grad(ctx, node, gy):
    """y = x - logΣexp(x): g_x = g - softmax(x)·Σg (softmax = exp(y))."""
    b, axis = ctx.bwd, attrs(node).get("axis", -1)
    s = b.op("ReduceSum", [gy[0], b.ints([axis])], keepdims=1)
    return [b.op("Sub", [gy[0], b.op("Mul", [b.op("Exp", [node.output[0]]), s])])]


@RULES.gradient("Abs")
def abs_grad(ctx, node, gy):
    return [ctx.bwd.op("Mul", [gy[0], ctx.bwd.op("Sign", [node.input[0]])])]


@RULES.gradient("Reciprocal")
def reciprocal_grad(ctx, node, gy):  # d(1/x) = -1/x² = -y²
    b, y = ctx.bwd, node.output[0]
    return [b.op("Neg", [b.op("Mul", [gy[0], b.op("Mul", [y, y])])])]


@RULES.gradient("Sin")
def sin_grad(ctx, node, gy):
    return [ctx.bwd.op("Mul", [gy[0], ctx.bwd.op("Cos", [node.input[0]])])]


@RULES.gradient("Cos")
def cos_grad(ctx, node, gy):
    b = ctx.bwd
    return [b.op("Neg", [b.op("Mul", [gy[0], b.op("Sin", [node.input[0]])])])]


for _op in ("Sign", "Floor", "Ceil", "Round"):  # piecewise constant: zero almost everywhere
    # (autodiff._ZERO_GRADIENT names them where a parameter's gradient stops there)
    RULES.gradient(_op)(lambda ctx, node, gy: [None])


@RULES.gradient("Max")
def max_grad(ctx, node, gy):
    """Elementwise max/min of any number of inputs (broadcast): the gradient goes to the inputs
    equal to the result, split evenly between ties (as torch.maximum does for two)."""
    b, y = ctx.bwd, node.output[0]
    hits = [b.op("Cast", [b.op("Equal", [x, y])], to=TensorProto.FLOAT) for x in node.input]
    count = hits[0]
    for h in hits[1:]:
        count = b.op("Add", [count, h])
    share = b.op("Div", [gy[0], count])
    return [unbroadcast(ctx, b.op("Mul", [share, h]), y, x) if needs(ctx, node, i) else None
            for i, (x, h) in enumerate(zip(node.input, hits, strict=True))]


RULES.gradient("Min")(max_grad)
