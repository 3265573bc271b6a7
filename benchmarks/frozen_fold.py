"""Frozen batch norms folded at export: whole-process memory of INSTANT and vanilla, from outside.

The built-in EfficientNet-Lite0 (``--trainable last:3``) at 224 px on 64 MNIST 5k digits (an
.npz without a held-out split, so no evaluation sets a peak), exported twice:
as the exporter writes it (frozen Conv -> BatchNormalization pairs folded into the convs,
``export/fold_frozen.py``) and with that fold switched off (before: onnxruntime then fuses
each pair again in every session, a copy of the frozen conv weights per session). Each bundle
trains in each mode under the Raspberry Pi Zero 2 W's budget (``--profile rpi-zero-2w``), and
then without a budget at a fixed micro-batch; every run is its own process, its peak the
highest ``VmHWM`` polled from this process (``runtime.memory.run_measured``).

    python -m benchmarks.frozen_fold                  # ~10 min on 2 cores
    python -m benchmarks.frozen_fold --size 128 --steps 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000


def _export(out: Path, size: int, fold: bool) -> Path:
    import export.bundle as eb
    from export import export_bundle

    keep = eb.fold_frozen_batchnorm
    if not fold:
        eb.fold_frozen_batchnorm = lambda model: 0
    try:
        return export_bundle("efficientnet-lite0", out, input_shape=f"1,3,{size},{size}",
                             trainable="last:3")
    finally:
        eb.fold_frozen_batchnorm = keep


def _train(bundle: Path, data: Path, out: Path, steps: int, *extra: str
           ) -> tuple[list[str], object, dict]:
    from runtime.memory import run_measured

    argv = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", str(data),
            "--batch", "16", "--steps", str(steps), "--threads", "2", "--no-progress",
            "--out", str(out), *extra]
    r = run_measured(argv, timeout=1800, cwd=ROOT)
    s = json.loads((out / "summary.json").read_text()) if r.returncode == 0 else {}
    return argv, r, s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224, help="input pixels (square)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4, help="for the runs without a budget")
    args = ap.parse_args(argv)
    from benchmarks.real_models import subset_npz

    rows = []
    with tempfile.TemporaryDirectory(prefix="frozen-fold-") as tmp:
        root = Path(tmp)
        for fold in (False, True):
            bundle = _export(root / f"b{int(fold)}", args.size, fold)
            data = subset_npz(bundle, "mnist5k", 64, 0, root / f"digits{int(fold)}.npz")
            for extra in (("--profile", "rpi-zero-2w"), ("--micro-batch", str(args.micro_batch))):
                for mode in ("vanilla", "instant"):
                    out = root / f"run{len(rows)}"
                    cmd, r, s = _train(bundle, data, out, args.steps, "--mode", mode, *extra)
                    err = "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append(("folded" if fold else "not folded (before)", mode,
                                 " ".join(extra), s.get("micro_batch", "-"),
                                 f"{r.peak_polled / MB:.1f}",
                                 f"{s['budget'] / MB:.0f}" if s.get("budget") else "-",
                                 f"{s['median_step_s'] * 1e3:.0f}" if s.get("median_step_s")
                                 else "-", err[:160]))
                    print(" | ".join(map(str, rows[-1])), flush=True)
    print("\n| bundle | mode | options | micro-batch | peak MB (polled) | budget MB | "
          "median step ms | error |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\ncommand: python -m benchmarks.frozen_fold {shlex.join(argv or sys.argv[1:])}".rstrip()
          + f"; each run: {shlex.join(['python', '-m', 'runtime', 'train', 'BUNDLE'] + cmd[5:])}"
          .replace(str(root), "TMP"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
