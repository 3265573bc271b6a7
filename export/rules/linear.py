"""Linear layers (MatMul / Gemm with a 2-D weight, and 1x1 Conv): the exact rule and the INSTANT
rule side by side, and the Gram matrices calibration reads.

INSTANT (docs/method.md), per sample, ``y = x Wᵀ``, bases P (activation) and Q (output gradient):

==============  =============================  ==========================================
                token axis (L <= C)             channel axis (C < L)
==============  =============================  ==========================================
forward saves   x̂ = P x           [Rx, Cx]     x̂ = x Pᵀ            [L, Rx]
weight grad     Σ (P g)ᵀ x̂                     (Σ gᵀ x̂) P
input grad      Qᵀ ((Q g) W)                   (g Qᵀ)(Q W)
==============  =============================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable

from onnx import TensorProto, helper

from contract import names

from ..autodiff import GradContext, RuleSet
from ..graph import Builder, ExportError
from ..layers import CompressedLayer
from .common import attrs, int8_roundtrip, needs, saved, transpose_last2, unbroadcast

RULES = RuleSet("linear")

# Per sample the activation is a matrix; its two last axes are (L, C) for a Linear and (C, L)
# for a 1x1 Conv (viewed as [N, C, H*W]). A basis acts on one of those two axes: the "left" one
# (axis -2) or the "right" one (axis -1).


def _left(layer: CompressedLayer, which: str) -> bool:
    axis = layer.x_axis if which == "x" else layer.g_axis
    token = axis == "token"
    return token if layer.kind == "linear" else not token


def _token_weights(layer: CompressedLayer, builder) -> str:
    """[N, L, 1]: 1 at the real tokens, 0 at the positions the layer's token mask marks as
    padding (``CompressedLayer.token_mask``, whatever its type)."""
    m = builder.op("Cast", [builder.op("Cast", [layer.token_mask], to=TensorProto.BOOL)],
                   to=TensorProto.FLOAT)
    return builder.op("Unsqueeze", [m, builder.ints([-1])])


def _real_tokens(layer: CompressedLayer, t: str, builder) -> str:
    """``t`` ([N, L, C]) zero at the positions the layer's token mask marks as padding, which
    enter no gradient; ``t`` itself where the layer has no mask."""
    if not layer.token_mask:
        return t
    return builder.op("Mul", [t, _token_weights(layer, builder)])


def _batch_first(layer: CompressedLayer, t: str, builder) -> str:
    """[L, N, C] -> [N, L, C] for a sequence-first layer (its own inverse); ``t`` otherwise."""
    return builder.op("Transpose", [t], perm=[1, 0, 2]) if layer.seq_first else t


def _as_matrix(layer: CompressedLayer, t: str, builder) -> str:
    """[N, C, *spatial] -> [N, C, L] for a 1x1 conv, [N, *positions, C] -> [N, T, C] for a
    Linear over several position axes (``layer.flat``); a Linear's [N, L, C] is already one."""
    c = layer.cx if t == layer.x else layer.cy
    if layer.kind == "conv1x1":
        return builder.op("Reshape", [t, builder.ints([0, c, -1])])
    if layer.flat:
        return builder.op("Reshape", [t, builder.ints([0, -1, c])])
    return t


def _g_matrix(layer: CompressedLayer, g: str, builder) -> str:
    """The output gradient as the per-sample matrix the bases act on."""
    if layer.kind == "conv1x1":
        return builder.op("Reshape", [g, builder.ints([0, layer.cy, -1])])
    if layer.flat:
        return builder.op("Reshape", [g, builder.ints([0, -1, layer.cy])])
    return _batch_first(layer, g, builder)


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


def full_rank(b: Builder, basis: str, dim: int) -> str:
    """A bool [1]: the basis has ``dim`` rows (full rank: a projection would keep everything)."""
    rows = b.op("Gather", [b.op("Shape", [basis]), b.ints([0])], axis=0)
    return b.op("Equal", [rows, b.ints([dim])])


