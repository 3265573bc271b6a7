"""Gradient rules, one small function per ONNX op, all in this file.

A rule receives the gradient-building context, the forward node and the gradients of the node's
outputs (``None`` where an output does not reach the loss) and returns one gradient name (or
``None``) per node input. Rules write standard ONNX ops only, so the backward runs on plain
onnxruntime. Forward tensors a rule reads from the backward become "saved tensors"; a rule that
wants to save something smaller (a mask, a compressed activation, a shape) computes it in the
forward with ``ctx.fwd``.

The INSTANT compressed rule for Linear / 1x1 Conv sits right beside the exact rule: see
``linear_exact`` / ``linear_instant`` and the formulas of DESIGN.md §1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .autodiff import BACKWARD_PASSES, CompressedLayer, GradContext, gradient
from .graph import ExportError

__all__: list[str] = []  # rules register themselves; nothing to import by name


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _needs(ctx: GradContext, node: onnx.NodeProto, i: int) -> bool:
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

def _transpose_last2(ctx: GradContext, t: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return ctx.bwd.op("Transpose", [t], perm=perm)


# --------------------------------------------------------------------------------------------
# Elementwise and shape ops


@gradient("Identity")
def identity_grad(ctx, node, gy):
    return [gy[0]]


@gradient("Add")
def add_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    return [unbroadcast(ctx, gy[0], y, a) if _needs(ctx, node, 0) else None,
            unbroadcast(ctx, gy[0], y, b) if _needs(ctx, node, 1) else None]


@gradient("Sub")
def sub_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    gb = None
    if _needs(ctx, node, 1):
        gb = unbroadcast(ctx, ctx.bwd.op("Neg", [gy[0]]), y, b)
    return [unbroadcast(ctx, gy[0], y, a) if _needs(ctx, node, 0) else None, gb]


@gradient("Mul")
def mul_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    ga = gb = None
    if _needs(ctx, node, 0):
        ga = unbroadcast(ctx, ctx.bwd.op("Mul", [gy[0], b]), y, a)
    if _needs(ctx, node, 1):
        gb = unbroadcast(ctx, ctx.bwd.op("Mul", [gy[0], a]), y, b)
    return [ga, gb]


@gradient("Div")
def div_grad(ctx, node, gy):
    a, b = node.input
    y = node.output[0]
    ga = gb = None
    if _needs(ctx, node, 0):
        ga = unbroadcast(ctx, ctx.bwd.op("Div", [gy[0], b]), y, a)
    if _needs(ctx, node, 1):  # d(a/b)/db = -y/b
        t = ctx.bwd.op("Neg", [ctx.bwd.op("Div", [ctx.bwd.op("Mul", [gy[0], y]), b])])
        gb = unbroadcast(ctx, t, y, b)
    return [ga, gb]


@gradient("Neg")
def neg_grad(ctx, node, gy):
    return [ctx.bwd.op("Neg", [gy[0]])]


@gradient("Relu")
def relu_grad(ctx, node, gy):
    y = node.output[0]
    per_sample = ctx.shapes.numel_static(y, list(range(1, ctx.shapes.rank(y))))
    if ctx.is_saved_already(y):  # the output is kept for another rule anyway: read it
        mask = ctx.bwd.op("Greater", [y, ctx.bwd.const(0.0)])
    elif per_sample is not None and per_sample % 8 == 0:  # 1 bit per element, as a float mask
        if gy[0] in ctx.batch_splittable:
            return [_masked_in_halves(ctx, gy[0], _pack_bits(ctx, y))]
        g = gy[0]
        if g in ctx.expanded:  # broadcast the small gradient: no full-size Expand first
            node, g = ctx.expanded[g]
            ctx.bwd.nodes.remove(node)
        return [ctx.bwd.op("Mul", [g, _unpack_bits(ctx, _pack_bits(ctx, y), ctx.shape(y))])]
    else:  # keep a 1-byte mask instead of the 4-byte activation
        mask = ctx.fwd.op("Greater", [y, ctx.fwd.const(0.0)], hint="relu_mask")
    # g ⊙ mask as Mul with the mask cast to float: onnxruntime's Where allocates two full-size
    # temporaries (measured: 218 MB vs 151 MB for a 67 MB gradient), and Mul may run in place.
    return [ctx.bwd.op("Mul", [gy[0], ctx.bwd.op("Cast", [mask], to=TensorProto.FLOAT)])]


_BIT_TABLE = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.float32)


def _pack_bits(ctx: GradContext, y: str) -> str:
    """Save ``y > 0`` as bits (8 per uint8) in the forward: [N·(elements per sample)/8, 1].

    Standard ops only: Cast(uint8)(MatMul(mask as float, [1, 2, …, 128])) on groups of 8.
    """
    f = ctx.fwd
    bits = f.op("Cast", [f.op("Greater", [y, f.const(0.0)])], to=TensorProto.FLOAT)
    weights = f.const(np.array([[2.0 ** k] for k in range(8)], dtype=np.float32))
    return f.op("Cast", [f.op("MatMul", [f.op("Reshape", [bits, f.ints([-1, 8])]), weights])],
                to=TensorProto.UINT8, hint="relu_bits")


def _unpack_bits(ctx: GradContext, packed: str, shape: str) -> str:
    """The float 0/1 mask of shape ``shape`` from packed bits: Gather rows of a [256, 8] table of
    bit patterns (twice as fast as BitShift on onnxruntime's CPU kernels, and it yields the float
    mask the Mul needs directly)."""
    b = ctx.bwd
    idx = b.op("Cast", [b.op("Reshape", [packed, b.ints([-1])])], to=TensorProto.INT32)
    return b.op("Reshape", [b.op("Gather", [b.const(_BIT_TABLE), idx], axis=0), shape])


def _masked_in_halves(ctx: GradContext, g: str, packed: str) -> str:
    """``g ⊙ mask`` for a ``g`` that is a MatMul of a batch-major operand and a matrix (INSTANT's
    g_x): the MatMul, the mask and the product run per half-batch and are concatenated.

    onnxruntime runs no elementwise op in place, so ``Mul(g, mask)`` holds three full-size
    tensors at once (g, the unpacked float mask, the product); per half the most alive is two
    full-size tensors (the halves, then the concatenation). Measured on the token-MLP benchmark
    (four [256, 128, 512] layers): INSTANT peak above idle 235 -> 186 MB (with the broadcast
    of the pooled gradient into the first mask, see relu_grad).
    """
    b = ctx.bwd
    node, k = ctx.batch_splittable[g]
    b.nodes.remove(node)  # recomputed below, half a batch at a time
    z = node.input[k]
    zero, one, axis0 = b.ints([0]), b.ints([1]), b.ints([0])
    n = b.op("Slice", [b.op("Shape", [z]), zero, one])
    half = b.op("Div", [n, b.ints([2])])
    big = b.ints([np.iinfo(np.int64).max])
    rows = b.op("Reshape", [packed, b.op("Concat", [n, b.ints([-1])], axis=0)])  # [N, bytes]
    outs = []
    for lo, hi in ((zero, half), (half, big)):
        inputs = list(node.input)
        inputs[k] = b.op("Slice", [z, lo, hi, axis0])
        gh = b.op("MatMul", inputs)
        mask = _unpack_bits(ctx, b.op("Slice", [rows, lo, hi, axis0]), b.op("Shape", [gh]))
        outs.append(b.op("Mul", [gh, mask]))
    out = b.op("Concat", outs, axis=0)
    ctx.half_concats[out] = (b.nodes[-1], outs)
    return out


@gradient("Gelu")
def gelu_grad(ctx, node, gy):
    """Exact (erf) GELU: g · (Φ(x) + x·φ(x)), recomputed from the saved input alone. Also the
    rule of the opset-20 Gelu op; torch's five-op form is fused into it (autodiff._fuse_gelu)."""
    if _attrs(node).get("approximate", "none") != "none":
        raise ExportError(f"Gelu '{node.name}': only approximate='none' is supported")
    b = ctx.bwd
    x = node.input[0]
    cdf = b.op("Mul", [b.op("Add", [b.op("Erf", [b.op("Div", [x, b.const(float(np.sqrt(2.0)))])]),
                                    b.const(1.0)]), b.const(0.5)])
    pdf = b.op("Mul", [b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.const(-0.5)])]),
                       b.const(float(1.0 / np.sqrt(2.0 * np.pi)))])
    return [b.op("Mul", [gy[0], b.op("Add", [cdf, b.op("Mul", [x, pdf])])])]


