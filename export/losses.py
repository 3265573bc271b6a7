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


def _classes_first(out_shape: list, labels: list[int] | None, class_axis: str) -> bool:
    """Whether a per-position output ([N, ...] of rank 3 and up) holds its classes on axis 1
    (torch's layout) rather than last. ``class_axis`` "1" / "last" says so; "auto" reads the
    example labels ``[N, ...]``: matching ``out[2:]`` only -> axis 1, ``out[1:-1]`` only ->
    last; without labels (or where both match: C == L) axis 1 at rank 4 and up (``[N, classes,
    H, W]``), last at rank 3 (``[N, L, classes]``, a token tagger).

    Raises:
        ExportError: labels that match neither layout.
    """
    if class_axis != "auto":
        return class_axis == "1"
    if labels is not None and len(labels) == len(out_shape) - 1:
        first = list(labels[1:]) == list(out_shape[2:])
        last = list(labels[1:]) == list(out_shape[1:-1])
        if first != last:
            return first
        if not first:
            raise ExportError(f"the --npz example's y has shape {labels}, which fits neither "
                              f"a class axis 1 nor a last class axis of the output "
                              f"{out_shape}; save y with one class id per position")
    return len(out_shape) >= 4


def _made_by(g: onnx.GraphProto, output: str, op: str) -> onnx.NodeProto | None:
    """The standard-domain ``op`` node that makes ``output``, else None."""
    node = next((n for n in g.node if output in n.output), None)
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") \
        else None


def _logits(g: onnx.GraphProto, output: str, rank: int, first: bool,
            notes: list[str] | None) -> str:
    """What the cross-entropy reads: ``output``, or the input of the Softmax that makes it over
    the class axis (files from many exporters end in one). Cross-entropy of probabilities
    would apply a second softmax: a loss that barely moves."""
    node = _made_by(g, output, "Softmax")
    if node is None:
        return output
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    axis = axis + rank if axis < 0 else axis
    if axis != (1 if first else rank - 1):
        return output
    if notes is not None:
        notes.append(f"note: output '{output}' is a Softmax's probabilities; the cross-entropy "
                     f"is computed from its input '{node.input[0]}' (the logits)")
    return node.input[0]


def _sigmoid_input(g: onnx.GraphProto, output: str, notes: list[str] | None) -> str | None:
    """The input of the Sigmoid that makes ``output``, else None: binary cross-entropy on
    logits of probabilities would apply a second sigmoid (a loss that cannot reach 0, and
    gradients several times too small)."""
    node = _made_by(g, output, "Sigmoid")
    if node is None:
        return None
    if notes is not None:
        notes.append(f"note: output '{output}' is a Sigmoid's probabilities; the binary "
                     f"cross-entropy is computed from its input '{node.input[0]}' (the logits)")
    return node.input[0]