def if_else(b: Builder, cond: str, then: Callable[[Builder], str],
            otherwise: Callable[[Builder], str], hint: str) -> str:
    """An ``If``: ``then`` where ``cond`` holds, else ``otherwise``. Each callable builds its
    branch in a builder of its own, reading outer tensors by name, and returns its result."""
    branches = []
    for tag, build in (("then", then), ("else", otherwise)):
        sub = Builder(b.fresh(f"{hint}_{tag}"))
        out = build(sub)
        branches.append(helper.make_graph(
            sub.nodes, sub.prefix, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                      None)],
            initializer=sub.initializers))
    return b.op("If", [cond], hint=hint, then_branch=branches[0], else_branch=branches[1])


def _weight_canonical(b, layer: CompressedLayer) -> str:
    """The weight as W_c [Cy, Cx]."""
    if layer.kind == "conv1x1":
        return b.op("Reshape", [layer.weight, b.ints([layer.cy, layer.cx])])
    if layer.weight_layout == "in_out":
        return b.op("Transpose", [layer.weight], perm=[1, 0])
    return layer.weight


def _times_w(b, layer: CompressedLayer, m: str) -> str:
    """``m · W_c`` for a Linear ([..., Cy] -> [..., Cx]) without a transposed copy of the
    weight: a MatMul for a [Cy, Cx] weight, a Gemm with ``transB`` over m's rows for a
    [Cx, Cy] one (MatMul weights are stored so: a Transpose cost a weight-sized copy per layer
    in every backward, all alive at its peak)."""
    if layer.weight_layout == "out_in":
        return b.op("MatMul", [m, layer.weight])
    rows = b.op("Reshape", [m, b.ints([-1, layer.cy])])
    out = b.op("Gemm", [rows, layer.weight], transB=1)                 # [rows, Cx]
    lead = b.op("Slice", [b.op("Shape", [m]), b.ints([0]), b.ints([-1])])
    return b.op("Reshape", [out, b.op("Concat", [lead, b.ints([layer.cx])], axis=0)])


def _weight_from_canonical(b, layer: CompressedLayer, dw_c: str) -> str:
    if layer.kind == "conv1x1":
        return b.op("Reshape", [dw_c, b.op("Shape", [layer.weight])])  # [Cy, Cx, 1, ...]
    if layer.weight_layout == "in_out":
        return b.op("Transpose", [dw_c], perm=[1, 0])
    return dw_c


def linear_calib_grams(ctx: GradContext, layer: CompressedLayer, g: str) -> None:
    """Calibration: emit Σ_b X_b X_bᵀ (forward) and Σ_b G_b G_bᵀ (backward) for this layer."""
    rank = 3 if (layer.kind == "conv1x1" or layer.rank3) else 2
    key = ("gram", layer.p_input, layer.x)
    if key not in ctx.shared_x:  # one Gram for the layers that share a basis
        x = _as_matrix(layer, _batch_first(layer, _real_tokens(layer, layer.x, ctx.fwd),
                                           ctx.fwd), ctx.fwd)
        ctx.shared_x[key] = _gram(ctx.fwd, x, _left(layer, "x"), rank)
    ctx.fwd_outputs.append(ctx.fwd.op("Identity", [ctx.shared_x[key]],
                                      out=f"{names.GRAM_X}{layer.name}"))
    gm = _g_matrix(layer, g, ctx.bwd)
    ctx.bwd_outputs.append(ctx.bwd.op("Identity", [_gram(ctx.bwd, gm, _left(layer, "g"), rank)],
                                      out=f"{names.GRAM_G}{layer.name}"))


