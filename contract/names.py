"""Names of the graph tensors and files that exporter and runtime both rely on.

The graphs of a bundle are standard ONNX; these are the few tensor names with a meaning beyond
the graph itself (what the runtime feeds, binds or reads back), and the bundle's fixed files.
"""

from __future__ import annotations

__all__ = [
    "GRAD",
    "GRAD_ACC",
    "GRAM_G",
    "GRAM_X",
    "INFER",
    "LABELS",
    "LOSS",
    "LOSS_SCALE",
    "MANIFEST_FILE",
    "MODES",
    "PARAMS_FILE",
    "PREFIX",
    "TRAINING_MODES",
    "WEIGHTS_FILE",
    "basis_p",
    "basis_q",
]

LOSS = "loss"  # forward output: the scalar mean loss of the micro-batch
LABELS = "labels"  # forward input: class ids (int64 [N]) or regression targets (float)
IGNORE_LABEL = -100  # a class id per token ([N, L] labels): this one adds no loss (padding)
LOSS_SCALE = "loss_scale"  # backward input: the seed dL/dloss (the micro-batch's share)
GRAD_ACC = "grad_acc."  # backward inputs grad_acc.<param>: the gradient accumulated so far
GRAD = "grad."  # backward outputs grad.<param> = grad_acc.<param> + this micro-batch's gradient
GRAM_X = "gram_x."  # calib forward outputs gram_x.<layer>: Σ_b X_b X_bᵀ of the layer input
GRAM_G = "gram_g."  # calib backward outputs gram_g.<layer>: Σ_b G_b G_bᵀ of its output gradient

TRAINING_MODES = ("vanilla", "instant")
MODES = ("vanilla", "instant", "calib", "recal")  # forward + backward graph pairs
INFER = "infer"  # forward-only graph: model inputs -> the declared output
PREFIX = "prefix"  # forward-only graph: model inputs -> what the training graphs take from the
# frozen part of the model (manifest ``prefix``; export/prefix.py)

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"  # frozen weights (raw, page-aligned), read by offset
PARAMS_FILE = "params.npz"  # initial values of the trainable parameters


def basis_p(layer: str) -> str:
    """Instant graph input: the activation basis P of ``layer`` ([rank_x, x_dim])."""
    return f"instant.{layer}.P"


def basis_q(layer: str) -> str:
    """Instant graph input: the output-gradient basis Q of ``layer`` ([rank_g, g_dim])."""
    return f"instant.{layer}.Q"
