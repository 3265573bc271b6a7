"""A strided pointwise convolution (ResNet's downsampling shortcut: 1×1 kernel, stride 2, no
padding) is the same convolution at stride 1 on every s-th position: ``Slice(x, steps=s)``
then ``Conv`` with unit strides. Rewritten so, it is a plain pointwise layer that INSTANT
compresses (``export/layers.py`` takes unit strides only), and the Slice's gradient scatters
back into zeros (``rules/shape.py``). The output size is the same: ``floor((H - 1) / s) + 1``
positions either way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["split_strided_pointwise"]


def split_strided_pointwise(model: onnx.ModelProto) -> int:
    """Rewrite every strided 1×1 Conv (group 1, no padding) as Slice + unit-stride Conv in
    place; returns how many. An ``auto_pad`` SAME_UPPER/SAME_LOWER pads a 1×1 kernel by
    nothing (its output, ceil(H / s), is VALID's): taken as unpadded (a session 44 probe)."""
    g = model.graph
    dims = {i.name: list(i.dims) for i in g.initializer}
    out, done = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = dims.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        strides = [int(s) for s in attrs.get("strides", [])]
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if (w is None or node.domain not in ("", "ai.onnx") or len(w) < 3
                or any(d != 1 for d in w[2:]) or attrs.get("group", 1) != 1
                or any(p != 0 for p in attrs.get("pads", []))
                or auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
                or len(strides) != len(w) - 2 or all(s == 1 for s in strides)):
            out.append(node)
            continue
        k = len(strides)
        base = f"{node.name or node.output[0]}/stride_slice"
        consts = {"starts": [0] * k, "ends": [np.iinfo(np.int64).max] * k,
                  "axes": list(range(2, 2 + k)), "steps": strides}
        for key, vals in consts.items():
            g.initializer.append(numpy_helper.from_array(np.asarray(vals, np.int64),
                                                         f"{base}/{key}"))
        sliced = f"{base}/output"
        out.append(helper.make_node("Slice", [node.input[0], *(f"{base}/{k_}" for k_ in consts)],
                                    [sliced], name=base))
        conv = helper.make_node("Conv", [sliced, *node.input[1:]], list(node.output),
                                name=node.name, kernel_shape=[1] * k, strides=[1] * k)
        out.append(conv)
        done += 1
    if done:
        del g.node[:]
        g.node.extend(out)
    return done