def linear_instant(ctx: GradContext, layer: CompressedLayer, g: str, need_x: bool,
                   need_w: bool) -> tuple[str | None, str | None]:
    """INSTANT backward of ``y = x Wᵀ`` (docs/method.md). Returns (g_x, g_W in the weight's layout).

    The forward saves only x̂ = P·x (token axis) or x·Pᵀ (channel axis), in int8 with a float32
    scale per sample and rank direction where ``layer.x_itemsize`` is 1 (``export --saved-int8``);
    g_W is computed from x̂ and the output gradient projected on the same basis; g_x goes through
    the gradient basis Q.
    """
    f, b = ctx.fwd, ctx.bwd
    P, Q = layer.p_input, layer.q_input
    conv = layer.kind == "conv1x1"
    gm = _g_matrix(layer, g, b)
    gx = gw = None
    if need_w:
        left = _left(layer, "x")
        key = ("xhat", P, layer.x)
        if key not in ctx.shared_x:  # saved once for the layers that share the basis P
            xin = _batch_first(layer, _real_tokens(layer, layer.x, f), f)
            xhat = _project(f, P, _as_matrix(layer, xin, f), left)
            if layer.x_itemsize == 1:  # int8 (the layer says so, and the manifest plans it so)
                xhat = int8_roundtrip(ctx, xhat, -1 if left else -2)
            ctx.shared_x[key] = xhat
        xhat = ctx.shared_x[key]
        # a Linear's g_W is built in its weight's own layout: [Cy, Cx] (out_in) or, by the
        # same products with the operands swapped, [Cx, Cy] (in_out): no transposed copy
        in_out = layer.weight_layout == "in_out"
        if not conv and layer.x_axis == "token":      # x̂ [N,Rx,Cx], ĝ = P g [N,Rx,Cy]
            gf = b.op("Flatten", [b.op("MatMul", [P, gm])], axis=2)
            xf = b.op("Flatten", [xhat], axis=2)
            dw = b.op("Gemm", [xf, gf] if in_out else [gf, xf], transA=1)  # x̂ᵀĝ or ĝᵀx̂
        elif not conv:                                # x̂ [.., L, Rx]: g_W = (gᵀ x̂) P
            ax = 2 if layer.rank3 else 1
            gf, xf = b.op("Flatten", [gm], axis=ax), b.op("Flatten", [xhat], axis=ax)
            if in_out:                                # Pᵀ (x̂ᵀ g)  [Cx, Cy]
                dw = b.op("Gemm", [P, b.op("Gemm", [xf, gf], transA=1)], transA=1)
            else:                                     # (gᵀ x̂) P   [Cy, Cx]
                dw = b.op("MatMul", [b.op("Gemm", [gf, xf], transA=1), P])
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
        gw = dw if not conv else _weight_from_canonical(b, layer, dw)
    if need_x:
        t = lambda s, m: s.op("Transpose", [m], perm=[1, 0])  # noqa: E731
        def compressed(s: Builder) -> str:
            if not conv and layer.g_axis == "token":  # Qᵀ((Q g) W)
                qt = t(s, Q)
                if layer.token_mask:
                    # Qᵀ spreads the gradient over every position, padding included, where the
                    # exact one is zero (from there it would reach other parameters' gradients):
                    # its rows at the padding are zeroed per sample, [N, L, Ry], before the
                    # product rather than on the [N, L, Cx] result (one full-size copy less)
                    qt = s.op("Mul", [_token_weights(layer, s), qt])
                return s.op("MatMul", [qt, _times_w(s, layer, s.op("MatMul", [Q, gm]))])
            if not conv:                              # (g Qᵀ)(Q W)
                return s.op("MatMul", [s.op("MatMul", [gm, t(s, Q)]), _times_w(s, layer, Q)])
            wc = _weight_canonical(s, layer)                           # [Cy, Cx]
            if layer.g_axis == "token":               # conv, stored transposed: Wᵀ (g Qᵀ) Q
                return s.op("MatMul", [s.op("MatMul", [t(s, wc), s.op("MatMul", [gm, t(s, Q)])]),
                                       Q])
            return s.op("MatMul", [t(s, s.op("MatMul", [Q, wc])),  # conv: (Q W)ᵀ (Q g)
                                   s.op("MatMul", [Q, gm])])

        def exact(s: Builder) -> str:                  # g W (conv: Wᵀ g)
            if conv:
                return s.op("MatMul", [t(s, _weight_canonical(s, layer)), gm])
            return _times_w(s, layer, gm)

        # The output gradient is never saved, so projecting it only pays where it saves compute:
        # at a full-rank Q (the runtime's choice where Ry would cost more than the exact
        # product, runtime/ranks.py) the exact input gradient runs instead, cheaper and exact.
        # One If: split in two (project, then lift) the exact branch needs a copy, measured
        # 2.5 % slower on the token MLP for the same plans under a budget (docs/method.md).
        gx = if_else(b, full_rank(b, Q, layer.g_dim), exact, compressed, "gx")
        if not layer.token_mask:  # both branches act per sample on gm and nothing else batched
            ctx.batch_separable[gx] = gm
        # the exact g·W and the channel-axis (g Qᵀ)(Q W) keep g's zero rows at the padding
        gx = _batch_first(layer, gx, b)
        if conv or layer.flat:
            gx = b.op("Reshape", [gx, ctx.shape(layer.x)])
    return gx, gw


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


