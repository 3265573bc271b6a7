"""Gradient rules of convolutions and pooling (exact; a 1x1 Conv of a compressed layer takes
the INSTANT rule in ``linear.py``)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..autodiff import RuleSet
from ..graph import ExportError
from .common import attrs, needs, reduce_sum
from .linear import compressed, linear_instant

RULES = RuleSet("conv")


def _convattrs(node, k: list[int], ctx=None):
    """(strides, dilations, pads, group); an ``auto_pad`` (torch's ``padding="same"``) becomes
    the explicit pads it stands for, written back into the forward node (needs ``ctx`` and
    static spatial dims)."""
    a = attrs(node)
    nsp = len(k)
    strides = list(a.get("strides", [1] * nsp))
    dil = list(a.get("dilations", [1] * nsp))
    pads = list(a.get("pads", [0] * 2 * nsp))
    mode = a.get("auto_pad", "NOTSET")
    if mode != "NOTSET":
        xs = ctx.shapes.of(node.input[0])[2:] if ctx is not None else None
        if xs is None or node.op_type == "ConvTranspose" or \
                not all(isinstance(d, int) for d in xs):
            raise ExportError(f"node '{node.name}': auto_pad {mode} needs static spatial dims "
                              "(and is not supported on ConvTranspose); give the input's size "
                              "with --input-shape where the file leaves it dynamic, or export "
                              "the model with explicit pads")
        pads = [0] * 2 * nsp
        if mode != "VALID":  # SAME_UPPER / SAME_LOWER: output = ceil(input / stride)
            for i, n in enumerate(xs):
                total = max(0, (-(-n // strides[i]) - 1) * strides[i] + (k[i] - 1) * dil[i]
                            + 1 - n)
                small, big = total // 2, total - total // 2
                pads[i], pads[nsp + i] = (small, big) if mode == "SAME_UPPER" else (big, small)
        keep = [x for x in node.attribute if x.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(keep + [helper.make_attribute("pads", pads)])
    return strides, dil, pads, int(a.get("group", 1))


def _output_padding(ctx, node, x: str, y: str, k, strides, dil, pads) -> list[int]:
    xs, ys = ctx.shapes.of(x)[2:], ctx.shapes.of(y)[2:]
    if not all(isinstance(d, int) for d in list(xs) + list(ys)):
        raise ExportError(f"node '{node.name}': spatial dims must be static; pass --input-shape "
                          "with the image size, e.g. 8,3,64,64")
    n = len(k)
    return [xs[i] - ((ys[i] - 1) * strides[i] - pads[i] - pads[n + i] + dil[i] * (k[i] - 1) + 1)
            for i in range(n)]


@RULES.gradient("Conv")
def conv_grad(ctx, node, gy):
    x, w = node.input[0], node.input[1]
    g = gy[0]
    b = ctx.bwd
    gbias = None
    if needs(ctx, node, 2):
        gbias = reduce_sum(ctx, g, [0] + list(range(2, ctx.shapes.rank(x))), keepdims=0)
    layer = compressed(ctx, node, g)
    if layer is not None:
        gx, gw = linear_instant(ctx, layer, g, needs(ctx, node, 0), needs(ctx, node, 1))
        return [gx, gw, gbias][: len(node.input)]
    ws = ctx.shapes.of(w)
    k = [int(d) for d in ws[2:]]
    nsp = len(k)
    if nsp not in (1, 2, 3):
        raise ExportError(f"Conv '{node.name}': only 1-D, 2-D and 3-D convolutions have a "
                          f"gradient rule (got {nsp}-D)")
    strides, dil, pads, group = _convattrs(node, k, ctx)
    gx = gw = None
    if needs(ctx, node, 0):
        outpad = _output_padding(ctx, node, x, node.output[0], k, strides, dil, pads)
        gx = b.op("ConvTranspose", [g, w], strides=strides, dilations=dil, pads=pads,
                  group=group, kernel_shape=k, output_padding=outpad)
    if needs(ctx, node, 1):
        gw = _weight_grad(b, x, g, ctx.shapes.of(x)[2:], ctx.shapes.of(node.output[0])[2:], k,
                          strides, dil, pads, group, int(ctx.shapes.of(x)[1]), int(ws[0]))
    return [gx, gw, gbias][: len(node.input)]


def _weight_grad(b, x: str, g: str, xs, ys, k: list[int], strides, dil, pads, group: int,
                 c_in: int, c_out: int) -> str:
    """g_W of ``y = Conv(x, W)``, W [c_out, c_in/group, *k], from x and g = ∂L/∂y.

    g_W[co, ci, k] = Σ_n Σ_o g[n,co,o] x[n,ci,o*s + k*d - p]: a convolution of x (batch = input
    channel within the group) by g (as the kernel), strides and dilations swapped, cut to k."""
    nsp = len(k)
    xs, ys = [int(d) for d in xs], [int(d) for d in ys]
    cig, cog = c_in // group, c_out // group
    sp = list(range(3, 3 + nsp))
    xg = b.op("Reshape", [x, b.ints([0, group, cig] + xs)])
    xg = b.op("Transpose", [xg], perm=[2, 1, 0] + sp)
    xg = b.op("Reshape", [xg, b.ints([cig, -1] + xs)])
    kg = b.op("Reshape", [g, b.ints([0, group, cog] + ys)])
    kg = b.op("Transpose", [kg], perm=[1, 2, 0] + sp)
    kg = b.op("Reshape", [kg, b.ints([c_out, -1] + ys)])
    full = b.op("Conv", [xg, kg], strides=dil, dilations=strides, pads=pads, group=group)
    cut = b.op("Slice", [full, b.ints([0] * nsp), b.ints(k), b.ints(list(range(2, 2 + nsp)))])
    return b.op("Transpose", [cut], perm=[1, 0] + list(range(2, 2 + nsp)))


@RULES.gradient("ConvTranspose")
def conv_transpose_grad(ctx, node, gy):
    """y = ConvTranspose(x, W), W [C_in, C_out/group, *k]: the adjoint of a Conv with the same
    attributes, so g_x = Conv(g, W) and g_W is a Conv's weight gradient with the roles of x and
    g swapped (g the input of that Conv, x its output); output_padding only adds positions of g
    that no x element reaches."""
    x, w = node.input[0], node.input[1]
    g, b = gy[0], ctx.bwd
    ws = ctx.shapes.of(w)
    k = [int(d) for d in ws[2:]]
    if len(k) not in (1, 2, 3):
        raise ExportError(f"ConvTranspose '{node.name}': only 1-D, 2-D and 3-D kernels have a "
                          "gradient rule")
    if "output_shape" in attrs(node):
        raise ExportError(f"ConvTranspose '{node.name}': output_shape is not supported; export "
                          "with explicit pads and output_padding")
    strides, dil, pads, group = _convattrs(node, k)
    xs, ys = ctx.shapes.of(x)[2:], ctx.shapes.of(node.output[0])[2:]
    if not all(isinstance(d, int) for d in list(xs) + list(ys)):
        raise ExportError(f"ConvTranspose '{node.name}': spatial dims must be static; pass "
                          "--input-shape with the image size, e.g. 8,3,64,64")
    gx = gw = gbias = None
    if needs(ctx, node, 0):
        gx = b.op("Conv", [g, w], strides=strides, dilations=dil, pads=pads, group=group,
                  kernel_shape=k)
    if needs(ctx, node, 1):
        c_in = int(ctx.shapes.of(x)[1])
        gw = _weight_grad(b, g, x, ys, xs, k, strides, dil, pads, group,
                          c_in=int(ws[1]) * group, c_out=c_in)
    if needs(ctx, node, 2):
        gbias = reduce_sum(ctx, g, [0] + list(range(2, 2 + len(k))), keepdims=0)
    return [gx, gw, gbias][: len(node.input)]


@RULES.gradient("MaxPool")
def maxpool_grad(ctx, node, gy):
    a = attrs(node)
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


@RULES.gradient("AveragePool")
def avgpool_grad(ctx, node, gy):
    a = attrs(node)
    k = list(a["kernel_shape"])
    x = node.input[0]
    strides, dil, pads, _ = _convattrs(node, k, ctx)
    if (any(pads) and not a.get("count_include_pad", 0)) or a.get("ceil_mode", 0) \
            or any(d != 1 for d in dil):
        return [_separable_pool_grad(ctx, node, gy[0], k, strides, dil, pads)]
    c = ctx.shapes.of(x)[1]
    if not isinstance(c, int):
        raise ExportError(f"AveragePool '{node.name}': the channel count must be static")
    b = ctx.bwd
    kern = b.const(np.full([c, 1] + k, 1.0 / float(np.prod(k)), dtype=np.float32))
    outpad = _output_padding(ctx, node, x, node.output[0], k, strides, [1] * len(k), pads)
    return [b.op("ConvTranspose", [gy[0], kern], strides=strides, pads=pads, group=c,
                 kernel_shape=k, output_padding=outpad)]


def _run_probe(model, feeds: dict) -> np.ndarray:
    """Run a one-op probe with onnxruntime: the engine that runs the forward, so the matrix
    measured is the forward's (onnx's reference Resize differs from onnxruntime and torch for
    align_corners at scales whose output size is not a whole number)."""
    import onnxruntime as ort

    from ..graph import lowest_ir_version

    lowest_ir_version(model)  # (onnx's newest IR is more than an older onnxruntime reads)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        op = model.graph.node[0].op_type
        raise ExportError(f"{op}: measuring its gradient failed in onnxruntime "
                          f"({str(exc).splitlines()[0][:200]}); this form of {op} has no "
                          "gradient rule") from None


def _separable_pool_grad(ctx, node, g: str, k, strides, dil, pads) -> str:
    """AveragePool where each output divides by the elements its window really covers
    (``count_include_pad=0`` with padding, ``ceil_mode``; torch's ``AvgPool2d(ceil_mode=True,
    count_include_pad=False)``): a window is a rectangle, so per axis the pooling is a matrix
    [out, in], measured by running the same pool along that axis alone (onnxruntime) on the
    identity; g_x = A_hᵀ g A_w (1-D: g A_l)."""
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.shapes.of(x), ctx.shapes.of(y)
    n = len(k)
    if n not in (1, 2) or not all(isinstance(d, int) for d in list(xs[2:]) + list(ys[2:])):
        raise ExportError(f"AveragePool '{node.name}': this padding or ceil_mode needs a 1-D or "
                          "2-D pool with static sizes")
    a = attrs(node)
    mats = []
    for i in range(n):
        size = int(xs[2 + i])
        pool = helper.make_node(
            "AveragePool", ["x"], ["y"], kernel_shape=[k[i]], strides=[strides[i]],
            pads=[pads[i], pads[n + i]], dilations=[dil[i]], ceil_mode=int(a.get("ceil_mode", 0)),
            count_include_pad=int(a.get("count_include_pad", 0)))
        graph = helper.make_graph([pool], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        probe = np.eye(size, dtype=np.float32).reshape(size, 1, size)
        out = _run_probe(model, {"x": probe})                             # [in, 1, out]
        if out.shape[2] != ys[2 + i]:
            raise ExportError(f"AveragePool '{node.name}': its pooling gives {out.shape[2]} "
                              f"positions where the graph has {ys[2 + i]}")
        mats.append(np.ascontiguousarray(out[:, 0, :].T))                  # [out, in]
    return _separable_adjoint(ctx.bwd, g, mats)


def _separable_adjoint(b, g: str, mats: list[np.ndarray]) -> str:
    """g_x of ``y = A_h x A_wᵀ`` per sample and channel (1-D: ``y = x A_lᵀ``), the [out, in]
    matrices ``mats`` per spatial axis: A_hᵀ g A_w (1-D: g A_l)."""
    if len(mats) == 1:
        return b.op("MatMul", [g, b.const(mats[0])])
    t = b.op("MatMul", [b.const(np.ascontiguousarray(mats[0].T)), g])
    return b.op("MatMul", [t, b.const(mats[1])])


def _resize_matrix(node, axis_in: int, axis_out: int, scale: float | None, opset: int
                   ) -> np.ndarray:
    """The [out, in] matrix of ``node``'s interpolation along one axis, measured by running the
    same Resize (onnxruntime, ``_run_probe``) on the identity: Resize is separable in every mode
    (nearest, linear, cubic; antialiased or not), so per axis it is a matrix."""
    a = {k: v for k, v in attrs(node).items() if k not in ("axes", "keep_aspect_ratio_policy")}
    probe = np.eye(axis_in, dtype=np.float32).reshape(axis_in, 1, axis_in, 1)
    probe = np.repeat(probe, 2, axis=3)  # a second column: no length-1 axis anywhere
    if scale is not None:
        extra = [np.array([], np.float32), np.array([1.0, 1.0, scale, 1.0], np.float32)]
        names = ["x", "roi", "scales"]
    else:
        extra = [np.array([], np.float32), np.array([], np.float32),
                 np.array([axis_in, 1, axis_out, 2], np.int64)]
        names = ["x", "roi", "scales", "sizes"]
    graph = helper.make_graph(
        [helper.make_node("Resize", names, ["y"], **a)], "probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT if n != "sizes" else
                                       TensorProto.INT64, None) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    out = _run_probe(model, dict(zip(names, [probe] + extra, strict=True)))
    if out.shape[2] != axis_out:
        raise ExportError(f"Resize '{node.name}': its interpolation gives {out.shape[2]} "
                          f"positions where the graph has {axis_out}")
    return np.ascontiguousarray(out[:, 0, :, 0].T)  # [out, in]


@RULES.gradient("Resize")
def resize_grad(ctx, node, gy):
    """Resize of the spatial axes of [N, C, *spatial] (nearest / linear / cubic upsampling or
    downsampling): per sample and channel y = A_h x A_wᵀ (1-D: x A_lᵀ) with interpolation
    matrices A measured at export (``_resize_matrix``), so g_x = A_hᵀ g A_w. Scales must be
    constants (or sizes given: the output's static shape); N and C are never resized."""
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.shapes.of(x), ctx.shapes.of(y)
    a = attrs(node)
    if len(xs) not in (3, 4) or not all(isinstance(d, int) for d in list(xs[1:]) + list(ys[1:])):
        raise ExportError(f"Resize '{node.name}': needs a [N, C, L] or [N, C, H, W] input "
                          "with static sizes")
    if xs[1] != ys[1] or a.get("axes") is not None:
        raise ExportError(f"Resize '{node.name}': only the spatial axes may be resized")
    mode = a.get("coordinate_transformation_mode", b"half_pixel")
    if (mode.decode() if isinstance(mode, bytes) else mode) == "tf_crop_and_resize":
        raise ExportError(f"Resize '{node.name}': coordinate_transformation_mode "
                          "tf_crop_and_resize (a crop by its roi input) has no gradient rule; "
                          "crop with Slice before a plain Resize")
    scales = None
    if len(node.input) > 2 and node.input[2] and not (len(node.input) > 3 and node.input[3]):
        scales = [float(s) for s in np.asarray(ctx.constant_value(node.input[2])).ravel()]
        if len(scales) != len(xs) or scales[0] != 1.0 or scales[1] != 1.0:
            raise ExportError(f"Resize '{node.name}': scales {scales} resize more than the "
                              "spatial axes")
    b, g = ctx.bwd, gy[0]
    opset = max(ctx.opset, 19)  # the newest Resize reads every older attribute alike
    mats = [_resize_matrix(node, int(xs[i]), int(ys[i]), None if scales is None else scales[i],
                           opset) for i in range(2, len(xs))]
    return [_separable_adjoint(b, g, mats)] + [None] * (len(node.input) - 1)
