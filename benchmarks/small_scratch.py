"""Small models trained from scratch: INSTANT's default ranks against exact training.

A keyword-spotting style DS-CNN (a 3x3 stem, two depthwise-separable blocks with 32-wide 1x1
convs, BatchNorm, global pooling; the kind of model a microcontroller or a Pi trains), written
here as a model file and exported with the project's exporter, trained from scratch on the
built-in real data (28x28 MNIST 5k, 1,000 held out; or sklearn's 8x8 digits) in three ways, each seed its own
process with memory polled from outside (``runtime.memory.run_measured``):

* ``vanilla``: exact training;
* ``instant`` at the defaults: these layers' exact backward is below the FLOP cap's threshold
  (``flop_cap_min``, 1e8 FLOPs a micro-batch), so their ranks start at exact (``runtime/
  ranks.py: starts_exact``) and only a budget's memory lowers them;
* ``instant --variance 0.99``: the variance rule those layers had before session 37 (ranks
  keeping 99 % of each tensor's variance, at least a quarter of the directions).

Each seed exports its own initial weights (``torch.manual_seed(seed)``) and trains them in every
mode with the same batch order and steps; the table gives each mode's held-out accuracy per seed,
its mean and its gap to vanilla's mean.

    python -m benchmarks.small_scratch                       # MNIST 5k, 600 steps: ~4 min
    python -m benchmarks.small_scratch --data digits --size 8
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000

DSCNN = """
import torch.nn as nn


def make_model():
    def block(c):
        return [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(nn.Conv2d(1, {width}, 3, padding=1, stride={stride}),
                         nn.BatchNorm2d({width}), nn.ReLU(), *block({width}), *block({width}),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear({width}, 10))
"""

MODES = {"vanilla": ["--mode", "vanilla"], "instant (defaults)": ["--mode", "instant"],
         "instant --variance 0.99": ["--mode", "instant", "--variance", "0.99"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="mnist5k", help="built-in data set (mnist5k or digits)")
    ap.add_argument("--size", type=int, default=28, help="input pixels (square)")
    ap.add_argument("--width", type=int, default=32, help="channels of the 1x1 convs")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", default="0.003", help="AdamW learning rate (default 0.003 here; the CLI's own default is 1e-3)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from export import export_bundle
    from runtime.memory import run_measured

    acc: dict[str, list[float]] = {m: [] for m in MODES}
    info: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="small-scratch-") as tmp:
        root = Path(tmp)
        (root / "net.py").write_text(DSCNN.format(width=args.width,
                                                  stride=2 if args.size > 16 else 1))
        for seed in range(args.seeds):
            # each seed its own initial weights (seeded: the same figures on every invocation;
            # session 38: an unseeded export gave each invocation other weights, and the width-64
            # table moved by 3.6 points between two of them), trained in every mode
            torch.manual_seed(seed)
            bundle = export_bundle(f"{root / 'net.py'}:make_model", root / f"b{seed}",
                                   input_shape=f"{args.batch},1,{args.size},{args.size}")
            for mode, flags in MODES.items():
                out = root / f"run-{seed}-{flags[-1]}"
                cmd = [sys.executable, "-m", "runtime", "train", str(bundle), "--data",
                       args.data, "--steps", str(args.steps), "--batch", str(args.batch),
                       "--lr", args.lr,
                       "--seed", str(seed), "--threads", "1", "--no-progress", "--out", str(out),
                       *flags]
                r = run_measured(cmd, timeout=3600, cwd=ROOT)
                if r.returncode:
                    print(f"{mode} seed {seed}: exit {r.returncode}: "
                          f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
                    return 1
                s = json.loads((out / "summary.json").read_text())
                acc[mode].append(s["test_acc"])
                ratio = next((ln.split("= ")[-1] for ln in r.stdout.splitlines()
                              if "saved-activation ratio" in ln), "-")
                info[mode] = (s.get("ranks"), ratio, r.peak_polled)
                print(f"{mode} seed {seed}: held-out {s['test_acc']:.3f}, saved-activation ratio "
                      f"{ratio}, peak {r.peak_polled / MB:.1f} MB (polled)", flush=True)
    base = float(np.mean(acc["vanilla"]))
    print("\n| mode | held-out accuracy per seed | mean | vs vanilla | ranks (Rx, Ry) | "
          "saved-activation ratio | peak MB (polled) |")
    print("|---|---|---:|---:|---|---:|---:|")
    for mode, vals in acc.items():
        ranks, ratio, peak = info[mode]
        print(f"| {mode} | {', '.join(f'{v:.3f}' for v in vals)} | {np.mean(vals):.3f} | "
              f"{(np.mean(vals) - base) * 100:+.1f} | {ranks if mode != 'vanilla' else '-'} | "
              f"{ratio} | {peak / MB:.1f} |")
    print(f"\ncommand: python -m benchmarks.small_scratch {shlex.join(argv or sys.argv[1:])}"
          .rstrip() + f"; each run: python -m runtime train BUNDLE --data {args.data} --steps "
          f"{args.steps} --batch {args.batch} --lr {args.lr} --seed SEED --threads 1 [MODE FLAGS]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
