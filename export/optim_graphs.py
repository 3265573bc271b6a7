"""Optimizer steps as small ONNX graphs, for a device-resident step (``--device cuda``): the
parameter, its gradient and the optimizer state stay in device memory and the update runs on the
same execution provider, one run per parameter, outputs bound to the inputs' own buffers.

Same arithmetic as ``runtime/optim.py`` (PyTorch semantics); a test runs both for 20 steps and
compares to 1e-6. Shapes are left open, so one graph serves every parameter.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["OPTIMIZER_GRAPHS", "adamw_graph", "sgd_graph"]


def _vi(name: str, scalar: bool = False) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [] if scalar else None)


def _model(nodes, inputs, scalars, outputs, name: str, opset: int) -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, [_vi(i) for i in inputs] + [_vi(s, True) for s in scalars],
                          [_vi(o) for o in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="instant-runtime-export")
    m.ir_version = 8
    return m


def adamw_graph(opset: int = 17) -> onnx.ModelProto:
    """p' = p(1 - lr·wd) - (lr/c1) · m' / (sqrt(v'/c2) + eps); m' = b1·m + (1-b1)·g;
    v' = b2·v + (1-b2)·g²; c1, c2 the bias corrections 1 - b^t (inputs, computed on the host)."""
    n = helper.make_node
    nodes = [
        n("Mul", ["m", "b1"], ["m_b"]),
        n("Sub", ["one", "b1"], ["omb1"]),
        n("Mul", ["g", "omb1"], ["g_b"]),
        n("Add", ["m_b", "g_b"], ["m_out"]),
        n("Mul", ["v", "b2"], ["v_b"]),
        n("Sub", ["one", "b2"], ["omb2"]),
        n("Mul", ["g", "g"], ["g2"]),
        n("Mul", ["g2", "omb2"], ["g2_b"]),
        n("Add", ["v_b", "g2_b"], ["v_sum"]),
        n("Min", ["v_sum", "fmax"], ["v_out"]),  # an overflowed g² stays finite (runtime/optim.py)
        n("Mul", ["lr", "wd"], ["lrwd"]),
        n("Sub", ["one", "lrwd"], ["decay"]),
        n("Mul", ["p", "decay"], ["p_d"]),
        n("Div", ["v_out", "c2"], ["v_hat"]),
        n("Sqrt", ["v_hat"], ["v_sqrt"]),
        n("Add", ["v_sqrt", "eps"], ["denom"]),
        n("Div", ["m_out", "denom"], ["ratio"]),
        n("Div", ["lr", "c1"], ["step"]),
        n("Mul", ["ratio", "step"], ["update"]),
        n("Sub", ["p_d", "update"], ["p_out"]),
    ]
    m = _model(nodes, ["p", "g", "m", "v"], ["lr", "b1", "b2", "eps", "wd", "c1", "c2"],
               ["p_out", "m_out", "v_out"], "adamw_step", opset)
    m.graph.initializer.append(helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    m.graph.initializer.append(helper.make_tensor("fmax", TensorProto.FLOAT, [],
                                                  [float(np.finfo(np.float32).max)]))
    return m


def sgd_graph(opset: int = 17) -> onnx.ModelProto:
    """v' = mu·v + g + wd·p; p' = p - lr·v' (PyTorch's SGD with momentum)."""
    n = helper.make_node
    nodes = [
        n("Mul", ["p", "wd"], ["p_wd"]),
        n("Add", ["g", "p_wd"], ["g_wd"]),
        n("Mul", ["v", "mu"], ["v_mu"]),
        n("Add", ["v_mu", "g_wd"], ["v_out"]),
        n("Mul", ["v_out", "lr"], ["update"]),
        n("Sub", ["p", "update"], ["p_out"]),
    ]
    return _model(nodes, ["p", "g", "v"], ["lr", "mu", "wd"], ["p_out", "v_out"], "sgd_step",
                  opset)


OPTIMIZER_GRAPHS = {"adamw": adamw_graph, "sgd": sgd_graph}
