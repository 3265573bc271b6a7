"""Gradient rules of reductions and pooling to a point (exact)."""

from __future__ import annotations

from onnx import TensorProto

from ..autodiff import RuleSet
from ..graph import ExportError
from .common import attrs

RULES = RuleSet("reduce")


def _reduce_axes(ctx, node) -> tuple[list[int], int]:
    a = attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.constant_value(node.input[1]).tolist()
    rank = ctx.shapes.rank(node.input[0])
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            raise ExportError(f"node '{node.name}': noop_with_empty_axes is not supported")
        axes = list(range(rank))
    return sorted(int(x) % rank for x in axes), int(a.get("keepdims", 1))


def _reduce_back(ctx, node, g: str, scale: str | None) -> str:
    axes, keep = _reduce_axes(ctx, node)
    if not keep:
        g = ctx.bwd.op("Unsqueeze", [g, ctx.bwd.ints(axes)])
    if scale is not None:
        g = ctx.bwd.op("Div", [g, scale])
    return _expand(ctx, g, node.input[0])


def _expand(ctx, g: str, like: str) -> str:
    """``g`` expanded to the shape of forward tensor ``like`` (the ``broadcast_expand`` pass
    removes the Expand where an elementwise consumer can broadcast ``g`` itself)."""
    return ctx.bwd.op("Expand", [g, ctx.shape(like)])


@RULES.gradient("ReduceSum")
def reducesum_grad(ctx, node, gy):
    return [_reduce_back(ctx, node, gy[0], None)] + [None] * (len(node.input) - 1)


@RULES.gradient("ReduceMean")
def reducemean_grad(ctx, node, gy):
    axes, _ = _reduce_axes(ctx, node)
    count = ctx.shapes.numel_static(node.input[0], axes)
    if count is not None:
        scale = ctx.bwd.const(float(count))
    else:
        dims = ctx.bwd.op("Gather", [ctx.shape(node.input[0]), ctx.bwd.ints(axes)])
        scale = ctx.bwd.op("Cast", [ctx.bwd.op("ReduceProd", [dims], keepdims=1)],
                           to=TensorProto.FLOAT)
    return [_reduce_back(ctx, node, gy[0], scale)] + [None] * (len(node.input) - 1)


@RULES.gradient("GlobalAveragePool")
def gap_grad(ctx, node, gy):
    dims = ctx.shapes.of(node.input[0])
    hw = ctx.shapes.numel_static(node.input[0], list(range(2, len(dims))))
    if hw is None:
        raise ExportError(f"GlobalAveragePool '{node.name}' needs static spatial dims; give "
                          "the input's size with --input-shape (e.g. 8,3,64,64 for an image: "
                          "the file leaves it dynamic)")
    g = ctx.bwd.op("Div", [gy[0], ctx.bwd.const(float(hw))])
    return [_expand(ctx, g, node.input[0])]


def _kept(ctx, node, gy) -> tuple[list[int], str, str]:
    """The reduced axes, and y and g with those axes kept (size 1), to broadcast against x."""
    b = ctx.bwd
    axes, keep = _reduce_axes(ctx, node)
    if keep:
        return axes, node.output[0], gy[0]
    return axes, *(b.op("Unsqueeze", [t, b.ints(axes)]) for t in (node.output[0], gy[0]))


def _only_x(ctx, node, gx: str) -> list[str | None]:
    return [gx] + [None] * (len(node.input) - 1)


@RULES.gradient("ReduceMax")
def reducemax_grad(ctx, node, gy):
    """The gradient goes to the positions equal to the maximum (minimum), split evenly between
    ties."""
    b, x = ctx.bwd, node.input[0]
    axes, y, g = _kept(ctx, node, gy)
    hit = b.op("Cast", [b.op("Equal", [x, y])], to=TensorProto.FLOAT)
    count = b.op("ReduceSum", [hit, b.ints(axes)], keepdims=1)
    return _only_x(ctx, node, b.op("Mul", [hit, b.op("Div", [g, count])]))


RULES.gradient("ReduceMin")(reducemax_grad)


@RULES.gradient("ReduceL2")
def reducel2_grad(ctx, node, gy):
    """y = sqrt(Σx²): g_x = g·x / y (0 where y is 0)."""
    b, x = ctx.bwd, node.input[0]
    _, y, g = _kept(ctx, node, gy)
    safe = b.op("Max", [y, b.const(1e-30)])
    return _only_x(ctx, node, b.op("Mul", [x, b.op("Div", [g, safe])]))


@RULES.gradient("ReduceLogSumExp")
def reducelse_grad(ctx, node, gy):
    """y = log Σ exp(x): g_x = g·exp(x - y)."""
    b, x = ctx.bwd, node.input[0]
    _, y, g = _kept(ctx, node, gy)
    return _only_x(ctx, node, b.op("Mul", [g, b.op("Exp", [b.op("Sub", [x, y])])]))


@RULES.gradient("ReduceSumSquare")
def reducesumsquare_grad(ctx, node, gy):
    b, x = ctx.bwd, node.input[0]
    _, _, g = _kept(ctx, node, gy)
    return _only_x(ctx, node, b.op("Mul", [x, b.op("Mul", [g, b.const(2.0)])]))