@gradient("Softmax")
def softmax_grad(ctx, node, gy):
    axis = _attrs(node).get("axis", -1)
    y = node.output[0]
    gyy = ctx.bwd.op("Mul", [gy[0], y])
    s = ctx.bwd.op("ReduceSum", [gyy, ctx.bwd.ints([axis])], keepdims=1)
    return [ctx.bwd.op("Mul", [ctx.bwd.op("Sub", [gy[0], s]), y])]


def _zeros(ctx: GradContext, shape: str) -> str:
    """A float zero tensor of runtime shape ``shape`` (an int64 vector) in the backward."""
    return ctx.bwd.op("ConstantOfShape", [shape],
                      value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))


def _mean_over(ctx: GradContext, t: str, axes: list[int], like: str) -> str:
    """Mean of ``t`` over ``axes`` (keepdims), counted on tensor ``like``; any opset (no
    ReduceMean, whose axes moved from attribute to input in opset 18)."""
    count = ctx.shapes.numel_static(like, axes)
    if count is None:
        raise ExportError(f"tensor '{like}': axes {axes} must have static sizes")
    return ctx.bwd.op("Mul", [reduce_sum(ctx, t, axes), ctx.bwd.const(1.0 / count)])


@gradient("Erf")
def erf_grad(ctx, node, gy):
    b, x = ctx.bwd, node.input[0]
    d = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])
    return [b.op("Mul", [gy[0], b.op("Mul", [d, b.const(2.0 / np.sqrt(np.pi))])])]


@gradient("Sqrt")
def sqrt_grad(ctx, node, gy):
    b = ctx.bwd
    return [b.op("Div", [gy[0], b.op("Mul", [node.output[0], b.const(2.0)])])]


@gradient("Pow")
def pow_grad(ctx, node, gy):
    x, p = node.input
    y = node.output[0]
    b = ctx.bwd
    gx = gp = None
    if _needs(ctx, node, 0):
        if p in ctx.constants:  # x^(p-1) with p - 1 folded now; p = 2 needs no Pow at all
            pv = ctx.constant_value(p).astype(np.float32)
            d = (b.op("Mul", [x, b.const(pv)]) if np.all(pv == 2.0) else
                 b.op("Mul", [b.op("Pow", [x, b.const(pv - 1.0)]), b.const(pv)]))
        else:
            d = b.op("Mul", [b.op("Pow", [x, b.op("Sub", [p, b.const(1.0)])]), p])
        gx = unbroadcast(ctx, b.op("Mul", [gy[0], d]), y, x)
    if _needs(ctx, node, 1):  # d(x^p)/dp = y log x
        gp = unbroadcast(ctx, b.op("Mul", [gy[0], b.op("Mul", [y, b.op("Log", [x])])]), y, p)
    return [gx, gp]


