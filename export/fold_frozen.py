"""Frozen batch norms folded into the frozen convolutions before them, once, at export.

A CNN trained from its last stages (``--trainable last:K``, the usual transfer-learning set-up)
keeps a frozen backbone of ``Conv -> BatchNormalization`` pairs whose weights and statistics are
all constants. onnxruntime fuses each such pair at its basic optimisation level (the runtime's
default), but it does so **per session**: every session of a bundle (the training forward, the
calibration and recalibration graphs, inference) held its own fused copy of the frozen conv
weights, besides the memory-mapped ``weights.bin`` every session shares. On EfficientNet-Lite0
``last:3`` at 224 px a forward session took ~4.7 MB (~1.9 MB with the fold), and INSTANT opens
four forward sessions to vanilla's two: part of why INSTANT needed more whole-process memory than
vanilla there (session 35 probe). Folded here, the fused weights are the ones in ``weights.bin``:
mapped once, shared by every session, nothing left for onnxruntime to copy.

Text models' any-length inference graph and shorter-length training graphs are built again from
the traced model and keep their pairs unfolded (onnxruntime fuses those per session, as before).

A pair is folded only where every input is a float32 initializer (nothing of it trains: a
trainable weight is a graph input by then), the batch norm is the conv's only reader and runs in
inference mode with one output, and the conv output is not a graph output. The fold is
``W' = W · s`` per output channel and ``b' = (b - mean) · s + beta``, with
``s = gamma / sqrt(var + eps)``, computed in float64 and stored as float32 (onnxruntime computes
the same fold in float32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import reads

__all__ = ["fold_frozen_batchnorm"]


def fold_frozen_batchnorm(model: onnx.ModelProto) -> int:
    """Fold every frozen ``Conv -> BatchNormalization`` pair of ``model``'s main graph in place;
    the number folded."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in reads(n):  # (a subgraph's read of an outer tensor, at any depth, counts)
            readers[i] = readers.get(i, 0) + 1
    exposed = {o.name for o in g.output} | {i.name for i in g.input}  # (fed: not constant)
    producer = {o: n for n in g.node for o in n.output}
    taken = {t.name for t in g.initializer} | {i.name for i in g.input} | set(producer)
    drop: set[int] = set()  # the folded norms (by id), and the conv outputs they read
    gone: set[str] = set()
    for bn in g.node:
        conv = _foldable(bn, producer, inits, readers, exposed)
        if conv is None:
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64)
                                  for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        s = gamma / np.sqrt(var + eps)
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else ""
        b = (numpy_helper.to_array(inits[bias]).astype(np.float64) if bias
             else np.zeros(w.shape[0]))
        w_name = _fresh(f"{conv.input[1]}.bn_folded", taken)
        b_name = _fresh(f"{bias or conv.input[1] + '.bias'}.bn_folded", taken)
        g.initializer.append(numpy_helper.from_array(
            (w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32), w_name))
        g.initializer.append(numpy_helper.from_array(((b - mean) * s + beta).astype(np.float32),
                                                     b_name))
        for i in list(conv.input[1:3]) + list(bn.input[1:5]):
            if i:
                readers[i] -= 1
        gone.add(conv.output[0])
        conv.input[1:] = [w_name, b_name]
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
    if not drop:
        return 0
    unused = {name for name, count in readers.items()
              if count <= 0 and name in inits and name not in exposed}
    _keep(g.node, lambda n: id(n) not in drop)  # (one pass each: not a removal per pair)
    _keep(g.value_info, lambda v: v.name not in gone)
    _keep(g.initializer, lambda t: t.name not in unused)
    return len(drop)


def _foldable(bn: onnx.NodeProto, producer: dict, inits: dict, readers: dict,
              exposed: set) -> onnx.NodeProto | None:
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
        return None
    if len(bn.output) != 1 or len(bn.input) != 5:
        return None
    if any(a.name == "training_mode" and a.i for a in bn.attribute):
        return None
    conv = producer.get(bn.input[0])
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return None
    if readers.get(bn.input[0], 0) != 1 or bn.input[0] in exposed or len(conv.input) < 2:
        return None
    frozen = list(conv.input[1:3]) + list(bn.input[1:5])
    if not all(i == "" or (i in inits and i not in exposed
                           and inits[i].data_type == onnx.TensorProto.FLOAT)
               for i in frozen) or not conv.input[1]:
        return None
    w = inits[conv.input[1]]
    channels = w.dims[0] if w.dims else -1
    if any(list(inits[i].dims) != [channels] for i in bn.input[1:5]):
        return None
    return conv


def _fresh(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def _keep(field, wanted) -> None:
    """Keep the entries of a repeated protobuf field for which ``wanted`` holds, in order."""
    kept = [e for e in field if wanted(e)]
    if len(kept) != len(field):
        del field[:]
        field.extend(kept)

