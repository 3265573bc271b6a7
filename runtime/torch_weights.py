"""The trainable weights of ``export-model`` as torch reads them: ``OUT.safetensors`` under
the tensors' torch names, in torch layout (transposed back, reshaped) where the bundle records
it, and the tensors it cannot give in torch's layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .bundle import Bundle

__all__ = ["packed_recurrent", "torch_state", "write_safetensors"]

_PACKED = re.compile(r"(^|\.)(GRU|LSTM)(_\d+)?\.[WRBP]$")


def torch_state(b: Bundle, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trainable parameters under their torch names, in torch layout."""
    state: dict[str, np.ndarray] = {}
    for p in b.params:
        v = params[p.name]
        if p.transposed:
            v = v.T
        if p.torch_shape:
            v = v.reshape(p.torch_shape)
        state.setdefault(p.torch_name or p.name, np.ascontiguousarray(v, np.float32))
    return state


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
    """The keys of the trainable tensors of a GRU / LSTM layer: the exporter trains them in
    ONNX's layout (export/recurrent.py: ``<module>.GRU.W``, ``.R``, ``.B``, the directions
    stacked, the gates in ONNX's order), not as torch's ``weight_ih_l0`` & co. A session-28
    probe loaded such a file with ``load_state_dict(strict=False)``: every GRU weight was
    skipped without a word, and the module's outputs differed from the exported model's by
    0.51."""
    keys = [p.torch_name or p.name for p in b.params]
    return [k for k in keys if _PACKED.search(k)]