def append_loss(model: onnx.ModelProto, output: str, loss: str, shapes: Shapes,
                labels: list[int] | None = None, class_axis: str = "auto",
                notes: list[str] | None = None) -> LossSpec:
    """Append ``loss`` of ``output``; ``labels``: the example labels' shape, where known;
    ``class_axis``: see :func:`_classes_first`; ``notes`` gets a line where the loss reads
    another tensor than ``output`` (:func:`_logits`)."""
    g = model.graph
    out_shape = shapes.of(output)
    kind = shapes.dtype.get(output, TensorProto.FLOAT)
    if kind not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                    TensorProto.BFLOAT16):  # (a probe's argmax: told --loss mse, a dead end)
        raise ExportError(f"output '{output}' holds {TensorProto.DataType.Name(kind).lower()} "
                          "values (class ids, e.g. an argmax), which no gradient passes: return "
                          "the scores (logits) from forward, and take the argmax after the "
                          "model")
    if kind != TensorProto.FLOAT:  # (an outside probe: a final .half() exported, then no step
        # ever ran: onnxruntime refused the loss of float16 scores)
        raise ExportError(f"output '{output}' holds "
                          f"{TensorProto.DataType.Name(kind).lower().replace('double', 'float64')}"
                          " values and the loss is computed in float32: make the model return "
                          "float32 (torch: end forward with .float(), not .half())")
    if loss == "cross_entropy":
        rank = len(out_shape)
        first = rank >= 3 and _classes_first(out_shape, labels, class_axis)
        if rank < 2 or not isinstance(out_shape[1 if first else -1], int):
            raise ExportError(f"cross_entropy needs a [N, classes] output, [N, L, classes] "
                              f"for a class per token or [N, classes, H, W, ...] for a class per "
                              f"pixel; '{output}' has shape {out_shape}. Use --loss mse for "
                              "other outputs")
        _check_classes(output, out_shape, first)
        scores, label_dims, extra = _logits(g, output, rank, first, notes), ["N"], {}
        probs = scores != output  # (a Softmax's output: its input is read)
        if first:  # labels [N, H, W, ...]; SoftmaxCrossEntropyLoss reads this layout as it is
            label_dims = ["N"] + [d if isinstance(d, int) else "?" for d in out_shape[2:]]
            extra = {"ignore_index": names.IGNORE_LABEL}
        elif rank >= 3:  # per token / pixel, classes last: moved to axis 1 for the loss op
            g.node.append(helper.make_node("Transpose", [scores], ["loss/scores"],
                                           perm=[0, rank - 1, *range(1, rank - 1)],
                                           name="loss/Transpose"))
            scores = "loss/scores"
            label_dims = ["N"] + [d if isinstance(d, int) else ("L" if rank == 3 else "?")
                                  for d in out_shape[1:-1]]
            extra = {"ignore_index": names.IGNORE_LABEL}
        g.input.append(helper.make_tensor_value_info(names.LABELS, TensorProto.INT64,
                                                     label_dims))
        g.node.append(helper.make_node("SoftmaxCrossEntropyLoss", [scores, names.LABELS],
                                       [names.LOSS], name="loss/SoftmaxCrossEntropyLoss",
                                       reduction="mean", **extra))
        info = LossSpec("cross_entropy", TensorSpec(names.LABELS, label_dims, "int64"),
                        int(out_shape[1 if first else -1]), classes_first=first,
                        probabilities=probs)
    elif loss in ("bce", "mse"):  # float targets of the output's shape
        dims = ["N"] + [d if isinstance(d, int) else "?" for d in out_shape[1:]]
        g.input.append(helper.make_tensor_value_info(names.LABELS, TensorProto.FLOAT, dims))
        logits = _sigmoid_input(g, output, notes) if loss == "bce" else None
        if logits is not None:
            _bce(g, logits)
        else:
            (_bce if loss == "bce" else _mse)(g, output)
        info = LossSpec(loss, TensorSpec(names.LABELS, dims, "float32"),
                        probabilities=logits is not None)
    else:
        raise ExportError(f"unknown loss '{loss}'; supported: {', '.join(LOSSES)}")
    g.output.insert(0, helper.make_tensor_value_info(names.LOSS, TensorProto.FLOAT, []))
    return info


def _check_classes(output: str, out_shape: list, first: bool) -> None:
    """A class axis of size 1 (e.g. a ``[N, K, 1]`` output read with its classes last) is
    refused with the way out: the other class axis, or a loss for one score per example.

    Raises:
        ExportError: fewer than 2 classes on the chosen class axis.
    """
    axis = 1 if first else len(out_shape) - 1
    if out_shape[axis] >= 2:
        return
    other = len(out_shape) - 1 if first else 1
    way = (f"pass --class-axis {'last' if first else '1'} if its classes are on axis {other} "
           f"(size {out_shape[other]}), or " if len(out_shape) >= 3
           and isinstance(out_shape[other], int) and out_shape[other] >= 2 else "")
    raise ExportError(f"cross_entropy needs at least 2 classes, but output '{output}' of shape "
                      f"{out_shape} has {out_shape[axis]} on its class axis "
                      f"({'1' if first else 'last'}); {way}use --loss bce for one logit per "
                      "example or --loss mse for a regression")


def _bce(g: onnx.GraphProto, output: str) -> None:
    """The mean of softplus(z) - z·y = log(1 + e^z) - z·y (onnxruntime's Softplus is stable)."""
    g.node.append(helper.make_node("Softplus", [output], ["loss/softplus"],
                                   name="loss/Softplus"))
    g.node.append(helper.make_node("Mul", [output, names.LABELS], ["loss/zy"], name="loss/Mul"))
    g.node.append(helper.make_node("Sub", ["loss/softplus", "loss/zy"], ["loss/terms"],
                                   name="loss/Sub"))
    g.node.append(helper.make_node("ReduceMean", ["loss/terms"], [names.LOSS], name="loss/Mean",
                                   keepdims=0))


def _mse(g: onnx.GraphProto, output: str) -> None:
    """The mean of (z - y)²."""
    g.node.append(helper.make_node("Sub", [output, names.LABELS], ["loss/diff"],
                                   name="loss/Sub"))
    g.node.append(helper.make_node("Mul", ["loss/diff", "loss/diff"], ["loss/sq"],
                                   name="loss/Mul"))
    g.node.append(helper.make_node("ReduceMean", ["loss/sq"], [names.LOSS], name="loss/Mean",
                                   keepdims=0))
