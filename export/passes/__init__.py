"""Graph rewrites that run around the gradient rules, in this order (see each module's docstring
for what it rewrites, why, and the measured saving; ``tests/test_gradients.py`` checks every
rule with and without them, ``tests/test_training.py`` that INSTANT at full rank equals exact
training through them):

1. ``gelu_fusion`` (hint, before differentiation): torch's five-op erf GELU differentiated as one.
2. ``broadcast_expand``: an expanded pooled gradient times a mask -> the mask times the pooled
   gradient (broadcast, no full-size Expand).
3. ``mask_bits``: boolean masks (ReLU, ReLU6) computed in the forward and saved as bits.
4. ``half_batch_mask``: a masked INSTANT input gradient (a MatMul, or the ``If`` choosing the
   exact or compressed product) computed per half-batch.
5. ``concat_pushdown``: the half-batch results feed separable consumers without a full Concat.
6. ``empty_half``: a basis times a batch-major tensor also runs on the empty half of a
   micro-batch of 1 (onnxruntime up to 1.31 refused it).
"""

from __future__ import annotations

from ..autodiff import Pass
from .broadcast_expand import broadcast_expand
from .concat_pushdown import concat_pushdown
from .empty_half import empty_half
from .gelu_fusion import fuse_gelu
from .half_batch_mask import half_batch_mask
from .mask_bits import mask_bits

__all__ = ["PASSES", "by_name"]

PASSES: tuple[Pass, ...] = (
    Pass("gelu_fusion", "hint", fuse_gelu),
    Pass("broadcast_expand", "backward", broadcast_expand),
    Pass("mask_bits", "backward", mask_bits),
    Pass("half_batch_mask", "backward", half_batch_mask),
    Pass("concat_pushdown", "backward", concat_pushdown),
    Pass("empty_half", "backward", empty_half),
)


def by_name(*names: str) -> tuple[Pass, ...]:
    """The listed passes, in the standard order (unknown names raise)."""
    known = {p.name for p in PASSES}
    bad = sorted(set(names) - known)
    if bad:
        raise ValueError(f"unknown pass(es) {bad}; passes: {sorted(known)}")
    return tuple(p for p in PASSES if p.name in names)
