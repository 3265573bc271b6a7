"""The budget contract on the token-MLP workload, measured from outside: one table.

token-mlp (width 512, 4 layers, 128 tokens of 64 features), batch 128, 10 AdamW steps, INSTANT,
calibration on 2 batches: exact training without a budget, then ``--budget`` 256/220/200 MB,
then 100 MB (refused up front with a stated minimum) and that minimum. Each run is its own
process; its peak is the highest ``VmHWM`` polled from this process while it ran.

    python -m benchmarks.budget_table
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
BATCH = 128


def _train(bundle: Path, data: Path, out: Path, *extra: str):
    from runtime.memory import run_measured

    argv = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", str(data),
            "--batch", str(BATCH), "--steps", "10", "--lr", "3e-3", "--calib-batches", "2",
            "--threads", "2", "--no-progress", "--out", str(out), *extra]
    r = run_measured(argv, timeout=900, cwd=ROOT)
    s = json.loads((out / "summary.json").read_text()) if r.returncode == 0 else None
    return r, s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="256,220,200", help="MB, comma-separated")
    ap.add_argument("--impossible", type=int, default=100, help="a budget below the minimum, MB")
    args = ap.parse_args(argv)
    from benchmarks.seqdata import make_sequences
    from export import export_bundle

    rows = []
    with tempfile.TemporaryDirectory(prefix="budget-table-") as tmp:
        root = Path(tmp)
        bundle = export_bundle("token-mlp", root / "token-mlp")
        x, y = make_sequences(3 * BATCH)
        xt, yt = make_sequences(BATCH, seed=1)
        data = root / "seq.npz"
        np.savez(data, x=x, y=y, x_test=xt, y_test=yt)

        def row(label: str, *extra: str) -> str | None:
            out = root / f"run{len(rows)}"
            r, s = _train(bundle, data, out, *extra)
            if r.returncode != 0:
                err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "?"
                rows.append((label, "-", "-", f"{r.peak_polled / MB:.1f}", "-", err))
                return err
            rows.append((label, str(s["micro_batch"]),
                         f"{s['predicted_peak'] / MB:.1f}" if s.get("predicted_peak") else "-",
                         f"{r.peak_polled / MB:.1f}", f"{s['peak_rss'] / MB:.1f}",
                         f"loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}"
                         + (f", {'within' if r.peak_polled <= s['budget'] else 'OVER'} budget"
                            if s.get("budget") else "")))
            return None

        row("vanilla, no budget", "--mode", "vanilla")
        row("INSTANT, no budget")
        for b in args.budgets.split(","):
            row(f"INSTANT, --budget {b}MB", "--budget", f"{b}MB")
        err = row(f"INSTANT, --budget {args.impossible}MB", "--budget", f"{args.impossible}MB")
        m = re.search(r"(?:at least|--budget to|e\.g\. to) (\d+)MB", err or "")
        if m:
            row(f"INSTANT, --budget {m[1]}MB (the stated way out)", "--budget", f"{m[1]}MB")
        # `plan` without --budget estimates the smallest budget (its probes are unlimited)
        p = subprocess.run([sys.executable, "-m", "runtime", "plan", str(bundle), "--data",
                            str(data), "--batch", str(BATCH), "--calib-batches", "2", "--threads",
                            "2"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                           check=False)
        m = re.search(r"smallest --budget for this run \(.*?\): about (\d+)MB", p.stdout)
        if m:
            row(f"INSTANT, --budget {m[1]}MB (`plan`'s smallest budget)", "--budget", f"{m[1]}MB")

    print("command: python -m benchmarks.budget_table" + (" " + " ".join(argv or sys.argv[1:])
                                                           if (argv or sys.argv[1:]) else ""))
    print("| run | micro-batch | predicted MB | peak polled from outside MB | runtime's own "
          "report MB | result |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
