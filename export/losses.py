"""The loss appended to the forward graph: its labels input and the ``LossSpec`` of the
manifest (``contract/manifest.py``).

- ``cross_entropy``: a class per sample (``[N, classes]`` output), per token (``[N, L,
  classes]``, labels ``[N, L]``) or per pixel (``[N, classes, H, W, ...]``, torch's layout,
  labels ``[N, H, W, ...]``); ``names.IGNORE_LABEL`` marks a token or pixel without a label;
- ``mse``: the mean squared error against float targets of the output's shape;
- ``bce``: binary cross-entropy on logits, the mean of softplus(z) - z·y over every output
  element (onnxruntime's Softplus is stable at any logit), targets in [0, 1].
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from contract import LossSpec, TensorSpec, names

from .graph import ExportError, Shapes

__all__ = ["LOSSES", "append_loss"]

LOSSES = ("cross_entropy", "mse", "bce")


def _classes_first(out_shape: list, labels: list[int] | None) -> bool:
    """Whether a per-position output holds its classes on axis 1 (torch's layout): always at
    rank 4 and up (``[N, classes, H, W]``); at rank 3 where example labels ``[N, L]`` match
    axis 2 and not axis 1 (a Conv1d tagger's ``[N, classes, L]``), else ``[N, L, classes]``."""
    if len(out_shape) >= 4:
        return True
    return (len(out_shape) == 3 and labels is not None and len(labels) == 2
            and labels[1] == out_shape[2] and labels[1] != out_shape[1])


def append_loss(model: onnx.ModelProto, output: str, loss: str, shapes: Shapes,
                labels: list[int] | None = None) -> LossSpec:
    """Append ``loss`` of ``output``; ``labels``: the example labels' shape, where known."""
    g = model.graph
    out_shape = shapes.of(output)
    if loss == "cross_entropy":
        first = _classes_first(out_shape, labels)  # torch's layout: [N, classes, H, W]
        if len(out_shape) < 2 or not isinstance(out_shape[1 if first else -1], int):
            raise ExportError(f"cross_entropy needs a [N, classes] output, [N, L, classes] "
                              f"for a class per token or [N, classes, H, W, ...] for a class per "
                              f"pixel; '{output}' has shape {out_shape}. Use --loss mse for "
                              "other outputs")
        scores, label_dims, extra = output, ["N"], {}
        if first:  # labels [N, H, W, ...]; SoftmaxCrossEntropyLoss reads this layout as it is
            label_dims = ["N"] + [d if isinstance(d, int) else "?" for d in out_shape[2:]]
            extra = {"ignore_index": names.IGNORE_LABEL}
        elif len(out_shape) == 3:  # per token: labels [N, L], IGNORE_LABEL where there is none
            scores = "loss/scores"
            g.node.append(helper.make_node("Transpose", [output], [scores], perm=[0, 2, 1],
                                           name="loss/Transpose"))
            label_dims = ["N", out_shape[1] if isinstance(out_shape[1], int) else "L"]
            extra = {"ignore_index": names.IGNORE_LABEL}
        g.input.append(helper.make_tensor_value_info(names.LABELS, TensorProto.INT64,
                                                     label_dims))
        g.node.append(helper.make_node("SoftmaxCrossEntropyLoss", [scores, names.LABELS],
                                       [names.LOSS], name="loss/SoftmaxCrossEntropyLoss",
                                       reduction="mean", **extra))
        info = LossSpec("cross_entropy", TensorSpec(names.LABELS, label_dims, "int64"),
                        int(out_shape[1 if first else -1]), classes_first=first)
    elif loss == "bce":  # mean of softplus(z) - z·y: log(1 + e^z) - z·y, stable in onnxruntime
        dims = ["N"] + [d if isinstance(d, int) else "?" for d in out_shape[1:]]
        g.input.append(helper.make_tensor_value_info(names.LABELS, TensorProto.FLOAT, dims))
        g.node.append(helper.make_node("Softplus", [output], ["loss/softplus"],
                                       name="loss/Softplus"))
        g.node.append(helper.make_node("Mul", [output, names.LABELS], ["loss/zy"],
                                       name="loss/Mul"))
        g.node.append(helper.make_node("Sub", ["loss/softplus", "loss/zy"], ["loss/terms"],
                                       name="loss/Sub"))
        g.node.append(helper.make_node("ReduceMean", ["loss/terms"], [names.LOSS],
                                       name="loss/Mean", keepdims=0))
        info = LossSpec("bce", TensorSpec(names.LABELS, dims, "float32"))
    elif loss == "mse":
        dims = ["N"] + [d if isinstance(d, int) else "?" for d in out_shape[1:]]
        g.input.append(helper.make_tensor_value_info(names.LABELS, TensorProto.FLOAT, dims))
        g.node.append(helper.make_node("Sub", [output, names.LABELS], ["loss/diff"],
                                       name="loss/Sub"))
        g.node.append(helper.make_node("Mul", ["loss/diff", "loss/diff"], ["loss/sq"],
                                       name="loss/Mul"))
        g.node.append(helper.make_node("ReduceMean", ["loss/sq"], [names.LOSS], name="loss/Mean",
                                       keepdims=0))
        info = LossSpec("mse", TensorSpec(names.LABELS, dims, "float32"))
    else:
        raise ExportError(f"unknown loss '{loss}'; supported: {', '.join(LOSSES)}")
    g.output.insert(0, helper.make_tensor_value_info(names.LOSS, TensorProto.FLOAT, []))
    return info