def compressed(ctx: GradContext, node, g: str) -> CompressedLayer | None:
    """The INSTANT layer for this node (instant and recal modes; None: the exact rule). The
    calib and recal modes emit the layer's Grams first (of the full x and g_y)."""
    layer = ctx.layer(node)
    if layer is None:
        return None
    if ctx.mode in ("calib", "recal"):
        linear_calib_grams(ctx, layer, g)
    return None if ctx.mode == "calib" else layer


@RULES.gradient("MatMul")
def matmul_grad(ctx, node, gy):
    a, bw = node.input
    g = gy[0]
    layer = compressed(ctx, node, g)
    if layer is not None:
        gx, gw = linear_instant(ctx, layer, g, needs(ctx, node, 0), needs(ctx, node, 1))
        return [gx, gw]
    ra, rb = ctx.shapes.rank(a), ctx.shapes.rank(bw)
    if rb == 2 and ra >= 2:
        return list(linear_exact(ctx, a, bw, g, needs(ctx, node, 0), needs(ctx, node, 1),
                                 w_out_in=False))
    if ra < 2 or rb < 2:
        raise ExportError(f"MatMul '{node.name}': 1-D operands are not supported")
    y = node.output[0]
    ga = gb = None
    if needs(ctx, node, 0):  # activation x activation (attention): operands exact or int8
        t = ctx.bwd.op("MatMul", [g, transpose_last2(ctx, saved(ctx, bw), rb)])
        ry = ctx.shapes.rank(y)
        if ra == ry:
            ga = unbroadcast(ctx, t, y, a)
        elif ctx.shapes.of(a)[:-2] == ctx.shapes.of(y)[ry - ra:-2]:
            # a matrix (or a stack of them) applied to every item of a larger batch, e.g. a
            # weight on the left (W @ x): its gradient sums g·bᵀ over the extra leading axes
            ga = ctx.bwd.op("ReduceSum", [t, ctx.bwd.ints(list(range(ry - ra)))], keepdims=0)
        else:
            raise ExportError(f"MatMul '{node.name}': its first operand broadcasts inside its "
                              "batch axes, which has no gradient rule here; expand it to the "
                              "batch shape in the model (or put the weight second: x @ W)")
    if needs(ctx, node, 1):
        t = ctx.bwd.op("MatMul", [transpose_last2(ctx, saved(ctx, a), ra), g])
        gb = unbroadcast(ctx, t, y, bw)
    return [ga, gb]


@RULES.gradient("Gemm")
def gemm_grad(ctx, node, gy):
    at = attrs(node)
    ta, tb = at.get("transA", 0), at.get("transB", 0)
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    A, B = node.input[0], node.input[1]
    g = gy[0]
    b = ctx.bwd
    gc = None
    if needs(ctx, node, 2):
        gsc = g if beta == 1.0 else b.op("Mul", [g, b.const(beta)])
        gc = unbroadcast(ctx, gsc, node.output[0], node.input[2])
    layer = None
    if ctx.layer(node) is not None:  # Y = alpha·x·W + beta·C: x·W's output gradient is alpha·g
        gl = g if alpha == 1.0 else b.op("Mul", [g, b.const(alpha)])
        layer = compressed(ctx, node, gl)
    if layer is not None:
        gx, gw = linear_instant(ctx, layer, gl, needs(ctx, node, 0), needs(ctx, node, 1))
        return [gx, gw, gc][: len(node.input)]
    ga = gb = None
    if needs(ctx, node, 0):
        if not ta:
            ga = b.op("Gemm", [g, B], alpha=alpha, transB=0 if tb else 1)
        else:
            ga = b.op("Gemm", [B, g], alpha=alpha, transA=tb, transB=1)
    if needs(ctx, node, 1):
        if not tb:
            gb = b.op("Gemm", [A, g], alpha=alpha, transA=0 if ta else 1)
        else:
            gb = b.op("Gemm", [g, A], alpha=alpha, transA=1, transB=ta)
    return [ga, gb, gc][: len(node.input)]


