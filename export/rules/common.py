"""Helpers shared by the gradient rules (attribute reading, broadcasting, reductions)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..autodiff import GradContext
from ..graph import ExportError

__all__ = ["attrs", "int8_roundtrip", "mean_over", "needs", "reduce_sum", "saved",
           "transpose_last2", "unbroadcast", "zeros"]

SAVED_INT8_MIN = 1024  # per-sample elements below which a tensor is saved as it is


def attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def needs(ctx: GradContext, node: onnx.NodeProto, i: int) -> bool:
    """Whether input ``i`` of ``node`` needs a gradient."""
    return i < len(node.input) and bool(node.input[i]) and ctx.needs_grad(node.input[i])


def reduce_sum(ctx: GradContext, t: str, axes: list[int], keepdims: int = 1) -> str:
    return ctx.bwd.op("ReduceSum", [t, ctx.bwd.ints(axes)], keepdims=keepdims)


def unbroadcast(ctx: GradContext, g: str, out: str, target: str) -> str:
    """Sum ``g`` (shaped like ``out``) down to the shape of ``target`` (numpy broadcasting)."""
    os_, ts = ctx.shapes.of(out), ctx.shapes.of(target)
    lead = len(os_) - len(ts)
    if any(not isinstance(d, int) and d != os_[lead + i] for i, d in enumerate(ts)):
        return _unbroadcast_runtime(ctx, g, target, lead)  # a symbolic dim may be a broadcast 1
    axes = list(range(lead))
    for i, d in enumerate(ts):
        if d == 1 and os_[lead + i] != 1:
            axes.append(lead + i)
    if not axes:
        return g
    summed = reduce_sum(ctx, g, axes, keepdims=1)
    return ctx.bwd.op("Reshape", [summed, ctx.shape(target)])


def _unbroadcast_runtime(ctx: GradContext, g: str, target: str, lead: int) -> str:
    """``unbroadcast`` when shape inference cannot tell whether a symbolic dim of ``target`` is a
    broadcast 1 (BERT's position embeddings are [unk, unk, 384] against [unk, 64, 384]): the
    summed axes are found at run time (dims that are 1 in ``target`` but not in ``g``)."""
    b = ctx.bwd
    tshape = ctx.shape(target)
    full = b.op("Concat", [b.ints([1] * lead), tshape], axis=0) if lead else tshape
    one = b.ints([1])
    bcast = b.op("And", [b.op("Equal", [full, one]),
                         b.op("Not", [b.op("Equal", [b.op("Shape", [g]), one])])])
    axes = b.op("Reshape", [b.op("NonZero", [bcast]), b.ints([-1])])
    summed = b.op("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
    return b.op("Reshape", [summed, tshape])


def transpose_last2(ctx: GradContext, t: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return ctx.bwd.op("Transpose", [t], perm=perm)


def zeros(ctx: GradContext, shape: str) -> str:
    """A float zero tensor of runtime shape ``shape`` (an int64 vector) in the backward."""
    return ctx.bwd.op("ConstantOfShape", [shape],
                      value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))


def mean_over(ctx: GradContext, t: str, axes: list[int], like: str) -> str:
    """Mean of ``t`` over ``axes`` (keepdims), counted on tensor ``like``; any opset (no
    ReduceMean, whose axes moved from attribute to input in opset 18)."""
    count = ctx.shapes.numel_static(like, axes)
    if count is None:
        raise ExportError(f"tensor '{like}': axes {axes} must have static sizes")
    return ctx.bwd.op("Mul", [reduce_sum(ctx, t, axes), ctx.bwd.const(1.0 / count)])


def int8_roundtrip(ctx: GradContext, t: str, axis: int, nonneg: bool = False) -> str:
    """Save forward tensor ``t`` as int8 with one float32 scale ``s = max|t| / 127`` per slice
    along ``axis`` (uint8 and ``max(t) / 255`` when ``nonneg``); returns the backward's
    ``q · s``. Deterministic rounding: the error is at most ``s / 2`` per element."""
    f, b = ctx.fwd, ctx.bwd
    if ctx.opset >= 18:
        amax = f.op("ReduceMax", [f.op("Abs", [t]), f.ints([axis])], keepdims=1)
    else:
        amax = f.op("ReduceMax", [f.op("Abs", [t])], axes=[axis], keepdims=1)
    levels = 255.0 if nonneg else 127.0
    scale = f.op("Div", [f.op("Max", [amax, f.const(1e-30)]), f.const(levels)], hint="int8_scale")
    q = f.op("Cast", [f.op("Round", [f.op("Div", [t, scale])])],
             to=TensorProto.UINT8 if nonneg else TensorProto.INT8, hint="int8")
    return b.op("Mul", [b.op("Cast", [q], to=TensorProto.FLOAT), scale])


def saved(ctx: GradContext, t: str, nonneg: bool = False) -> str:
    """Forward tensor ``t`` as the backward reads it.

    Exact variant: ``t`` itself (kept alive from the forward: a saved tensor). Compressed variant
    (``ctx.compress_saved``: instant mode, ``export --saved-int8``): the forward stores
    ``q = round(t / s)`` as int8 with one scale ``s = max|row| / 127`` per row of the last axis
    (4 bytes per row), and the backward reads ``q · s``; the error is at most ``s / 2`` per
    element, 0.4 % of the row's largest magnitude (deterministic rounding: bounded, not unbiased).
    Tensors under ``SAVED_INT8_MIN`` elements per sample, graph inputs and constants stay exact.
    ``nonneg`` (a softmax output): uint8 with ``s = max(row) / 255``, twice the resolution.
    """
    if not ctx.compress_saved or t in ctx.constants or t in ctx.graph_inputs:
        return t
    dims = ctx.shapes.shape.get(t)
    if not dims or len(dims) < 2 or not ctx.shapes.is_float(t):
        return t
    per = ctx.shapes.numel_static(t, list(range(1, len(dims))))
    if per is None or per < SAVED_INT8_MIN:
        return t
    if t in ctx.saved_cache:
        return ctx.saved_cache[t]
    out = int8_roundtrip(ctx, t, -1, nonneg)
    ctx.saved_cache[t] = out
    return out
