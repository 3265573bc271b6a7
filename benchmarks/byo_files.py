"""Write stand-ins for a user's own files: an ONNX text encoder from another exporter and CSVs.

Workstation side (needs torch). The README's "Fine-tune your own model on your own data" starts
from what a user brings; here that is made from packages that work offline:

* ``OUT/encoder.onnx``: the pretrained MiniLM-L6 encoder exported by torch's TorchScript
  exporter (not ours), shaped like a sentence-transformers export: anonymous weights
  (``onnx::MatMul_…``), int64 ``input_ids``/``attention_mask``, four outputs
  (``token_embeddings``, ``sentence_embedding``, ``cls``, ``normalized``);
* ``OUT/tokenizer.json``: its tokenizer;
* ``OUT/train.csv`` and ``OUT/val.csv``: Rotten Tomatoes review snippets with columns
  ``review`` and ``verdict`` (``fresh``/``rotten``); the last 1,000 rows are ``val.csv``.

    python -m benchmarks.byo_files --out my-files
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

OUTPUTS = ["token_embeddings", "sentence_embedding", "cls", "normalized"]


def write_encoder(path: Path, seq_len: int = 64) -> None:
    """The pretrained MiniLM-L6 encoder as torch's TorchScript exporter writes it."""
    import torch

    from export.models import MiniLMClassifier

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = MiniLMClassifier(pretrained=True)

        def forward(self, input_ids, attention_mask):
            m = self.m
            mask = attention_mask.to(torch.float32)
            bias = ((1.0 - mask) * -1e9)[:, None, None, :]
            x = m.embeddings(input_ids)
            for i in range(m.num_layers):
                x = getattr(m, f"layer{i}")(x, bias)
            pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            return x, pooled, x[:, 0], pooled / pooled.norm(dim=-1, keepdim=True)

    ids = torch.ones(2, seq_len, dtype=torch.int64)
    torch.onnx.export(Encoder().eval(), (ids, ids), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=OUTPUTS,
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                    "attention_mask": {0: "batch", 1: "seq"},
                                    "token_embeddings": {0: "batch", 1: "seq"}},
                      do_constant_folding=True)


def write_reviews(path: Path, texts, labels) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        for t, label in zip(texts, labels, strict=True):
            w.writerow([t, "fresh" if label else "rotten"])
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from export.models import minilm_dir
    from runtime.data import rotten_tomatoes

    args.out.mkdir(parents=True, exist_ok=True)
    write_encoder(args.out / "encoder.onnx")
    shutil.copyfile(minilm_dir() / "tokenizer.json", args.out / "tokenizer.json")
    texts, y, n_val = rotten_tomatoes()
    write_reviews(args.out / "train.csv", texts[:-n_val], y[:-n_val])
    write_reviews(args.out / "val.csv", texts[-n_val:], y[-n_val:])
    print(f"wrote {args.out}/encoder.onnx, tokenizer.json, train.csv ({len(y) - n_val} rows), "
          f"val.csv ({n_val} rows)")


if __name__ == "__main__":
    main()
