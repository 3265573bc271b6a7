"""ONNX translations for torch ops that the TorchScript exporter refuses at our opset.

``torch.onnx.export(dynamo=False)`` at opset 17 has no translation for a few ops that small
modern models use: ``nn.RMSNorm`` / ``F.rms_norm`` (LLaMA-style blocks; ONNX has no RMS op below
opset 23) and ``nn.Threshold`` / ``F.threshold``. Rather than asking the user to rewrite the
model, the exporter translates them into standard opset-17 ops that the autodiff
(export/autodiff.py) already differentiates:

- ``rms_norm(x, shape, w, eps)`` -> ``x / Sqrt(ReduceMean(x*x, last axes) + eps) * w`` (eps
  None: the float32 machine epsilon, as torch does);
- ``threshold(x, t, v)`` -> ``Where(x > t, x, v)``;
- ``softplus(x, beta, threshold)`` -> ``Where(beta x > threshold, x, Softplus(beta x) / beta)``
  (torch's exporter has one, but it drops the threshold).

The graphs then compute what torch computes (a test compares outputs and gradients). The
registration is global to the exporting process and idempotent; the device side never imports
this module.
"""

from __future__ import annotations

__all__ = ["refuse_unreproducible", "register"]

_done = False


def register() -> None:
    """Register the translations with torch's TorchScript exporter (once per process)."""
    global _done
    if _done:
        return
    import torch
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx import symbolic_helper as sh

    def const(g, value: float):
        return g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))

    def rms_norm(g, x, normalized_shape, weight, eps):
        # only how many trailing axes it names counts (a shape read from x.shape is traced)
        dims = (sh._unpack_list(normalized_shape) if sh._is_packed_list(normalized_shape)
                else sh._get_const(normalized_shape, "is", "normalized_shape"))
        e = (torch.finfo(torch.float32).eps if sh._is_none(eps)
             else float(sh._get_const(eps, "f", "eps")))
        mean_sq = g.op("ReduceMean", g.op("Mul", x, x), axes_i=list(range(-len(dims), 0)),
                       keepdims_i=1)
        y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_sq, const(g, e))))
        return y if sh._is_none(weight) else g.op("Mul", y, weight)

    def threshold(g, x, limit, value):
        t = float(sh._get_const(limit, "f", "threshold"))
        v = float(sh._get_const(value, "f", "value"))
        return g.op("Where", g.op("Greater", x, const(g, t)), x, const(g, v))

    def softplus(g, x, beta, threshold):
        # torch's own translation writes Softplus(beta x) / beta and drops the threshold above
        # which torch is linear (beta 2, threshold 3: 9e-3 apart, gradients 2e-2, session 22)
        b = float(sh._get_const(beta, "f", "beta"))
        t = float(sh._get_const(threshold, "f", "threshold"))
        bx = x if b == 1.0 else g.op("Mul", x, const(g, b))
        soft = g.op("Softplus", bx)
        soft = soft if b == 1.0 else g.op("Div", soft, const(g, b))
        return g.op("Where", g.op("Greater", bx, const(g, t)), x, soft)

    for name, fn in (("aten::rms_norm", rms_norm), ("aten::threshold", threshold),
                     ("aten::softplus", softplus)):
        register_custom_op_symbolic(name, fn, 17)
    _done = True


def refuse_unreproducible(name: str, mod) -> None:
    """Refuse a torch module whose training the exported graphs would silently not reproduce:
    nn.Embedding with ``scale_grad_by_freq`` (only torch's gradient divides each row by how
    often the batch looks it up) or ``max_norm`` (its forward renormalises the looked-up rows in
    place; tracing did so to the weights once, and the graph does not).

    Raises:
        ExportError: such a module.
    """
    import torch

    from .graph import ExportError

    if not isinstance(mod, torch.nn.Embedding) or not (mod.scale_grad_by_freq
                                                       or mod.max_norm is not None):
        return
    what = ("scale_grad_by_freq=True (its gradient divides each row by how often the batch "
            "looks it up)" if mod.scale_grad_by_freq else
            f"max_norm={mod.max_norm} (its forward renormalises the rows it looks up, in place)")
    raise ExportError(f"module '{name}' is an nn.Embedding with {what}, which the exported "
                      "graphs do not reproduce: training would silently differ from torch's; "
                      "build it without that option (or renormalise the table yourself between "
                      "runs)")
