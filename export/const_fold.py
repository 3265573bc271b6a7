"""The values of a graph's constants that gradient rules read (a Slice's bounds, a Reshape's
target): initializers, Constant nodes, and integer arithmetic on small integer constants,
evaluated here with onnx's reference implementation. torch's exporter without constant folding
writes ``W[:, :6]``'s bounds as ``Unsqueeze(Constant)``: the Slice rule needs their values (a
probe's ONNX file failed "must be a constant")."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["graph_constants"]

# integer arithmetic of small constants that a rule may need as a value (a Slice's bounds
# written as Unsqueeze(Constant) by torch's exporter without constant folding)
_FOLDABLE = {"Unsqueeze", "Squeeze", "Concat", "Cast", "Add", "Sub", "Mul", "Div", "Gather",
             "Slice", "Reshape", "Identity", "Neg", "Max", "Min", "Abs", "Mod", "Range",
             "ConstantOfShape", "Expand", "Equal", "Where", "Not"}


def graph_constants(g: onnx.GraphProto, opset: int = 17) -> dict[str, np.ndarray]:
    """Values of the graph's constants: initializers, Constant nodes, and integer arithmetic
    on small integer constants (evaluated here with onnx's reference implementation)."""
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
        elif (n.op_type in _FOLDABLE and n.input and all(i in consts for i in n.input if i)
              and all(consts[i].dtype.kind in "iub" and consts[i].size <= 1024
                      for i in n.input if i)):
            if not _small_result(n, consts):
                continue
            try:
                values = _evaluate(n, [consts[i] if i else None for i in n.input], opset)
            except Exception:  # noqa: BLE001 - not foldable here: left to the graph
                continue
            for o, v in zip(n.output, values, strict=False):
                if o and isinstance(v, np.ndarray) and v.dtype.kind in "iub":
                    consts[o] = v
    return consts


def _evaluate(node: onnx.NodeProto, values: list, opset: int) -> list:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{k}" if v is not None else "" for k, v in enumerate(values)]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in zip(names, values, strict=True) if v is not None]
    outs = [helper.make_tensor_value_info(f"out{k}", onnx.TensorProto.UNDEFINED, None)
            for k in range(len(node.output))]
    one = helper.make_node(node.op_type, names, [o.name for o in outs],
                           **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    model = helper.make_model(helper.make_graph([one], "fold", inputs, outs),
                              opset_imports=[helper.make_opsetid("", opset)])
    feeds = {n: v for n, v in zip(names, values, strict=True) if v is not None}
    return ReferenceEvaluator(model).run(None, feeds)


def _small_result(n: onnx.NodeProto, consts: dict[str, np.ndarray]) -> bool:
    """Whether ``n``'s result stays small (the ops whose output size their inputs' values set:
    a Range to 10^8 or a ConstantOfShape of 20000 x 20000 would be computed and kept here)."""
    try:
        if n.op_type in ("ConstantOfShape", "Expand"):
            shape = consts[n.input[-1] if n.op_type == "ConstantOfShape" else n.input[1]]
            return int(np.prod(np.maximum(shape.astype(np.int64), 1))) <= 1024
        if n.op_type == "Range":
            start, limit, delta = (float(consts[i]) for i in n.input[:3])
            return delta != 0 and abs((limit - start) / delta) <= 1024
    except (KeyError, ValueError, TypeError, IndexError):
        return False
    return True
