"""The shared reference check: our ONNX autodiff, run on onnxruntime, against torch autograd.

A check builds a tiny forward graph from ONNX text-syntax statements, appends the scalar loss
``loss = Σ y·R`` (``R`` fixed and random, so the output gradient is ``R`` itself and every
gradient is non-trivial), differentiates it with ``build_training_graphs`` and runs the forward
and backward graphs with onnxruntime on the CPU. The reference is the same computation written in
torch and differentiated by autograd in float64. Gradients w.r.t. an activation are checked by
listing that graph input in ``params``.

Used by ``tests/test_gradients.py`` (one row per op) and ``tests/test_instant.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from contract.names import GRAD_ACC, LOSS_SCALE
from export.autodiff import TrainingGraphs, build_training_graphs
from export.graph import Shapes
from export.layers import CompressedLayer

__all__ = ["LOSS", "LOSS_WEIGHT", "Runner", "check_op_gradients", "loss_weight", "op_model",
           "run_training"]

LOSS = "loss"
LOSS_WEIGHT = "ref.R"  # the initializer R of loss = Σ y·R
OPSET = 17
_TEXT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.int64): "int64"}


def op_model(body: str, inputs: dict[str, np.ndarray], *, output: str = "y",
             consts: dict[str, np.ndarray] | None = None, opset: int = OPSET,
             seed: int = 0) -> onnx.ModelProto:
    """A forward graph: ``body`` (ONNX text-syntax statements) over graph ``inputs``, then the
    loss ``Σ output·R`` with a fixed random ``R`` (see ``loss_weight``).

    ``consts`` become initializers (not graph inputs). Unnamed nodes are named ``<Op>_<index>``
    so that error messages and INSTANT layers can refer to them.
    """
    decls = ", ".join(f"{_TEXT_TYPES[v.dtype]}[{','.join(str(d) for d in v.shape)}] {k}"
                      for k, v in inputs.items())
    text = (f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
            f"g ({decls}) => (float {LOSS}) {{\n{body}\n}}")
    model = onnx.parser.parse_model(text)
    g = model.graph
    for i, node in enumerate(g.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    for name, value in (consts or {}).items():
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    dims = Shapes(model).of(output)
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(f"output '{output}' needs a static shape, got {dims}")
    r = np.random.default_rng(seed + 1000).standard_normal(dims).astype(np.float32)
    g.initializer.append(numpy_helper.from_array(r, LOSS_WEIGHT))
    g.node.append(helper.make_node("Mul", [output, LOSS_WEIGHT], ["ref.yR"], name="ref/Mul"))
    g.node.append(helper.make_node("ReduceSum", ["ref.yR"], [LOSS], name="ref/ReduceSum",
                                   keepdims=0))
    return model


def loss_weight(model: onnx.ModelProto) -> np.ndarray:
    """The ``R`` of ``loss = Σ y·R``: exactly the gradient of the loss w.r.t. ``y``."""
    for init in model.graph.initializer:
        if init.name == LOSS_WEIGHT:
            return numpy_helper.to_array(init)
    raise KeyError(LOSS_WEIGHT)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class Runner:
    """Forward and backward sessions of one ``TrainingGraphs``, reusable across feeds."""

    def __init__(self, tg: TrainingGraphs) -> None:
        self.tg = tg
        self.fwd = _session(tg.forward)
        self.bwd = _session(tg.backward)

    def run_all(self, feeds: dict[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every forward output and every backward output, by tensor name."""
        f_in = {i.name: feeds[i.name] for i in self.fwd.get_inputs()}
        f_names = [o.name for o in self.fwd.get_outputs()]
        fwd_out = dict(zip(f_names, self.fwd.run(f_names, f_in), strict=True))
        avail = {**feeds, **fwd_out, LOSS_SCALE: np.array(1.0, np.float32)}
        for p in self.tg.grads:  # nothing accumulated yet: the backward's output is the gradient
            avail[GRAD_ACC + p] = np.zeros_like(feeds[p])
        b_in = {i.name: avail[i.name] for i in self.bwd.get_inputs()}
        b_names = [o.name for o in self.bwd.get_outputs()]
        bwd_out = dict(zip(b_names, self.bwd.run(b_names, b_in), strict=True))
        return fwd_out, bwd_out

    def __call__(self, feeds: dict[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every forward output by name, and the gradient of each parameter by its name."""
        fwd_out, bwd_out = self.run_all(feeds)
        return fwd_out, {p: bwd_out[out] for p, out in self.tg.grads.items()}


def run_training(model: onnx.ModelProto, params: Sequence[str], feeds: dict[str, np.ndarray],
                 mode: str = "vanilla", layers: Sequence[CompressedLayer] = (),
                 opset: int = OPSET, passes=None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Build the training graphs of ``model`` and run one forward + backward step (``passes``:
    None for the standard ones, ``()`` for the plain rules)."""
    tg = build_training_graphs(model, LOSS, list(params), mode, list(layers), opset,
                               passes=passes)
    return Runner(tg)(feeds)


def check_op_gradients(body: str, torch_fn: Callable[..., torch.Tensor],
                       inputs: dict[str, np.ndarray], params: Sequence[str], *,
                       consts: dict[str, np.ndarray] | None = None, opset: int = OPSET,
                       rtol: float = 1e-4, atol: float = 1e-5, passes=None) -> None:
    """Check the loss and the gradient of every name in ``params`` against torch autograd.

    ``torch_fn`` receives every graph input as a float64 (int64 for integer inputs) torch
    tensor, by name, and returns the tensor the graph calls ``y``.
    """
    model = op_model(body, inputs, consts=consts, opset=opset)
    fwd_out, grads = run_training(model, params, inputs, opset=opset, passes=passes)

    tensors = {}
    for k, v in inputs.items():
        t = torch.from_numpy(v.astype(np.float64) if v.dtype.kind == "f" else v)
        tensors[k] = t.requires_grad_(k in params)
    y = torch_fn(**tensors)
    loss = (y * torch.from_numpy(loss_weight(model).astype(np.float64))).sum()
    loss.backward()

    np.testing.assert_allclose(fwd_out[LOSS], loss.item(), rtol=rtol, atol=atol,
                               err_msg="loss")
    for p in params:
        expected = tensors[p].grad.numpy()
        assert grads[p].shape == expected.shape, (p, grads[p].shape, expected.shape)
        np.testing.assert_allclose(grads[p], expected, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of '{p}'")
