"""INSTANT against exact training on the pretrained models, several seeds: held-out accuracy
(mean and spread), the compressed layers' saved-activation bytes and backward FLOPs relative to
exact, step time, calibration time. Each run is its own ``instant-runtime train`` process.

    python -m benchmarks.quality --model minilm-l6 --seeds 0,1,2
    python -m benchmarks.quality --model efficientnet-lite0 --seeds 0,1,2

Configurations are named sets of train options (``--configs`` picks some):
``exact`` (--mode vanilla), ``default`` (the budget rank policy), ``energy-0.99-p7``,
``saved-0.10`` (compressed activations at most 10 % of exact), ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "minilm-l6": {"export": ["--trainable", "last:3"], "data": "rotten-tomatoes",
                  "train": ["--steps", "80", "--batch", "32", "--optimizer", "sgd", "--lr", "0.05"]},
    "efficientnet-lite0": {"export": ["--trainable", "last:4", "--input-shape", "8,3,128,128"],
                           "data": "mnist5k",
                           "train": ["--steps", "100", "--batch", "32", "--lr", "1e-3"]},
}
CONFIGS = {
    "exact": ["--mode", "vanilla"],
    "default": [],
    "energy-0.99-p7": ["--energy", "0.99", "--oversample", "7"],
    "energy-0.95": ["--rank-policy", "energy", "--energy", "0.95", "--oversample", "0"],
    "saved-0.10": ["--saved-ratio", "0.10"],
    "saved-0.20": ["--saved-ratio", "0.20"],
    "saved-0.05": ["--saved-ratio", "0.05"],
    "calib-1": ["--calib-batches", "1"],
    "flop-0.5": ["--flop-ratio", "0.5"],
    "budget-256mb": ["--budget", "256MB"],  # micro-batches: shorter-length graphs run
    "exact-256mb": ["--mode", "vanilla", "--budget", "256MB"],
}
# Configurations that need their own bundle: (export options, train options).
EXPORT_CONFIGS = {
    "int8": (["--saved-int8"], []),
    "int8-saved-0.10": (["--saved-int8"], ["--saved-ratio", "0.10"]),
    "int8-saved-0.20": (["--saved-int8"], ["--saved-ratio", "0.20"]),
    "no-lengths-256mb": (["--lengths", "none"], ["--budget", "256MB"]),
}


def _bundle(work: Path, model: str, export: list[str]) -> Path:
    """The bundle for these export options, exported once (the options are its folder name)."""
    bundle = work / ("bundle" + "".join(export).replace("--", "-"))
    if not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "runtime", "export", "--model", model,
                        "--out", str(bundle), "--overwrite", *export], check=True, cwd=ROOT)
    return bundle


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6", choices=list(MODELS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default="exact,default,energy-0.99-p7,saved-0.10")
    ap.add_argument("--work", default=str(ROOT / "results" / "tmp" / "quality"))
    ap.add_argument("--threads", default="2")
    ap.add_argument("--out", default=None, help="write every run's figures here as JSON")
    ap.add_argument("--steps", type=int, default=None,
                    help="train this many steps instead of the model's default (80 / 100)")
    a = ap.parse_args()
    m = dict(MODELS[a.model])
    if a.steps is not None:
        train = list(m["train"])
        train[train.index("--steps") + 1] = str(a.steps)
        m["train"] = train
    work = Path(a.work) / a.model
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = {}
    for name in a.configs.split(","):
        runs = []
        export, train = EXPORT_CONFIGS.get(name, ([], CONFIGS.get(name)))
        if train is None:
            raise SystemExit(f"unknown configuration {name!r}")
        bundle = _bundle(work, a.model, [*m["export"], *export])
        for seed in seeds:
            out = work / f"{name}-{seed}"
            cmd = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", m["data"],
                   *m["train"], *train, "--seed", str(seed), "--threads", a.threads,
                   "--out", str(out), "--overwrite", "--no-progress", "--checkpoint-every", "0"]
            t0 = time.time()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode:
                print(f"{name} seed {seed}: failed: {r.stderr.strip()[-300:]}", flush=True)
                continue
            s = json.loads((out / "summary.json").read_text())
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("backward FLOP")), "")
            flop = float(line.split("= ")[1].split(";")[0]) if line else 1.0
            saved = float(line.rsplit("= ", 1)[1]) if line else 1.0
            runs.append({"seed": seed, "acc": s["test_acc"], "step_s": s["median_step_s"],
                         "amortised_s": s["amortised_step_s"], "flop": flop,
                         "saved": saved, "calib_s": s["calib_s"], "calibrations": s["calibrations"],
                         "wall_s": time.time() - t0})
            print(f"{name} seed {seed}: acc {s['test_acc']:.3f} flop {flop:.3f} saved {saved:.3f} "
                  f"step {s['median_step_s'] * 1e3:.0f} ms calib {s['calib_s']:.1f} s", flush=True)
        rows[name] = runs
    steps = "" if a.steps is None else f" --steps {a.steps}"
    print(f"\ncommand: python -m benchmarks.quality --model {a.model} --seeds {a.seeds} "
          f"--configs {a.configs}{steps}")
    print(f"| config | held-out acc (mean ± sd, {len(seeds)} seeds) | Δ vs exact, paired by "
          "seed (pts, mean ± sd) | saved bytes vs exact | bwd FLOPs vs exact | median step ms | "
          "amortised step ms (calibration included) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    exact = {r["seed"]: r["acc"] for r in rows.get("exact", [])}
    for name, runs in rows.items():
        if not runs:
            continue
        accs = [r["acc"] for r in runs]
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diffs = [100 * (r["acc"] - exact[r["seed"]]) for r in runs if r["seed"] in exact]
        d = "–" if name == "exact" or not diffs else (
            f"{statistics.mean(diffs):+.1f} ± "
            f"{statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.1f}")
        print(f"| {name} | {mean:.3f} ± {sd:.3f} | {d} | "
              f"{statistics.mean(r['saved'] for r in runs):.3f} | "
              f"{statistics.mean(r['flop'] for r in runs):.3f} | "
              f"{statistics.mean(r['step_s'] for r in runs) * 1e3:.0f} | "
              f"{statistics.mean(r['amortised_s'] for r in runs) * 1e3:.0f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
