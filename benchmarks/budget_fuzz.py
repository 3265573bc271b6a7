"""Budget fuzzing: random workloads, each trained in its own process under a random budget
between the stated minimum and the exact (vanilla, unplanned) peak; the peak is read from
outside: the larger of the process's VmHWM and the summed PSS of it and its planning probes (a
page the fork shares counted once: what a container's limit charges). A run either stays within its budget or is refused up front with a minimum that then
works.

    python -m benchmarks.budget_fuzz --workloads 50 --seed 0      # the README figures
    python -m benchmarks.budget_fuzz --workloads 3 --seed 1       # what `make test` runs

Workloads draw: the model (a token MLP of random width, depth and sequence length, or a CNN with
1x1 convolutions at a random image size), the batch, the dataset size, instant or vanilla, the
calibration frequency, evaluation on or off, and checkpoints on or off.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class TokenMLP(nn.Module):
        def __init__(self, d_in, width, depth, classes):
            super().__init__()
            layers = []
            for i in range(depth):
                layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=1))

    class ConvNet(nn.Module):
        def __init__(self, channels, classes):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                nn.Conv2d(channels, 2 * channels, 1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(2 * channels, 2 * channels, 1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(2 * channels, classes)

        def forward(self, x):
            return self.head(self.body(x))
''')


@dataclass
class Workload:
    index: int
    kind: str  # "token-mlp" | "cnn"
    width: int
    depth: int
    tokens: int  # sequence length, or image side
    d_in: int
    batch: int
    samples: int
    mode: str
    calib_every: int
    eval_on: bool
    checkpoints: bool
    saved_int8: bool = False  # exported with --saved-int8 (x̂ and other saved tensors in int8)

    def factory(self) -> str:
        if self.kind == "token-mlp":
            return f"TokenMLP({self.d_in}, {self.width}, {self.depth}, 10)"
        return f"ConvNet({self.width}, 10)"

    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "token-mlp":
            return (4, self.tokens, self.d_in)
        return (4, 1, self.tokens, self.tokens)


def draw(rng: np.random.Generator, index: int) -> Workload:
    kind = str(rng.choice(["token-mlp", "cnn"], p=[0.7, 0.3]))
    if kind == "token-mlp":
        width = int(rng.choice([64, 128, 256, 384, 512]))
        depth = int(rng.integers(1, 5))
        tokens = int(rng.choice([16, 32, 64, 128]))
        d_in = int(rng.choice([16, 32, 64]))
    else:
        width = int(rng.choice([8, 16, 32]))
        depth = 3
        tokens = int(rng.choice([16, 32, 48, 64]))
        d_in = 1
    w = Workload(index, kind, width, depth, tokens, d_in,
                 batch=int(rng.choice([16, 32, 64, 128])),
                 samples=int(rng.choice([64, 200, 600])),
                 mode=str(rng.choice(["instant", "vanilla"], p=[0.7, 0.3])),
                 calib_every=int(rng.choice([0, 2, 5])), eval_on=bool(rng.random() < 0.5),
                 checkpoints=bool(rng.random() < 0.5))
    w.saved_int8 = w.mode == "instant" and bool(rng.random() < 0.4)  # drawn last: earlier fields
    return w                                                           # keep their old draws


def _prepare(w: Workload, root: Path) -> tuple[Path, Path]:
    from export import export_bundle

    models = root / "models.py"
    models.write_text(MODELS + f"\n\ndef make():\n    torch.manual_seed({w.index})\n"
                      f"    return {w.factory()}\n")
    shape = ",".join(map(str, w.input_shape()))
    bundle = export_bundle(f"{models}:make", root / "bundle", input_shape=shape,
                           saved_int8=w.saved_int8)
    rng = np.random.default_rng(w.index)
    n_test = 32 if w.eval_on else 0
    x = rng.standard_normal((w.samples + n_test, *w.input_shape()[1:])).astype(np.float32)
    y = rng.integers(0, 10, w.samples + n_test)
    data = root / "data.npz"
    arrays = {"x": x[:w.samples], "y": y[:w.samples]}
    if n_test:
        arrays.update(x_test=x[w.samples:], y_test=y[w.samples:])
    np.savez(data, **arrays)
    return bundle, data


def _train(bundle: Path, data: Path, w: Workload, out: Path, budget: int | None,
           mode: str) -> tuple[int, int, str]:
    from runtime.memory import run_measured

    argv = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", str(data),
            "--steps", "6", "--batch", str(w.batch), "--mode", mode, "--threads", "2",
            "--calib-every", str(w.calib_every), "--calib-batches", "2", "--no-progress",
            "--out", str(out), "--overwrite",
            "--checkpoint-every", "2" if w.checkpoints else "0"]
    if w.eval_on:
        argv += ["--eval-every", "3"]
    if budget is not None:
        argv += ["--budget", f"{budget // 1000}kB"]
    # the process's VmHWM, or its tree's summed PSS with the planning probes, the larger
    r = run_measured(argv, timeout=900, cwd=ROOT, tree=True)
    return r.returncode, max(r.peak_polled, r.peak_tree), r.stderr + r.stdout


def _planned_minimum(bundle: Path, data: Path, w: Workload) -> int | None:
    """``plan`` without --budget states the smallest budget for the run (probes unlimited)."""
    argv = [sys.executable, "-m", "runtime", "plan", str(bundle), "--data", str(data),
            "--batch", str(w.batch), "--mode", w.mode, "--threads", "2",
            "--calib-every", str(w.calib_every), "--calib-batches", "2"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    m = re.search(r"smallest --budget for this run \(.*?\): about (\d+)MB", r.stdout)
    return int(m[1]) * MB if m else None


def _stated_minimum(text: str) -> int | None:
    m = re.search(r"raise --budget (?:to at least|to|well above it, e\.g\. to) (\d+)MB", text)
    return int(m[1]) * MB if m else None


def run_one(w: Workload, root: Path) -> dict:
    bundle, data = _prepare(w, root)
    rc, vanilla_peak, text = _train(bundle, data, w, root / "vanilla", None, "vanilla")
    if rc != 0:
        return {**asdict(w), "result": "error", "detail": text[-400:]}
    minimum = _planned_minimum(bundle, data, w)
    if minimum is None:
        return {**asdict(w), "result": "error", "detail": "no stated minimum"}
    rng = np.random.default_rng(1000 + w.index)
    hi = max(vanilla_peak, minimum + 10 * MB)
    budget = int(rng.uniform(minimum, hi))
    rc, peak, text = _train(bundle, data, w, root / "run", budget, w.mode)
    rec = {**asdict(w), "vanilla_peak": vanilla_peak, "minimum": minimum, "budget": budget,
           "peak": peak}
    if rc == 0:
        return {**rec, "result": "over" if peak > budget else "ok"}
    stated = _stated_minimum(text)
    if rc == 2 and stated is not None:
        rc2, peak2, text2 = _train(bundle, data, w, root / "retry", stated, w.mode)
        ok = rc2 == 0 and peak2 <= stated
        return {**rec, "result": "refused-then-ok" if ok else "refused-then-failed",
                "budget": stated, "peak": peak2, "detail": "" if ok else text2[-400:]}
    return {**rec, "result": "error", "detail": text[-400:]}


def fuzz(n: int, seed: int, log=print) -> list[dict]:
    rng = np.random.default_rng(seed)
    results = []
    for i in range(n):
        w = draw(rng, seed * 1000 + i)
        with tempfile.TemporaryDirectory(prefix="budget-fuzz-") as tmp:
            t0 = time.time()
            rec = run_one(w, Path(tmp))
        rec["seconds"] = round(time.time() - t0, 1)
        results.append(rec)
        ratio = rec["peak"] / rec["budget"] if rec.get("budget") else float("nan")
        log(f"[{i + 1}/{n}] {w.kind} w{w.width} d{w.depth} L{w.tokens} batch {w.batch} "
            f"{w.mode}{' int8' if w.saved_int8 else ''}: {rec['result']}, peak/budget {ratio:.3f}"
            + (f" ({rec.get('detail', '')[-200:]})" if rec["result"] not in
               ("ok", "refused-then-ok") else ""))
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    a = ap.parse_args()
    t0 = time.time()
    res = fuzz(a.workloads, a.seed)
    over = [r for r in res if r["result"] in ("over", "refused-then-failed", "error")]
    ratios = [r["peak"] / r["budget"] for r in res if r.get("budget")]
    print(f"command: python -m benchmarks.budget_fuzz --workloads {a.workloads} --seed {a.seed}")
    print(f"runs {len(res)}, within budget {sum(r['result'] == 'ok' for r in res)}, refused up "
          f"front then ok at the stated minimum {sum(r['result'] == 'refused-then-ok' for r in res)}"
          f", over budget or failed {len(over)}; max peak/budget {max(ratios):.3f}, median "
          f"{float(np.median(ratios)):.3f}; {time.time() - t0:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