@gradient("Tanh")
def tanh_grad(ctx, node, gy):
    b, y = ctx.bwd, node.output[0]
    return [b.op("Mul", [gy[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]


@gradient("Sigmoid")
def sigmoid_grad(ctx, node, gy):
    b, y = ctx.bwd, node.output[0]
    return [b.op("Mul", [gy[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


@gradient("Exp")
def exp_grad(ctx, node, gy):
    return [ctx.bwd.op("Mul", [gy[0], node.output[0]])]


@gradient("Log")
def log_grad(ctx, node, gy):
    return [ctx.bwd.op("Div", [gy[0], node.input[0]])]


@gradient("Clip")
def clip_grad(ctx, node, gy):
    """The gradient passes where min < x < max (as torch's ReLU6/hardtanh). The mask is read
    from the output when a later rule keeps it alive anyway (a conv after ReLU6), else a 1-byte
    mask is saved from the forward."""
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    y = node.output[0]
    bld, t = (ctx.bwd, y) if ctx.is_saved_already(y) else (ctx.fwd, node.input[0])
    conds = ([bld.op("Greater", [t, lo])] if lo else []) + ([bld.op("Less", [t, hi])] if hi else [])
    if not conds:
        return [gy[0]] + [None] * (len(node.input) - 1)
    mask = conds[0] if len(conds) == 1 else bld.op("And", conds, hint="clip_mask")
    g = ctx.bwd.op("Mul", [gy[0], ctx.bwd.op("Cast", [mask], to=TensorProto.FLOAT)])
    return [g] + [None] * (len(node.input) - 1)


@gradient("Where")
def where_grad(ctx, node, gy):
    c, x, other = node.input
    y = node.output[0]
    b = ctx.bwd
    zero = b.const(0.0)
    gx = unbroadcast(ctx, b.op("Where", [c, gy[0], zero]), y, x) if _needs(ctx, node, 1) else None
    go = (unbroadcast(ctx, b.op("Where", [c, zero, gy[0]]), y, other)
          if _needs(ctx, node, 2) else None)
    return [None, gx, go]


@gradient("Cast")
def cast_grad(ctx, node, gy):
    src, dst = ctx.shapes.dtype.get(node.input[0]), _attrs(node)["to"]
    if not ctx.shapes.is_float(node.output[0]):
        return [None]  # float -> int/bool: no gradient
    return [gy[0] if src == dst else ctx.bwd.op("Cast", [gy[0]], to=src)]


@gradient("Dropout")
def dropout_grad(ctx, node, gy):
    if len(node.input) > 2 and node.input[2] and ctx.constant_value(node.input[2]).item():
        raise ExportError(f"Dropout '{node.name}' is in training mode; export the model in eval "
                          "mode (dropout is then the identity)")
    return [gy[0]] + [None] * (len(node.input) - 1)


@gradient("Reshape")
def reshape_grad(ctx, node, gy):
    return [ctx.bwd.op("Reshape", [gy[0], ctx.shape(node.input[0])])] + [None] * (len(node.input) - 1)


for _op in ("Flatten", "Squeeze", "Unsqueeze"):
    gradient(_op)(reshape_grad)


@gradient("Transpose")
def transpose_grad(ctx, node, gy):
    perm = _attrs(node).get("perm")
    if perm is None:
        perm = list(reversed(range(ctx.shapes.rank(node.input[0]))))
    inv = list(np.argsort(perm))
    return [ctx.bwd.op("Transpose", [gy[0]], perm=[int(i) for i in inv])]


@gradient("Concat")
def concat_grad(ctx, node, gy):
    axis = _attrs(node)["axis"]
    sizes = []
    for i in node.input:
        d = ctx.shapes.of(i)[axis]
        if not isinstance(d, int):
            raise ExportError(f"Concat node '{node.name}': input '{i}' has a dynamic size along "
                              f"axis {axis}; only static concat sizes are supported")
        sizes.append(d)
    parts = ctx.bwd.op_multi("Split", [gy[0], ctx.bwd.ints(sizes)], n_out=len(sizes), axis=axis)
    return [p if ctx.needs_grad(i) else None for p, i in zip(parts, node.input, strict=True)]


@gradient("Expand")
def expand_grad(ctx, node, gy):
    return [unbroadcast(ctx, gy[0], node.output[0], node.input[0]), None]


@gradient("Slice")
def slice_grad(ctx, node, gy):
    """Pad the gradient back to the input's shape (step 1 only; axes and steps constants).

    Constant starts/ends give constant pads; computed ones (``chunk`` exports its bounds from
    ``Shape``) give pads computed in the backward by ``_slice_pads``.
    """
    x = node.input[0]
    dims = ctx.shapes.of(x)
    rank = len(dims)
    opt = [ctx.constant_value(i).tolist() if i else None for i in list(node.input[3:5])]
    n_axes = ctx.shapes.numel_static(node.input[1], [0])
    axes = opt[0] if opt and opt[0] is not None else list(range(n_axes or 0))
    steps = opt[1] if len(opt) > 1 and opt[1] is not None else [1] * len(axes)
    if any(s != 1 for s in steps):
        raise ExportError(f"Slice '{node.name}': only step 1 is supported, got steps {steps}")
    axes = [a % rank for a in axes]
    rest = [None] * (len(node.input) - 1)
    if not all(i in ctx.constants for i in node.input[1:3]) or not all(
            isinstance(dims[a], int) for a in axes):
        return [ctx.bwd.op("Pad", [gy[0], _slice_pads(ctx, node, axes, rank)])] + rest
    starts, ends = (ctx.constant_value(i).tolist() for i in node.input[1:3])
    pads = [0] * (2 * rank)
    for st, en, ax in zip(starts, ends, axes, strict=True):
        d = dims[ax]
        st, en = (min(max(v + d if v < 0 else v, 0), d) for v in (st, en))
        pads[ax], pads[rank + ax] = st, d - max(en, st)
    return [ctx.bwd.op("Pad", [gy[0], ctx.bwd.ints(pads)])] + rest


def _slice_pads(ctx: GradContext, node: onnx.NodeProto, axes: list[int], rank: int) -> str:
    """Pads [begin..., end...] of a step-1 Slice, computed at run time: begin = the start
    normalised and clamped to [0, dim]; end = dim - begin - output size."""
    b = ctx.bwd
    shape = ctx.shape(node.input[0])
    dims = b.op("Gather", [shape, b.ints(axes)])
    st = b.op("Cast", [node.input[1]], to=TensorProto.INT64)
    st = b.op("Add", [st, b.op("Mul", [dims, b.op("Cast", [b.op("Less", [st, b.ints([0])])],
                                                      to=TensorProto.INT64)])])
    st = b.op("Max", [b.op("Min", [st, dims]), b.ints([0])])
    begin = b.op("ScatterElements", [b.ints([0] * rank), b.ints(axes), st], axis=0)
    end = b.op("Sub", [b.op("Sub", [shape, begin]), ctx.shape(node.output[0])])
    return b.op("Concat", [begin, end], axis=0)


@gradient("Pad")
def pad_grad(ctx, node, gy):
    """Constant-mode Pad: the gradient is the input window, a Pad by the negated pads (which
    crops; pads may be computed in the forward, as the TorchScript exporter writes F.pad)."""
    mode = _attrs(node).get("mode", "constant")
    if mode != "constant":
        raise ExportError(f"Pad '{node.name}': mode '{mode}' is not supported (constant only)")
    b = ctx.bwd
    neg = b.op("Neg", [node.input[1]])
    axes = [node.input[3]] if len(node.input) > 3 and node.input[3] else []
    return [b.op("Pad", [gy[0], neg, ""] + axes if axes else [gy[0], neg])] + \
        [None] * (len(node.input) - 1)


@gradient("Split")
def split_grad(ctx, node, gy):
    """Concat the output gradients, zeros for outputs that do not reach the loss."""
    parts = [g if g is not None else _zeros(ctx, ctx.shape(o))
             for o, g in zip(node.output, gy, strict=True)]
    return [ctx.bwd.op("Concat", parts, axis=_attrs(node).get("axis", 0))] + \
        [None] * (len(node.input) - 1)


@gradient("Gather")
def gather_grad(ctx, node, gy):
    """Scatter-add the gradient rows into zeros shaped like ``data`` (an embedding table).

    The gathered axis is moved to the front so that ScatterND (reduction add: repeated indices
    accumulate) indexes it; indices are taken modulo the axis size (negative indices).
    """
    if not _needs(ctx, node, 0):
        return [None, None]
    data, idx = node.input
    b = ctx.bwd
    rank = ctx.shapes.rank(data)
    axis = _attrs(node).get("axis", 0) % rank
    g, ri = gy[0], ctx.shapes.rank(idx)
    if ri == 0:  # a scalar index drops the axis: put it back
        idx, g, ri = b.op("Reshape", [idx, b.ints([1])]), b.op("Unsqueeze", [g, b.ints([axis])]), 1
    front = [axis] + [a for a in range(rank) if a != axis]  # data axes, gathered axis first
    perm = list(range(axis, axis + ri)) + list(range(axis)) + list(range(axis + ri, rank - 1 + ri))
    if perm != sorted(perm):
        g = b.op("Transpose", [g], perm=perm)
    shape = ctx.shape(data)
    zeros = _zeros(ctx, b.op("Gather", [shape, b.ints(front)]) if axis else shape)
    size = b.op("Gather", [shape, b.ints([axis])])
    pos = b.op("Unsqueeze", [b.op("Mod", [idx, size]), b.ints([-1])])
    out = b.op("ScatterND", [zeros, pos, g], reduction="add")
    if axis:
        out = b.op("Transpose", [out], perm=[int(i) for i in np.argsort(front)])
    return [out, None]


def _reduce_axes(ctx, node) -> tuple[list[int], int]:
    a = _attrs(node)
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
    """``g`` expanded to the shape of forward tensor ``like``, marked as such for consumers."""
    out = ctx.bwd.op("Expand", [g, ctx.shape(like)])
    ctx.expanded[out] = (ctx.bwd.nodes[-1], g)
    return out


@gradient("ReduceSum")
def reducesum_grad(ctx, node, gy):
    return [_reduce_back(ctx, node, gy[0], None)] + [None] * (len(node.input) - 1)


@gradient("ReduceMean")
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


@gradient("GlobalAveragePool")
def gap_grad(ctx, node, gy):
    dims = ctx.shapes.of(node.input[0])
    hw = ctx.shapes.numel_static(node.input[0], list(range(2, len(dims))))
    if hw is None:
        raise ExportError(f"GlobalAveragePool '{node.name}' needs static spatial dims")
    g = ctx.bwd.op("Div", [gy[0], ctx.bwd.const(float(hw))])
    return [_expand(ctx, g, node.input[0])]


# --------------------------------------------------------------------------------------------
# Loss


@gradient("SoftmaxCrossEntropyLoss")
def softmax_ce_grad(ctx, node, gy):
    a = _attrs(node)
    scores, labels = node.input[0], node.input[1]
    if len(node.input) > 2 or "ignore_index" in a or ctx.shapes.rank(scores) != 2:
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': only 2-D scores without "
                          "weights or ignore_index are supported")
    classes = ctx.shapes.of(scores)[1]
    if not isinstance(classes, int):
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': the class count must be static")
    b = ctx.bwd
    prob = b.op("Softmax", [scores], axis=1)
    onehot = b.op("OneHot", [labels, b.const(classes, np.int64), b.const([0.0, 1.0])], axis=-1)
    g = b.op("Mul", [b.op("Sub", [prob, onehot]), gy[0]])
    if a.get("reduction", "mean") == "mean":
        n = b.op("Slice", [ctx.shape(scores), b.ints([0]), b.ints([1])])
        g = b.op("Div", [g, b.op("Cast", [n], to=TensorProto.FLOAT)])
    elif a.get("reduction") != "sum":
        raise ExportError(f"SoftmaxCrossEntropyLoss '{node.name}': reduction must be mean or sum")
    return [g, None]


# --------------------------------------------------------------------------------------------
# Linear layers: exact rule and INSTANT rule side by side.
#
# Per sample the activation is a matrix; its two last axes are (L, C) for a Linear and (C, L)
# for a 1x1 Conv (viewed as [N, C, H*W]). A basis acts on one of those two axes: the "left" one
# (axis -2) or the "right" one (axis -1).


def _left(layer: CompressedLayer, which: str) -> bool:
    axis = layer.x_axis if which == "x" else layer.g_axis
    token = axis == "token"
    return token if layer.kind == "linear" else not token


def _as_matrix(layer: CompressedLayer, t: str, builder) -> str:
    """[N, C, H, W] -> [N, C, L] for a 1x1 conv; a Linear's activation is already a matrix."""
    if layer.kind == "conv1x1":
        return builder.op("Reshape", [t, builder.ints([0, layer.cx if t == layer.x else layer.cy,
                                                        -1])])
    return t


def _project(b, basis: str, m: str, left: bool) -> str:
    """Apply basis ``basis`` [R, D] to axis -2 (left: B @ M) or axis -1 (right: M @ Bᵀ)."""
    if left:
        return b.op("MatMul", [basis, m])
    return b.op("MatMul", [m, b.op("Transpose", [basis], perm=[1, 0])])


def _gram(b, m: str, left: bool, rank: int) -> str:
    """Σ over samples of the per-sample Gram along the projected axis: a [D, D] matrix."""
    if left:
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        m = b.op("Transpose", [m], perm=perm)
    flat = b.op("Flatten", [m], axis=rank - 1)
    return b.op("Gemm", [flat, flat], transA=1)


def _weight_canonical(b, layer: CompressedLayer) -> str:
    """The weight as W_c [Cy, Cx]."""
    if layer.kind == "conv1x1":
        return b.op("Reshape", [layer.weight, b.ints([layer.cy, layer.cx])])
    if layer.weight_layout == "in_out":
        return b.op("Transpose", [layer.weight], perm=[1, 0])
    return layer.weight


def _weight_from_canonical(b, layer: CompressedLayer, dw_c: str) -> str:
    if layer.kind == "conv1x1":
        return b.op("Reshape", [dw_c, b.ints([layer.cy, layer.cx, 1, 1])])
    if layer.weight_layout == "in_out":
        return b.op("Transpose", [dw_c], perm=[1, 0])
    return dw_c


def linear_calib_grams(ctx: GradContext, layer: CompressedLayer, g: str) -> None:
    """Calibration: emit Σ_b X_b X_bᵀ (forward) and Σ_b G_b G_bᵀ (backward) for this layer."""
    rank = 3 if (layer.kind == "conv1x1" or layer.rank3) else 2
    x = _as_matrix(layer, layer.x, ctx.fwd)
    ctx.fwd_outputs.append(ctx.fwd.op("Identity", [_gram(ctx.fwd, x, _left(layer, "x"), rank)],
                                      out=f"gram_x.{layer.name}"))
    gm = ctx.bwd.op("Reshape", [g, ctx.bwd.ints([0, layer.cy, -1])]) if layer.kind == "conv1x1" \
        else g
    ctx.bwd_outputs.append(ctx.bwd.op("Identity", [_gram(ctx.bwd, gm, _left(layer, "g"), rank)],
                                      out=f"gram_g.{layer.name}"))


def linear_instant(ctx: GradContext, layer: CompressedLayer, g: str, need_x: bool,
                   need_w: bool) -> tuple[str | None, str | None]:
    """INSTANT backward of ``y = x Wᵀ`` (DESIGN.md §1). Returns (g_x, g_W in the weight's layout).

    The forward saves only x̂ = P·x (token axis) or x·Pᵀ (channel axis); g_W is computed from x̂
    and the output gradient projected on the same basis; g_x goes through the gradient basis Q.
    """
    f, b = ctx.fwd, ctx.bwd
    P, Q = layer.p_input, layer.q_input
    conv = layer.kind == "conv1x1"
    gm = b.op("Reshape", [g, b.ints([0, layer.cy, -1])]) if conv else g
    gx = gw = None
    if need_w:
        xhat = _project(f, P, _as_matrix(layer, layer.x, f), _left(layer, "x"))
        if not conv and layer.x_axis == "token":      # x̂ [N,Rx,Cx], ĝ = P g [N,Rx,Cy]
            ghat = _batch_major(ctx, b.op("MatMul", [P, gm]), 1)
            dw = b.op("Gemm", [b.op("Flatten", [ghat], axis=2), b.op("Flatten", [xhat], axis=2)],
                      transA=1)                                        # [Cy, Cx]
        elif not conv:                                # x̂ [.., L, Rx]: g_W = (gᵀ x̂) P
            ax = 2 if layer.rank3 else 1
            t = b.op("Gemm", [b.op("Flatten", [gm], axis=ax), b.op("Flatten", [xhat], axis=ax)],
                     transA=1)
            dw = b.op("MatMul", [t, P])                                # [Cy, Cx]
        elif layer.x_axis == "token":                 # conv: x̂ [N,Cx,Rx], ĝ' = g Pᵀ [N,Cy,Rx]
            ghat = b.op("MatMul", [gm, b.op("Transpose", [P], perm=[1, 0])])
            gt = b.op("Reshape", [b.op("Transpose", [ghat], perm=[1, 0, 2]),
                                  b.ints([layer.cy, -1])])
            xt = b.op("Reshape", [b.op("Transpose", [xhat], perm=[1, 0, 2]),
                                  b.ints([layer.cx, -1])])
            dw = b.op("Gemm", [gt, xt], transB=1)                      # [Cy, Cx]
        else:                                         # conv: x̂ [N,Rx,L]: Σ_n g_n x̂_nᵀ · P
            t = b.op("MatMul", [gm, b.op("Transpose", [xhat], perm=[0, 2, 1])])
            dw = b.op("MatMul", [b.op("ReduceSum", [t, b.ints([0])], keepdims=0), P])
        gw = _weight_from_canonical(b, layer, dw)
    if need_x:
        wc = _weight_canonical(b, layer)                               # [Cy, Cx]
        if not conv and layer.g_axis == "token":      # Qᵀ((Q g) W)
            qg = _batch_major(ctx, b.op("MatMul", [Q, gm]), 1)
            gx = b.op("MatMul", [b.op("Transpose", [Q], perm=[1, 0]), b.op("MatMul", [qg, wc])])
            ctx.batch_splittable[gx] = (b.nodes[-1], 1)
        elif not conv:                                # (g Qᵀ)(Q W)
            gq = _batch_major(ctx, b.op("MatMul", [gm, b.op("Transpose", [Q], perm=[1, 0])]), 0)
            gx = b.op("MatMul", [gq, b.op("MatMul", [Q, wc])])
            ctx.batch_splittable[gx] = (b.nodes[-1], 0)
        elif layer.g_axis == "token":                 # conv, stored transposed: Wᵀ (g Qᵀ) Q
            gq = b.op("MatMul", [gm, b.op("Transpose", [Q], perm=[1, 0])])
            gx = b.op("MatMul", [b.op("MatMul", [b.op("Transpose", [wc], perm=[1, 0]), gq]), Q])
        else:                                         # conv: (Q W)ᵀ (Q g)
            qw = b.op("MatMul", [Q, wc])
            gx = b.op("MatMul", [b.op("Transpose", [qw], perm=[1, 0]), b.op("MatMul", [Q, gm])])
        if conv:
            gx = b.op("Reshape", [gx, ctx.shape(layer.x)])
    return gx, gw


def _batch_major(ctx: GradContext, out: str, k: int) -> str:
    """Mark the node just added (output ``out``) as batch-separable in its input ``k``: applied
    to two halves of the batch it gives the two halves of its output."""
    ctx.batch_major[ctx.bwd.nodes[-1].name] = k
    return out


def push_half_concats(ctx: GradContext) -> None:
    """Let the consumers of a per-half-batch result (``_masked_in_halves``) read the halves.

    ``Concat(h₁, h₂)`` is a full-size copy, and its consumers in an INSTANT layer (projections
    on the bases, the bias ``ReduceSum``) are separable along the batch: run each on both halves
    and concatenate (small, projected) or add (reduced over the batch) the results. Done only
    when every consumer is separable; the Concat then disappears.
    """
    b = ctx.bwd
    for out, (concat, halves) in ctx.half_concats.items():
        users = [n for n in b.nodes if out in n.input]
        if not users or not all(_separable(ctx, n, out) for n in users):
            continue
        for n in users:
            start = len(b.nodes)
            parts = []
            for h in halves:
                inputs = [h if i == out else i for i in n.input]
                parts.append(b.op(n.op_type, inputs, **{a.name: helper.get_attribute_value(a)
                                                        for a in n.attribute}))
            combine = "Add" if n.op_type == "ReduceSum" else "Concat"
            b.op(combine, parts, out=n.output[0], **({"axis": 0} if combine == "Concat" else {}))
            new = b.nodes[start:]
            del b.nodes[start:]
            at = b.nodes.index(n)
            b.nodes[at:at + 1] = new
        b.nodes.remove(concat)


BACKWARD_PASSES.append(push_half_concats)


def _separable(ctx: GradContext, n, out: str) -> bool:
    if n.op_type == "MatMul":
        k = ctx.batch_major.get(n.name)
        return k is not None and n.input[k] == out and n.input[1 - k] != out
    if n.op_type == "ReduceSum" and n.input[0] == out and len(n.input) > 1:
        axes = ctx.bwd_constant(n.input[1])
        return axes is not None and 0 in axes.tolist()
    return False


def linear_exact(ctx: GradContext, x: str, w: str, g: str, need_x: bool, need_w: bool,
                 w_out_in: bool) -> tuple[str | None, str | None]:
    """Exact backward of a MatMul whose second operand ``w`` is a 2-D weight.

    ``w_out_in``: the weight is stored [Cy, Cx] (Gemm transB=1); otherwise [Cx, Cy].
    """
    b = ctx.bwd
    gx = gw = None
    rank = ctx.shapes.rank(x)
    if need_w:
        xf = b.op("Flatten", [x], axis=rank - 1)
        gf = b.op("Flatten", [g], axis=rank - 1)
        gw = b.op("Gemm", [gf, xf], transA=1) if w_out_in else b.op("Gemm", [xf, gf], transA=1)
    if need_x:
        wt = w if w_out_in else b.op("Transpose", [w], perm=[1, 0])
        gx = b.op("MatMul", [g, wt])
    return gx, gw


def _compressed(ctx: GradContext, node, g: str) -> CompressedLayer | None:
    """The INSTANT layer for this node in instant mode; in calib mode emit its Grams first."""
    layer = ctx.layer(node)
    if layer is None:
        return None
    if ctx.mode == "calib":
        linear_calib_grams(ctx, layer, g)
        return None
    return layer


@gradient("MatMul")
def matmul_grad(ctx, node, gy):
    a, bw = node.input
    g = gy[0]
    layer = _compressed(ctx, node, g)
    if layer is not None:
        gx, gw = linear_instant(ctx, layer, g, _needs(ctx, node, 0), _needs(ctx, node, 1))
        return [gx, gw]
    ra, rb = ctx.shapes.rank(a), ctx.shapes.rank(bw)
    if rb == 2 and ra >= 2:
        return list(linear_exact(ctx, a, bw, g, _needs(ctx, node, 0), _needs(ctx, node, 1),
                                 w_out_in=False))
    if ra < 2 or rb < 2:
        raise ExportError(f"MatMul '{node.name}': 1-D operands are not supported")
    y = node.output[0]
    ga = gb = None
    if _needs(ctx, node, 0):
        ga = unbroadcast(ctx, ctx.bwd.op("MatMul", [g, _transpose_last2(ctx, bw, rb)]), y, a) \
            if ra == ctx.shapes.rank(y) else None
        if ga is None:
            raise ExportError(f"MatMul '{node.name}': broadcasting of the first operand")
    if _needs(ctx, node, 1):
        t = ctx.bwd.op("MatMul", [_transpose_last2(ctx, a, ra), g])
        gb = unbroadcast(ctx, t, y, bw)
    return [ga, gb]


@gradient("Gemm")
def gemm_grad(ctx, node, gy):
    at = _attrs(node)
    ta, tb = at.get("transA", 0), at.get("transB", 0)
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    A, B = node.input[0], node.input[1]
    g = gy[0]
    b = ctx.bwd
    gc = None
    if _needs(ctx, node, 2):
        gsc = g if beta == 1.0 else b.op("Mul", [g, b.const(beta)])
        gc = unbroadcast(ctx, gsc, node.output[0], node.input[2])
    layer = _compressed(ctx, node, g)
    if layer is not None:
        gx, gw = linear_instant(ctx, layer, g, _needs(ctx, node, 0), _needs(ctx, node, 1))
        return [gx, gw, gc][: len(node.input)]
    ga = gb = None
    if _needs(ctx, node, 0):
        if not ta:
            ga = b.op("Gemm", [g, B], alpha=alpha, transB=0 if tb else 1)
        else:
            ga = b.op("Gemm", [B, g], alpha=alpha, transA=tb, transB=1)
    if _needs(ctx, node, 1):
        if not tb:
            gb = b.op("Gemm", [A, g], alpha=alpha, transA=0 if ta else 1)
        else:
            gb = b.op("Gemm", [g, A], alpha=alpha, transA=1, transB=ta)
    return [ga, gb, gc][: len(node.input)]


# --------------------------------------------------------------------------------------------
# Convolution, pooling, normalisation


def _conv_attrs(node, k: list[int]):
    a = _attrs(node)
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise ExportError(f"node '{node.name}': auto_pad is not supported; export with "
                          "explicit pads")
    nsp = len(k)
    strides = list(a.get("strides", [1] * nsp))
    dil = list(a.get("dilations", [1] * nsp))
    pads = list(a.get("pads", [0] * 2 * nsp))
    return strides, dil, pads, int(a.get("group", 1))


def _output_padding(ctx, node, x: str, y: str, k, strides, dil, pads) -> list[int]:
    xs, ys = ctx.shapes.of(x)[2:], ctx.shapes.of(y)[2:]
    if not all(isinstance(d, int) for d in list(xs) + list(ys)):
        raise ExportError(f"node '{node.name}': spatial dims must be static")
    n = len(k)
    return [xs[i] - ((ys[i] - 1) * strides[i] - pads[i] - pads[n + i] + dil[i] * (k[i] - 1) + 1)
            for i in range(n)]


@gradient("Conv")
def conv_grad(ctx, node, gy):
    x, w = node.input[0], node.input[1]
    g = gy[0]
    b = ctx.bwd
    gbias = None
    if _needs(ctx, node, 2):
        gbias = reduce_sum(ctx, g, [0] + list(range(2, ctx.shapes.rank(x))), keepdims=0)
    layer = _compressed(ctx, node, g)
    if layer is not None:
        gx, gw = linear_instant(ctx, layer, g, _needs(ctx, node, 0), _needs(ctx, node, 1))
        return [gx, gw, gbias][: len(node.input)]
    ws = ctx.shapes.of(w)
    k = [int(d) for d in ws[2:]]
    if len(k) != 2:
        raise ExportError(f"Conv '{node.name}': only 2-D convolutions are supported (got "
                          f"{len(k)}-D)")
    strides, dil, pads, group = _conv_attrs(node, k)
    gx = gw = None
    if _needs(ctx, node, 0):
        outpad = _output_padding(ctx, node, x, node.output[0], k, strides, dil, pads)
        gx = b.op("ConvTranspose", [g, w], strides=strides, dilations=dil, pads=pads,
                  group=group, kernel_shape=k, output_padding=outpad)
    if _needs(ctx, node, 1):
        cin = ctx.shapes.of(x)[1]
        cout = int(ws[0])
        xs, ys = ctx.shapes.of(x)[2:], ctx.shapes.of(node.output[0])[2:]
        cig, cog = int(cin) // group, cout // group
        # g_W[co, ci, k] = Σ_n Σ_o g[n,co,o] x[n,ci,o*s + k*d - p]: a convolution of x (batch =
        # input channel within the group) by g (as the kernel), strides and dilations swapped.
        xg = b.op("Reshape", [x, b.ints([0, group, cig, xs[0], xs[1]])])
        xg = b.op("Transpose", [xg], perm=[2, 1, 0, 3, 4])
        xg = b.op("Reshape", [xg, b.ints([cig, -1, xs[0], xs[1]])])
        kg = b.op("Reshape", [g, b.ints([0, group, cog, ys[0], ys[1]])])
        kg = b.op("Transpose", [kg], perm=[1, 2, 0, 3, 4])
        kg = b.op("Reshape", [kg, b.ints([cout, -1, ys[0], ys[1]])])
        full = b.op("Conv", [xg, kg], strides=dil, dilations=strides, pads=pads, group=group)
        cut = b.op("Slice", [full, b.ints([0, 0]), b.ints(k), b.ints([2, 3])])
        gw = b.op("Transpose", [cut], perm=[1, 0, 2, 3])
    return [gx, gw, gbias][: len(node.input)]


@gradient("MaxPool")
def maxpool_grad(ctx, node, gy):
    a = _attrs(node)
    if a.get("storage_order", 0) != 0:
        raise ExportError(f"MaxPool '{node.name}': storage_order=1 is not supported")
    if len(node.output) < 2 or not node.output[1]:
        # Ask the forward node for its argmax indices: they are all the backward needs.
        del node.output[1:]
        node.output.append(f"{node.output[0]}.indices")
    idx = node.output[1]
    b = ctx.bwd
    shape = ctx.shape(node.input[0])
    numel = b.op("ReduceProd", [shape], keepdims=1)
    zeros = b.op("ConstantOfShape", [numel],
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    flat = b.op("ScatterElements", [zeros, b.op("Reshape", [idx, b.ints([-1])]),
                                    b.op("Reshape", [gy[0], b.ints([-1])])],
                axis=0, reduction="add")
    return [b.op("Reshape", [flat, shape])]


@gradient("AveragePool")
def avgpool_grad(ctx, node, gy):
    a = _attrs(node)
    k = list(a["kernel_shape"])
    x = node.input[0]
    strides, dil, pads, _ = _conv_attrs(node, k)
    if any(pads) and not a.get("count_include_pad", 0):
        raise ExportError(f"AveragePool '{node.name}': padding with count_include_pad=0 is not "
                          "supported")
    if a.get("ceil_mode", 0):
        raise ExportError(f"AveragePool '{node.name}': ceil_mode=1 is not supported")
    c = ctx.shapes.of(x)[1]
    if not isinstance(c, int):
        raise ExportError(f"AveragePool '{node.name}': the channel count must be static")
    b = ctx.bwd
    kern = b.const(np.full([c, 1] + k, 1.0 / float(np.prod(k)), dtype=np.float32))
    outpad = _output_padding(ctx, node, x, node.output[0], k, strides, [1] * len(k), pads)
    return [b.op("ConvTranspose", [gy[0], kern], strides=strides, pads=pads, group=c,
                 kernel_shape=k, output_padding=outpad)]


@gradient("BatchNormalization")
def batchnorm_grad(ctx, node, gy):
    a = _attrs(node)
    if a.get("training_mode", 0):
        raise ExportError(f"BatchNormalization '{node.name}' is in training form; export the "
                          "model in eval mode (running statistics) to fine-tune it")
    x, scale, bias, mean, var = node.input[:5]
    for i in (3, 4):
        if _needs(ctx, node, i):
            raise ExportError(f"BatchNormalization '{node.name}': running statistics "
                              f"'{node.input[i]}' cannot be trainable")
    eps = float(a.get("epsilon", 1e-5))
    b = ctx.bwd
    rank = ctx.shapes.rank(x)
    c = ctx.shapes.of(x)[1]
    bshape = b.ints([c] + [1] * (rank - 2))
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(eps)])])])
    axes = [0] + list(range(2, rank))
    gx = gs = gb = None
    if _needs(ctx, node, 0):
        gx = b.op("Mul", [gy[0], b.op("Reshape", [b.op("Mul", [scale, inv]), bshape])])
    if _needs(ctx, node, 1):
        xhat = b.op("Mul", [b.op("Sub", [x, b.op("Reshape", [mean, bshape])]),
                            b.op("Reshape", [inv, bshape])])
        gs = reduce_sum(ctx, b.op("Mul", [gy[0], xhat]), axes, keepdims=0)
    if _needs(ctx, node, 2):
        gb = reduce_sum(ctx, gy[0], axes, keepdims=0)
    return [gx, gs, gb, None, None]


def _layernorm_stats(node: onnx.NodeProto) -> tuple[str, str]:
    """Ask the forward LayerNormalization for its Mean and InvStdDev outputs (small: one value
    per normalised row), as the MaxPool rule asks for indices."""
    while len(node.output) < 3:
        node.output.append("")
    for i, suffix in ((1, "mean"), (2, "invstd")):
        if not node.output[i]:
            node.output[i] = f"{node.output[0]}.{suffix}"
    return node.output[1], node.output[2]


@gradient("LayerNormalization")
def layernorm_grad(ctx, node, gy):
    """y = x̂·scale + B, x̂ = (x - mean)·invstd over axes [axis, rank);
    g_x = invstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) with ĝ = g·scale."""
    x, scale = node.input[0], node.input[1]
    y, g, b = node.output[0], gy[0], ctx.bwd
    rank = ctx.shapes.rank(x)
    axes = list(range(_attrs(node).get("axis", -1) % rank, rank))
    gx = gs = gb = None
    if _needs(ctx, node, 2):
        gb = unbroadcast(ctx, g, y, node.input[2])
    if _needs(ctx, node, 0) or _needs(ctx, node, 1):
        mean, invstd = _layernorm_stats(node)
        xhat = b.op("Mul", [b.op("Sub", [x, mean]), invstd])
        if _needs(ctx, node, 1):
            gs = unbroadcast(ctx, b.op("Mul", [g, xhat]), y, scale)
        if _needs(ctx, node, 0):
            gh = b.op("Mul", [g, scale])
            m1 = _mean_over(ctx, gh, axes, x)
            m2 = _mean_over(ctx, b.op("Mul", [gh, xhat]), axes, x)
            gx = b.op("Mul", [b.op("Sub", [b.op("Sub", [gh, m1]), b.op("Mul", [xhat, m2])]),
                              invstd])
    return [gx, gs, gb][: len(node.input)]
