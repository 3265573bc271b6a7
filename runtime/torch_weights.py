"""The trainable weights of ``export-model`` as torch reads them: ``OUT.safetensors`` under
the tensors' torch names, in torch layout (transposed back, reshaped) where the bundle records
it, a torch GRU / LSTM's packed tensors split back into ``weight_ih_l0`` & co., and the tensors
it cannot give in torch's layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .bundle import Bundle

__all__ = ["packed_recurrent", "torch_state", "write_safetensors"]

_PACKED = re.compile(r"(^|\.)(GRU|LSTM)(_\d+)?\.[WRBP]$")
_PART = re.compile(r"^(?P<path>(?:.*\.)?)(?P<op>GRU|LSTM)(?:_(?P<layer>\d+))?\.(?P<role>[WRB])$")
# torch's gate blocks, as positions in ONNX's order (GRU: z r h -> r z n; LSTM: i o f c -> i f g o)
_TORCH_GATES = {"GRU": (1, 0, 2), "LSTM": (0, 2, 3, 1)}


def torch_state(b: Bundle, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trainable parameters under their torch names, in torch layout."""
    state: dict[str, np.ndarray] = {}
    for p in b.params:
        v = params[p.name]
        if p.transposed:
            v = v.T
        if p.torch_shape:
            v = v.reshape(p.torch_shape)
        key = p.torch_name or p.name
        parts = _torch_recurrent(key, v) if p.torch_name else None
        for k, part in (parts or {key: v}).items():
            state.setdefault(k, np.ascontiguousarray(part, np.float32))
    return state


def _torch_recurrent(key: str, v: np.ndarray) -> dict[str, np.ndarray] | None:
    """A torch GRU / LSTM layer's packed tensor (``rnn.GRU_1.W``: layer 1, named so by the
    exporter, export/recurrent.py) as torch's own tensors: ``W`` ``[D, G·H, I]`` ->
    ``rnn.weight_ih_l1`` (and ``..._reverse`` for the second direction), ``R`` ->
    ``weight_hh``, ``B`` ``[D, 2·G·H]`` -> ``bias_ih`` + ``bias_hh``, the gate blocks in torch's
    order. None where ``key`` is not such a tensor or its shape is not one torch gives (the
    key then stays packed, and export-model names it)."""
    layout = _layout(key, v.shape)
    if layout is None:
        return None
    stem, layer, pieces, gates = layout
    rows = v.shape[1] // len(pieces)
    out = {}
    for d in range(v.shape[0]):
        for i, piece in enumerate(pieces):
            block = v[d, i * rows:(i + 1) * rows].reshape(len(gates), -1, *v.shape[2:])
            out[f"{stem}{piece}_l{layer}{'_reverse' if d else ''}"] = \
                np.concatenate([block[g] for g in gates])
    return out


def _layout(key: str, shape: tuple[int, ...]):
    """(module path with its dot, layer, torch's tensor kinds, gate order) of a packed
    recurrent tensor of ``shape`` named ``key``; None where it is not one torch's layer gives."""
    m = _PART.match(key)
    if m is None or len(shape) not in (2, 3) or shape[0] not in (1, 2):
        return None
    gates = _TORCH_GATES[m["op"]]
    pieces = ("bias_ih", "bias_hh") if m["role"] == "B" else \
        (("weight_ih", "weight_hh")[m["role"] == "R"],)
    if (m["role"] == "B") != (len(shape) == 2) or shape[1] % (len(pieces) * len(gates)):
        return None
    return m["path"], int(m["layer"] or 0), pieces, gates


def write_safetensors(b: Bundle, params: dict[str, np.ndarray], path: Path) -> bool:
    """``torch_state`` written to ``path``; False where ``safetensors`` is not installed."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        return False
    save_file(torch_state(b, params), str(path),
              metadata={"producer": "instant-runtime export-model"})
    umask = os.umask(0o022)  # safetensors writes 0600; give it the .onnx file's mode
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return True


def packed_recurrent(b: Bundle) -> list[str]:
    """The keys of a GRU / LSTM layer's trainable tensors that stay in ONNX's layout in
    ``torch_state`` (the exporter trains them as ``<module>.GRU.W``, ``.R``, ``.B``, ``.P``,
    export/recurrent.py): peepholes (``P``, which torch's layers do not have), and any whose
    shape is not one torch's layer gives. A session-28 probe loaded such a file with
    ``load_state_dict(strict=False)``: every GRU weight was skipped without a word, and the
    module's outputs differed from the exported model's by 0.51; torch's own layers' tensors
    are given in torch's names and layout since session 29."""
    packed = []
    for p in b.params:
        key = p.torch_name or p.name
        shape = tuple(p.torch_shape or (p.shape[::-1] if p.transposed else p.shape))
        if _PACKED.search(key) and not (p.torch_name and _layout(key, shape)):
            packed.append(key)
    return packed
