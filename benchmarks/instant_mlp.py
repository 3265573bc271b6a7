"""INSTANT vs vanilla in the same runtime on an activation-heavy workload (issue: INSTANT).

Workload: the built-in ``token-mlp`` (per-token MLP, width 512, 4 hidden layers, sequence 128,
mean-pooled classifier) on synthetic smooth sequences (benchmarks/seqdata.py), batch 256.
Each run is a fresh ``instant-runtime train`` process (torch-free); we read its summary.json:
whole-process peak RSS (VmHWM, calibration and evaluation included), RSS after loading (the
idle baseline) and the median step time (calibration excluded, reported separately).

    python benchmarks/instant_mlp.py [--repeats 3] [--steps 8] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seqdata import make_sequences  # noqa: E402

from contract import read_manifest  # noqa: E402
from runtime.accounting import layer_costs  # noqa: E402


def run(bundle: Path, data: Path, mode: str, steps: int, batch: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", str(data),
           "--steps", str(steps), "--batch", str(batch), "--mode", mode, "--threads", "2",
           "--no-progress", "--overwrite", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--work", default=None, help="folder for the bundle and data (default: tmp)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="instant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "token-mlp"
    if not (bundle / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "runtime", "export", "--model", "token-mlp",
                        "--out", str(bundle)], check=True, stdout=subprocess.DEVNULL)
    data = work / "seq.npz"
    if not data.exists():
        x, y = make_sequences(4 * a.batch)
        xt, yt = make_sequences(a.batch, seed=1)
        np.savez(data, x=x, y=y, x_test=xt, y_test=yt)
    manifest = read_manifest(bundle / "manifest.json")
    res: dict[str, list[dict]] = {"vanilla": [], "instant": []}
    for r in range(a.repeats):
        for mode in res:  # interleaved, so drift on the machine hits both modes alike
            res[mode].append(run(bundle, data, mode, a.steps, a.batch, work / f"{mode}-{r}"))
    print(f"command: python benchmarks/instant_mlp.py --repeats {a.repeats} --steps {a.steps} "
          f"--batch {a.batch}")
    print(f"workload: token-mlp, batch {a.batch} x seq 128 x width 512, {a.steps} steps, "
          f"median of {a.repeats} runs, 2 threads")
    print(f"{'mode':<8} {'idle MB':>8} {'peak MB':>8} {'above idle MB':>14} {'step ms':>8}")
    med = {}
    for mode, runs in res.items():
        idle = statistics.median(s["idle_rss"] for s in runs) / 1e6
        peak = statistics.median(s["peak_rss"] for s in runs) / 1e6
        above = statistics.median((s["peak_rss"] - s["idle_rss"]) for s in runs) / 1e6
        step = statistics.median(s["median_step_s"] for s in runs) * 1e3
        med[mode] = (above, step)
        print(f"{mode:<8} {idle:>8.1f} {peak:>8.1f} {above:>14.1f} {step:>8.1f}")
    ranks = {k: tuple(v) for k, v in res["instant"][-1]["ranks"].items()}
    costs = layer_costs(manifest.instant.layers, ranks)
    flop_ratio = sum(c.instant_flops for c in costs) / sum(c.vanilla_flops for c in costs)
    print(f"peak above idle, instant/vanilla: {med['instant'][0] / med['vanilla'][0]:.2f}")
    print(f"median step time, instant/vanilla: {med['instant'][1] / med['vanilla'][1]:.2f}")
    print(f"analytic backward FLOPs of the compressed layers, instant/vanilla: {flop_ratio:.3f} "
          f"(ranks {ranks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
