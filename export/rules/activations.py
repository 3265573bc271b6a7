"""Gradient rules of the activations beyond ReLU / GELU / tanh / sigmoid that CNNs and MLPs from
other exporters use: LeakyRelu, PRelu, Elu, Selu, Celu, ThresholdedRelu, HardSigmoid,
HardSwish, Softplus, Softsign, Mish (opset 18; torch exports it as Softplus, Tanh, Mul before).

Exact. A piecewise derivative is built as a float mask times the slope (``Mul`` by a cast
mask, never ``Where``: onnxruntime's ``Where`` holds two full-size temporaries, see ``Relu`` in
``elementwise.py``), read from the output where the output alone tells the piece (the
``mask_bits`` pass may then save it as bits), else from the input.
"""

from __future__ import annotations

from onnx import TensorProto

from ..autodiff import RuleSet
from .common import attrs, needs, unbroadcast

RULES = RuleSet("activations")


def _mask(b, cond: str) -> str:
    return b.op("Cast", [cond], to=TensorProto.FLOAT)


def _piecewise(b, g: str, pos: str, neg_slope: str, pos_slope: float = 1.0) -> str:
    """g · (``pos_slope`` where ``pos``, ``neg_slope`` elsewhere) = g · (neg + m·(p − neg))."""
    m = _mask(b, pos)
    d = b.op("Add", [neg_slope, b.op("Mul", [m, b.op("Sub", [b.const(pos_slope), neg_slope])])])
    return b.op("Mul", [g, d])


@RULES.gradient("LeakyRelu")
def leaky_relu_grad(ctx, node, gy):
    alpha = float(attrs(node).get("alpha", 0.01))
    b = ctx.bwd
    # y > 0 exactly where x > 0 for a positive slope; otherwise read the input
    t = node.output[0] if alpha > 0 else node.input[0]
    return [_piecewise(b, gy[0], b.op("Greater", [t, b.const(0.0)]), b.const(alpha))]


@RULES.gradient("PRelu")
def prelu_grad(ctx, node, gy):
    """y = x (x ≥ 0), slope·x (x < 0); the slope broadcasts and may be trained."""
    x, slope = node.input
    y, b = node.output[0], ctx.bwd
    neg = _mask(b, b.op("Less", [x, b.const(0.0)]))
    gx = gs = None
    if needs(ctx, node, 0):  # g · (1 − n + n·slope)
        d = b.op("Add", [b.op("Sub", [b.const(1.0), neg]), b.op("Mul", [neg, slope])])
        gx = unbroadcast(ctx, b.op("Mul", [gy[0], d]), y, x)
    if needs(ctx, node, 1):
        gs = unbroadcast(ctx, b.op("Mul", [gy[0], b.op("Mul", [neg, x])]), y, slope)
    return [gx, gs]


@RULES.gradient("Elu")
def elu_grad(ctx, node, gy):
    """y = x (x > 0), α(eˣ − 1) (x ≤ 0): the slope below is y + α."""
    alpha = float(attrs(node).get("alpha", 1.0))
    b, y = ctx.bwd, node.output[0]
    # y > 0 exactly where x > 0 for α ≥ 0; with α < 0, α(eˣ − 1) > 0 below: read the input
    pos = b.op("Greater", [y if alpha >= 0 else node.input[0], b.const(0.0)])
    return [_piecewise(b, gy[0], pos, b.op("Add", [y, b.const(alpha)]))]


@RULES.gradient("Selu")
def selu_grad(ctx, node, gy):
    """y = γx (x > 0), γα(eˣ − 1) (x ≤ 0): slopes γ and y + γα."""
    a = attrs(node)
    alpha, gamma = float(a.get("alpha", 1.67326319217681884765625)), \
        float(a.get("gamma", 1.05070102214813232421875))
    b, y = ctx.bwd, node.output[0]
    t = y if gamma > 0 and alpha >= 0 else node.input[0]  # (y's sign is x's only then)
    return [_piecewise(b, gy[0], b.op("Greater", [t, b.const(0.0)]),
                       b.op("Add", [y, b.const(gamma * alpha)]), gamma)]


@RULES.gradient("Celu")
def celu_grad(ctx, node, gy):
    """y = max(0, x) + min(0, α(e^(x/α) − 1)): the slope below is e^(x/α) = y/α + 1."""
    alpha = float(attrs(node).get("alpha", 1.0))
    b, y = ctx.bwd, node.output[0]
    below = b.op("Add", [b.op("Div", [y, b.const(alpha)]), b.const(1.0)])
    return [_piecewise(b, gy[0], b.op("Greater", [y, b.const(0.0)]), below)]


@RULES.gradient("ThresholdedRelu")
def thresholded_relu_grad(ctx, node, gy):
    alpha = float(attrs(node).get("alpha", 1.0))
    b = ctx.bwd
    return [b.op("Mul", [gy[0], _mask(b, b.op("Greater", [node.input[0], b.const(alpha)]))])]


@RULES.gradient("HardSigmoid")
def hard_sigmoid_grad(ctx, node, gy):
    """y = max(0, min(1, αx + β)): slope α where 0 < y < 1."""
    alpha = float(attrs(node).get("alpha", 0.2))
    b, y = ctx.bwd, node.output[0]
    inside = b.op("And", [b.op("Greater", [y, b.const(0.0)]), b.op("Less", [y, b.const(1.0)])])
    return [b.op("Mul", [gy[0], b.op("Mul", [_mask(b, inside), b.const(alpha)])])]


@RULES.gradient("HardSwish")
def hard_swish_grad(ctx, node, gy):
    """y = x · max(0, min(1, x/6 + 1/2)): slope 0 below −3, x/3 + 1/2 on [−3, 3], 1 above (as
    torch's hardswish backward)."""
    b, x = ctx.bwd, node.input[0]
    above = _mask(b, b.op("Greater", [x, b.const(3.0)]))
    inside = _mask(b, b.op("Not", [b.op("Or", [b.op("Less", [x, b.const(-3.0)]),
                                               b.op("Greater", [x, b.const(3.0)])])]))
    ramp = b.op("Add", [b.op("Div", [x, b.const(3.0)]), b.const(0.5)])
    d = b.op("Add", [above, b.op("Mul", [inside, ramp])])
    return [b.op("Mul", [gy[0], d])]


@RULES.gradient("Softplus")
def softplus_grad(ctx, node, gy):
    """y = log(1 + eˣ): slope σ(x)."""
    b = ctx.bwd
    return [b.op("Mul", [gy[0], b.op("Sigmoid", [node.input[0]])])]


@RULES.gradient("Softsign")
def softsign_grad(ctx, node, gy):
    """y = x / (1 + |x|): slope 1 / (1 + |x|)²."""
    b = ctx.bwd
    den = b.op("Add", [b.op("Abs", [node.input[0]]), b.const(1.0)])
    return [b.op("Div", [gy[0], b.op("Mul", [den, den])])]


@RULES.gradient("Mish")
def mish_grad(ctx, node, gy):
    """y = x · tanh(softplus(x)): slope t + x·σ(x)·(1 − t²), t = tanh(softplus(x))."""
    b, x = ctx.bwd, node.input[0]
    t = b.op("Tanh", [b.op("Softplus", [x])])
    sech2 = b.op("Sub", [b.const(1.0), b.op("Mul", [t, t])])
    d = b.op("Add", [t, b.op("Mul", [b.op("Mul", [x, b.op("Sigmoid", [x])]), sech2])])
    return [b.op("Mul", [gy[0], d])]
