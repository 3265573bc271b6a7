"""Backward pass ``broadcast_expand``: ``Mul(Expand(s, shape(Y)), M)`` -> ``Mul(s, M)`` when M
provably has Y's shape (so the broadcast gives the same result).

Where it fires: the backward of a mean-pool (or sum, or global average pool) meets an
elementwise mask, e.g. ``ReLU`` before ``mean(dim=1)``: the pooled gradient [N, 1, C] was expanded
to [N, L, C] only to be multiplied by the [N, L, C] mask. onnxruntime runs no elementwise op in
place, so the Expand was a full-size buffer alive next to the mask and the product. Measured on
the token-MLP benchmark (batch 256 x 128 x 512): part of the INSTANT peak drop 235 -> 186 MB
above idle together with ``half_batch_mask`` (README).
"""

from __future__ import annotations

from ..autodiff import Draft
from .shapes import same_shape, shape_owner

__all__ = ["broadcast_expand"]


def broadcast_expand(d: Draft) -> None:
    producers = d.bwd_producers()  # (kept current: the pass only removes Expands)
    for mul in list(d.bwd.nodes):
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for k in (0, 1):
            e = producers.get(mul.input[k])
            if e is None or e.op_type != "Expand" or e.output[0] in d.protected:
                continue
            if len(d.bwd_consumers(e.output[0])) != 1:
                continue
            owner = shape_owner(d, e.input[1])
            if owner is None or not same_shape(d, mul.input[1 - k], owner):
                continue
            mul.input[k] = e.input[0]
            d.bwd.nodes.remove(e)
            del producers[e.output[0]]
            break
