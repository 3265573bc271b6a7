"""Gradient rules of shape and indexing ops: reshapes, transposes, concatenation, slicing,
padding, splitting and gathering (exact)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..autodiff import GradContext, RuleSet
from ..graph import ExportError
from .common import attrs, needs, unbroadcast, zeros

RULES = RuleSet("shape")


@RULES.gradient("Reshape")
def reshape_grad(ctx, node, gy):
    return [ctx.bwd.op("Reshape", [gy[0], ctx.shape(node.input[0])])] + [None] * (len(node.input) - 1)


for _op in ("Flatten", "Squeeze", "Unsqueeze"):
    RULES.gradient(_op)(reshape_grad)


@RULES.gradient("Transpose")
def transpose_grad(ctx, node, gy):
    perm = attrs(node).get("perm")
    if perm is None:
        perm = list(reversed(range(ctx.shapes.rank(node.input[0]))))
    inv = list(np.argsort(perm))
    return [ctx.bwd.op("Transpose", [gy[0]], perm=[int(i) for i in inv])]


@RULES.gradient("Concat")
def concat_grad(ctx, node, gy):
    axis = attrs(node)["axis"]
    sizes = []
    for i in node.input:
        d = ctx.shapes.of(i)[axis]
        if not isinstance(d, int):
            raise ExportError(f"Concat node '{node.name}': input '{i}' has a dynamic size along "
                              f"axis {axis}; only static concat sizes are supported")
        sizes.append(d)
    parts = ctx.bwd.op_multi("Split", [gy[0], ctx.bwd.ints(sizes)], n_out=len(sizes), axis=axis)
    return [p if ctx.needs_grad(i) else None for p, i in zip(parts, node.input, strict=True)]


@RULES.gradient("Expand")
def expand_grad(ctx, node, gy):
    return [unbroadcast(ctx, gy[0], node.output[0], node.input[0]), None]


@RULES.gradient("Slice")
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
    axes = [a % rank for a in axes]
    rest = [None] * (len(node.input) - 1)
    if any(s != 1 for s in steps):
        return [_strided_slice_grad(ctx, node, gy[0], axes, steps)] + rest
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


def _slice_positions(start: int, end: int, step: int, d: int) -> range:
    """The positions ONNX's Slice picks on an axis of size ``d``: negative bounds count from
    the end, then clamp to [0, d] (step > 0), or the start to [0, d - 1] and the end to
    [-1, d - 1] (step < 0; Python's slice puts a start below -d at -1 there: nothing picked).
    As onnxruntime runs it, an end of INT64_MAX with step < 0 runs to the first element."""
    if step < 0 and end == np.iinfo(np.int64).max:
        end = -1 - d
    start, end = (v + d if v < 0 else v for v in (start, end))
    if step > 0:
        return range(min(max(start, 0), d), min(max(end, 0), d), step)
    return range(min(max(start, 0), d - 1), min(max(end, -1), d - 1), step)


def _strided_slice_grad(ctx, node, g: str, axes: list[int], steps: list[int]) -> str:
    """Any steps (``x[:, ::2]``, ``torch.flip`` as step -1): per sliced axis, each input
    position reads its element of g, or a zero appended to g where the slice skipped it (a
    Gather of constant indices; constant bounds and static sizes)."""
    dims = ctx.shapes.of(node.input[0])
    if not all(i in ctx.constants for i in node.input[1:3]) or not all(
            isinstance(dims[a], int) for a in axes):
        raise ExportError(f"Slice '{node.name}': a step other than 1 needs constant bounds and "
                          "static sizes")
    b = ctx.bwd
    starts, ends = (ctx.constant_value(i).tolist() for i in node.input[1:3])
    for st, en, ax, step in zip(starts, ends, axes, steps, strict=True):
        d = int(dims[ax])
        picked = np.array(_slice_positions(st, en, step, d), np.int64)
        index = np.full(d, len(picked), np.int64)                       # the appended zero
        index[picked] = np.arange(len(picked))
        zero_shape = b.op("ScatterElements", [ctx.shape(node.output[0]) if ax == axes[0]
                                              else b.op("Shape", [g]), b.ints([ax]),
                                              b.ints([1])], axis=0)
        g = b.op("Concat", [g, zeros(ctx, zero_shape)], axis=ax)
        g = b.op("Gather", [g, b.const(index, np.int64)], axis=ax)
    return g


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


@RULES.gradient("Pad")
def pad_grad(ctx, node, gy):
    """Constant-mode Pad: the gradient is the input window, a Pad by the negated pads (which
    crops; pads may be computed in the forward, as the TorchScript exporter writes F.pad)."""
    mode = attrs(node).get("mode", "constant")
    if mode != "constant":
        return [_index_pad_grad(ctx, node, gy[0], mode)] + [None] * (len(node.input) - 1)
    b = ctx.bwd
    neg = b.op("Neg", [node.input[1]])
    axes = [node.input[3]] if len(node.input) > 3 and node.input[3] else []
    gx = b.op("Pad", [gy[0], neg, ""] + axes if axes else [gy[0], neg])
    grads = [gx] + [None] * (len(node.input) - 1)
    if len(node.input) > 2 and node.input[2] and needs(ctx, node, 2):
        # a trainable pad value: every padded position is it (an outside review: dropped)
        grads[2] = b.op("Sub", [b.op("ReduceSum", [gy[0]], keepdims=0),
                                b.op("ReduceSum", [gx], keepdims=0)])
    return grads


def _index_pad_grad(ctx, node, g: str, mode: str) -> str:
    """Reflect / edge / wrap Pad (torch's ReflectionPad, ReplicationPad): each output position
    along a padded axis reads one input position (numpy's pad of the positions says which), so
    per axis the gradient is gᵀ summed by a 0/1 matrix [out, in]: the positions read twice (the
    border and its mirror) get both contributions. Constant pads and static sizes."""
    dims = ctx.shapes.of(node.input[0])
    rank = len(dims)
    if mode not in ("reflect", "edge", "wrap"):
        raise ExportError(f"Pad '{node.name}': mode '{mode}' has no gradient rule")
    if node.input[1] not in ctx.constants or (len(node.input) > 3 and node.input[3]
                                              and node.input[3] not in ctx.constants):
        raise ExportError(f"Pad '{node.name}': a {mode} pad needs constant pads")
    pads = [int(v) for v in ctx.constant_value(node.input[1]).tolist()]
    axes = ([int(a) % rank for a in ctx.constant_value(node.input[3]).tolist()]
            if len(node.input) > 3 and node.input[3] else list(range(rank)))
    b = ctx.bwd
    n = len(axes)
    for i, ax in reversed(list(enumerate(axes))):
        lo, hi = pads[i], pads[n + i]
        if lo == 0 and hi == 0:
            continue
        d = dims[ax]
        if not isinstance(d, int) or lo < 0 or hi < 0:
            raise ExportError(f"Pad '{node.name}': a {mode} pad needs static sizes and "
                              "non-negative pads; where the file leaves a size dynamic, give "
                              "the input's size with --input-shape")
        src = np.pad(np.arange(d), (lo, hi), mode="wrap" if mode == "wrap" else mode)
        m = np.zeros((len(src), d), np.float32)
        m[np.arange(len(src)), src] = 1.0
        perm = [a for a in range(rank) if a != ax] + [ax]
        back = [perm.index(a) for a in range(rank)]
        t = b.op("MatMul", [b.op("Transpose", [g], perm=perm), b.const(m)])
        g = b.op("Transpose", [t], perm=back)
    return g


@RULES.gradient("Split", outputs=None)
def split_grad(ctx, node, gy):
    """Concat the output gradients, zeros for outputs that do not reach the loss."""
    parts = [g if g is not None else zeros(ctx, ctx.shape(o))
             for o, g in zip(node.output, gy, strict=True)]
    return [ctx.bwd.op("Concat", parts, axis=attrs(node).get("axis", 0))] + \
        [None] * (len(node.input) - 1)


@RULES.gradient("Gather")
def gather_grad(ctx, node, gy):
    """Scatter-add the gradient rows into zeros shaped like ``data`` (an embedding table).

    The gathered axis is moved to the front so that ScatterND (reduction add: repeated indices
    accumulate) indexes it; indices are taken modulo the axis size (negative indices).
    """
    if not needs(ctx, node, 0):
        return [None, None]
    data, idx = node.input
    b = ctx.bwd
    rank = ctx.shapes.rank(data)
    axis = attrs(node).get("axis", 0) % rank
    g, ri = gy[0], ctx.shapes.rank(idx)
    if ctx.shapes.dtype.get(idx, TensorProto.INT64) != TensorProto.INT64:  # int32 ids (tf2onnx)
        idx = b.op("Cast", [idx], to=TensorProto.INT64)
    if ri == 0:  # a scalar index drops the axis: put it back
        idx, g, ri = b.op("Reshape", [idx, b.ints([1])]), b.op("Unsqueeze", [g, b.ints([axis])]), 1
    front = [axis] + [a for a in range(rank) if a != axis]  # data axes, gathered axis first
    perm = list(range(axis, axis + ri)) + list(range(axis)) + list(range(axis + ri, rank - 1 + ri))
    if perm != sorted(perm):
        g = b.op("Transpose", [g], perm=perm)
    shape = ctx.shape(data)
    if all(isinstance(d, int) for d in ctx.shapes.of(data)):
        # a static shape: zeros(shape) would be constant-folded into a table-sized initializer
        # of every backward session (47 MB for MiniLM's vocabulary, each session); adding 0 x the
        # batch size (a runtime value) makes them a buffer of the run instead
        n = b.op("Gather", [b.op("Shape", [g]), b.ints([0])])
        shape = b.op("Add", [shape, b.op("Mul", [n, b.ints([0])])])
    base = zeros(ctx, b.op("Gather", [shape, b.ints(front)]) if axis else shape)
    size = b.op("Gather", [shape, b.ints([axis])])
    row = b.op("Mod", [idx, size])
    pad = ctx.padding_rows.get(data)
    if pad is not None and axis == 0:
        # nn.Embedding(padding_idx=k): the lookups of row k add nothing (torch's rule); other
        # uses of the same table (a tied output layer) keep their share of its gradient
        keep = b.op("Cast", [b.op("Not", [b.op("Equal", [row, b.ints([pad])])])],
                    to=TensorProto.FLOAT)
        g = b.op("Mul", [g, b.op("Unsqueeze", [keep, b.ints([-1])])])
    pos = b.op("Unsqueeze", [row, b.ints([-1])])
    out = b.op("ScatterND", [base, pos, g], reduction="add")
    if axis:
        out = b.op("Transpose", [out], perm=[int(i) for i in np.argsort(front)])
    return [out, None]


@RULES.gradient("CumSum")
def cumsum_grad(ctx, node, gy):
    """y_i = Σ_{j<=i} x_j along the axis: g_x_j = Σ_{i>=j} g_i, the cumulative sum the other
    way round (``exclusive`` stays as it is: both exclude the element itself)."""
    a = attrs(node)
    return [ctx.bwd.op("CumSum", [gy[0], node.input[1]], exclusive=int(a.get("exclusive", 0)),
                       reverse=1 - int(a.get("reverse", 0))), None]


def _space_depth_perm(mode: str) -> list[int]:
    """DepthToSpace's Transpose on [N, b, b, C, H, W] (DCR) or [N, C, b, b, H, W] (CRD)."""
    return [0, 3, 4, 1, 5, 2] if mode == "DCR" else [0, 1, 4, 2, 5, 3]


def _depth_space(ctx, node, g: str, to_depth: bool) -> str:
    """The gradient of DepthToSpace (``to_depth``: gather the blocks back into channels) or of
    SpaceToDepth, as Reshape/Transpose/Reshape: each op only moves elements, so its gradient
    moves them back."""
    a = attrs(node)
    k = int(a["blocksize"])
    mode = a.get("mode", "DCR") if node.op_type == "DepthToSpace" else "DCR"
    dims = ctx.shapes.of(node.input[0])
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        raise ExportError(f"{node.op_type} '{node.name}' needs a 4-D input with static "
                          "channels and spatial dims")
    b = ctx.bwd
    perm = _space_depth_perm(mode)
    if to_depth:  # DepthToSpace: x [N, C·k·k, H, W] -> y [N, C, H·k, W·k]
        _, ck, h, w = dims
        c = ck // (k * k)
        blocks = [0, k, k, c, h, w] if mode == "DCR" else [0, c, k, k, h, w]
        moved = [blocks[p] for p in perm]  # the [N, C, H, k, W, k] view of y
        t = b.op("Reshape", [g, b.ints(moved)])
        t = b.op("Transpose", [t], perm=[int(i) for i in np.argsort(perm)])
        return b.op("Reshape", [t, b.ints([0, ck, h, w])])
    # SpaceToDepth (DCR): x [N, C, H, W] -> y [N, C·k·k, H/k, W/k], the inverse of DepthToSpace
    _, c, h, w = dims
    t = b.op("Reshape", [g, b.ints([0, k, k, c, h // k, w // k])])
    t = b.op("Transpose", [t], perm=perm)
    return b.op("Reshape", [t, b.ints([0, c, h, w])])


@RULES.gradient("DepthToSpace")
def depth_to_space_grad(ctx, node, gy):
    return [_depth_space(ctx, node, gy[0], to_depth=True)]


@RULES.gradient("SpaceToDepth")
def space_to_depth_grad(ctx, node, gy):
    return [_depth_space(ctx, node, gy[0], to_depth=False)]


def _einsum_terms(node) -> tuple[list[list[str]], list[str]]:
    """The equation's input terms and output term as lists of indices ('…' for an ellipsis);
    implicit form: the output is every index used once, alphabetical, after an ellipsis."""
    eq = str(attrs(node)["equation"]).replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")

    def tokens(term: str) -> list[str]:
        out = []
        for part in term.split("..."):
            out.extend(part)
            out.append("…")
        return out[:-1]

    ins = [tokens(t) for t in lhs.split(",")]
    if arrow:
        out = tokens(rhs)
    else:
        flat = [t for term in ins for t in term if t != "…"]
        out = (["…"] if any("…" in term for term in ins) else []) + sorted(
            t for t in set(flat) if flat.count(t) == 1)
    for term in ins + [out]:
        if len(set(term)) != len(term):
            raise ExportError(f"Einsum '{node.name}': equation '{eq}' repeats an index within "
                              "one term (a diagonal or trace); it has no gradient rule")
    return ins, out


@RULES.gradient("Einsum")
def einsum_grad(ctx, node, gy):
    """y = einsum(terms -> out): the gradient of operand k is einsum(out, other terms -> term k)
    over the same indices; an index only operand k has (summed away in y) comes back by
    broadcasting (Unsqueeze + Expand to the operand's shape)."""
    ins, out = _einsum_terms(node)
    if len(ins) != len(node.input):
        raise ExportError(f"Einsum '{node.name}': the equation has {len(ins)} terms for "
                          f"{len(node.input)} inputs")
    if any("…" in t for t in ins):
        ranks = {len(ctx.shapes.of(i)) - (len(t) - 1) for i, t in zip(node.input, ins,
                                                                      strict=True) if "…" in t}
        if len(ranks) != 1:
            raise ExportError(f"Einsum '{node.name}': operands broadcast inside the ellipsis; "
                              "that has no gradient rule")
    b = ctx.bwd
    text = lambda t: "".join("..." if c == "…" else c for c in t)  # noqa: E731
    grads = []
    for k, (x, term) in enumerate(zip(node.input, ins, strict=True)):
        if not ctx.needs_grad(x):
            grads.append(None)
            continue
        others = [(i, t) for j, (i, t) in enumerate(zip(node.input, ins, strict=True)) if j != k]
        seen = set(out).union(*[set(t) for _, t in others])
        kept = [c for c in term if c in seen]
        lead = ["…"] if "…" in seen and "…" not in term else []  # summed over below
        eq = ",".join([text(out)] + [text(t) for _, t in others]) + "->" + text(lead + kept)
        g = b.op("Einsum", [gy[0]] + [i for i, _ in others], equation=eq)
        if lead:  # operand k is the same for every position of the ellipsis
            n_ell = len(ctx.shapes.of(node.output[0])) - (len(out) - 1)
            g = b.op("ReduceSum", [g, b.ints(list(range(n_ell)))], keepdims=0)
        if kept != term:  # indices summed away in y only: broadcast back
            axes = [p for p, c in enumerate(term) if c not in seen]
            if "…" in term:
                raise ExportError(f"Einsum '{node.name}': an index summed away next to an "
                                  "ellipsis has no gradient rule")
            g = b.op("Expand", [b.op("Unsqueeze", [g, b.ints(axes)]), ctx.shape(x)])
        elif "…" in term and "…" in out:
            g = _einsum_unbroadcast(ctx, node, g, x, term, out)
        grads.append(g)
    return grads


def _einsum_unbroadcast(ctx, node, g: str, x: str, term: list[str], out: list[str]) -> str:
    """``g`` (operand ``x``'s layout, its ellipsis the output's) summed over the ellipsis axes
    where ``x`` has size 1 and the output more: operands broadcast there (an outside review:
    a [1, 4, 5] operand beside a [2, 3, 4] one got a [2, 4, 5] gradient)."""
    xs, ys = ctx.shapes.of(x), ctx.shapes.of(node.output[0])
    n = len(xs) - (len(term) - 1)
    at_x, at_y = term.index("…"), out.index("…")
    mine, theirs = xs[at_x:at_x + n], ys[at_y:at_y + n]  # (the operands' ellipses have one
    # rank, checked above: the output's)
    axes = [at_x + i for i, (a, c) in enumerate(zip(mine, theirs, strict=True)) if a != c]
    if not axes:
        return g
    if not all(mine[i - at_x] == 1 and isinstance(theirs[i - at_x], int) for i in axes):
        raise ExportError(f"Einsum '{node.name}': operands broadcast inside the ellipsis with "
                          "sizes not known at export; export with fixed sizes there")
    return ctx.bwd.op("ReduceSum", [g, ctx.bwd.ints(axes)], keepdims=1)


@RULES.gradient("Tile")
def tile_grad(ctx, node, gy):
    """y = x repeated r_i times along each axis: g_x = Σ over the copies, as [r0, d0, r1, d1, …]
    summed over the r axes (static shape and constant repeats)."""
    x = node.input[0]
    dims = ctx.shapes.of(x)
    reps = [int(r) for r in np.asarray(ctx.constant_value(node.input[1])).ravel()]
    if not all(isinstance(d, int) for d in dims[1:]):
        raise ExportError(f"Tile '{node.name}' needs static sizes after the batch axis; where "
                          "the file leaves them dynamic, give the input's size with "
                          "--input-shape")
    b = ctx.bwd
    first = [reps[0], 0 if not isinstance(dims[0], int) else dims[0]]
    view = first + [v for r, d in zip(reps[1:], dims[1:], strict=True) for v in (r, d)]
    if not isinstance(dims[0], int) and reps[0] != 1:
        raise ExportError(f"Tile '{node.name}': repeating the batch axis is not supported")
    if first[1] == 0:  # batch: read from the gradient (repeats 1 there)
        view[1] = -1
    t = b.op("Reshape", [gy[0], b.ints(view)])
    return [b.op("ReduceSum", [t, b.ints(list(range(0, 2 * len(dims), 2)))], keepdims=0),
            None]


@RULES.gradient("Trilu")
def trilu_grad(ctx, node, gy):
    """A triangle of x (the rest zero): the same triangle of g."""
    return [ctx.bwd.op("Trilu", [gy[0]] + list(node.input[1:2]),
                       upper=int(attrs(node).get("upper", 1)))] + [None] * (len(node.input) - 1)


@RULES.gradient("GatherElements")
def gather_elements_grad(ctx, node, gy):
    """Scatter-add g back to the gathered positions (torch.gather)."""
    b, x = ctx.bwd, node.input[0]
    axis = int(attrs(node).get("axis", 0))
    return [b.op("ScatterElements", [zeros(ctx, ctx.shape(x)), node.input[1], gy[0]],
                 axis=axis, reduction="add"), None]


@RULES.gradient("TopK")
def topk_grad(ctx, node, gy):
    """The values' gradient goes back to their positions (the indices output)."""
    if gy[0] is None:
        return [None, None]
    b, x = ctx.bwd, node.input[0]
    axis = int(attrs(node).get("axis", -1))
    while len(node.output) < 2:
        node.output.append("")
    if not node.output[1]:
        node.output[1] = f"{node.output[0]}.indices"
    return [b.op("ScatterElements", [zeros(ctx, ctx.shape(x)), node.output[1], gy[0]],
                 axis=axis, reduction="add"), None]
