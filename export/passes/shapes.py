"""Structural shape facts the backward passes rely on (no shape inference needed): which forward
tensor a shape vector describes, and whether a backward tensor provably has that shape."""

from __future__ import annotations

from ..autodiff import Draft

__all__ = ["ELEMENTWISE_BINARY", "ELEMENTWISE_UNARY", "is_scalar_const", "same_shape",
           "shape_owner"]

ELEMENTWISE_UNARY = {"Cast", "Neg", "Not", "Relu", "Exp", "Sqrt", "Sigmoid", "Tanh", "Erf",
                     "Abs", "Reciprocal", "Identity", "Log"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Greater", "Less", "GreaterOrEqual",
                      "LessOrEqual", "Equal", "And", "Or", "Xor"}


def shape_owner(d: Draft, shp: str) -> tuple[str, object] | None:
    """``("tensor", Y)`` when ``shp`` is ``Shape(Y)`` of a forward tensor, ``("static", dims)``
    when it is a constant vector, else None."""
    for n in d.fwd.nodes:
        if shp in n.output and n.op_type == "Shape" and len(n.input) == 1 and not n.attribute:
            return "tensor", n.input[0]
    v = d.bwd_constant(shp)
    if v is not None and v.ndim == 1:
        return "static", tuple(int(x) for x in v)
    return None


def is_scalar_const(d: Draft, name: str) -> bool:
    v = d.bwd_constant(name)
    if v is None:
        for t in d.graph.initializer:
            if t.name == name:
                import numpy as np

                return int(np.prod(t.dims)) == 1
        return False
    return v.size == 1


def same_shape(d: Draft, t: str, owner: tuple[str, object], depth: int = 0) -> bool:
    """True when backward/forward tensor ``t`` provably has the shape ``owner`` describes."""
    kind, what = owner
    if kind == "tensor" and t == what:
        return True
    if kind == "static":
        dims = d.shapes.shape.get(t)
        if dims is not None and tuple(dims) == what:
            return True
    if depth > 32:
        return False
    p = d.bwd_producer(t)
    if p is None:
        return False
    if p.op_type in ELEMENTWISE_UNARY:
        return same_shape(d, p.input[0], owner, depth + 1)
    if p.op_type in ELEMENTWISE_BINARY and len(p.input) == 2:
        a, b = p.input
        return ((same_shape(d, a, owner, depth + 1) and
                 (is_scalar_const(d, b) or same_shape(d, b, owner, depth + 1))) or
                (same_shape(d, b, owner, depth + 1) and is_scalar_const(d, a)))
    if p.op_type in ("Reshape", "Expand") and len(p.input) == 2:
        return shape_owner(d, p.input[1]) == owner
    return False
