"""Gradient rules, one small pure function per ONNX op, grouped by kind of op.

A rule receives the gradient-building context, the forward node and the gradients of the node's
outputs (``None`` where an output does not reach the loss) and returns one gradient name (or
``None``) per node input. Rules emit standard ONNX ops only, so the backward runs on plain
onnxruntime; they only *append* nodes, never look at or rewrite what other rules emitted (memory
rewrites are passes: ``export/passes``). Forward tensors a rule reads from the backward become
"saved tensors".

The INSTANT compressed rule for Linear / 1x1 Conv sits beside the exact rule in ``linear.py``.
"""

from __future__ import annotations

from ..autodiff import Registry
from . import activations, conv, elementwise, linear, loss, norm, reduce, shape

__all__ = ["RULE_SETS", "default_registry"]

RULE_SETS = (elementwise.RULES, activations.RULES, shape.RULES, reduce.RULES, linear.RULES,
             conv.RULES, norm.RULES, loss.RULES)


def default_registry() -> Registry:
    """Every rule of this package (a fresh registry: callers may add their own rules to it)."""
    return Registry(RULE_SETS)
