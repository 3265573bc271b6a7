"""Speed inside the budget, side by side in one run (the targets of the speed issue).

    python -m benchmarks.speed                 # MiniLM-L6 and the token MLP, ~6 min on 2 cores
    python -m benchmarks.speed --workloads minilm-l6 --steps 20

Every figure comes from a fresh process, measured from outside (peak: VmHWM polled from
another process; CPU: ``wait4``'s user and system time of the training process):

MiniLM-L6 (``last:3`` + head, Rotten Tomatoes, batch 32, SGD 0.05 as ``make demo``):
  * ``pytorch``: eager PyTorch, same model, trainable subset, batch, optimizer and data order,
    every batch padded to the bundle's length as the runtime's training graphs see it; and again
    with each batch padded only to its longest text (what a PyTorch user's collator does; the
    runtime's frozen prefix runs without padding, export/prefix.py);
  * ``forward``: the bundle's inference graph on one batch in plain onnxruntime;
  * ``ours@256MB``: ``instant-runtime train --budget 256MB`` (the demo configuration);
  * ``vanilla@m`` / ``instant@m``: no budget, both at the micro-batch the 256 MB plan chose;
  * the whole batch in one pass (micro-batch 32): vanilla, INSTANT, and INSTANT on a bundle
    exported with ``--saved-int8``: training peak against the forward-only peak.
Token MLP (width 512 × 4, 128 tokens, batch 256, AdamW): vanilla vs INSTANT over a 20-step run,
calibration included (mean step time over every step).

Median step time excludes the first ``--warmup`` steps; "mean" is every step, calibration steps
included (a calibration is a run of exact training steps that also collect Gram matrices).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, cpu_description, dist_version, ensure_bundle, log
from runtime.memory import run_measured

WORK = ROOT / "results" / "tmp" / "speed"
MB = 1e6


def _times(out: Path) -> list[float]:
    s = json.loads((out / "summary.json").read_text())
    with np.load(s["checkpoint"]) as z:
        return z["run/times"].tolist()


def train(bundle: Path, data: str, out: Path, args: list[str], warmup: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", data,
            "--no-progress", "--checkpoint-every", "0", "--seed", "0", "--out", str(out), *args]
    r = run_measured(argv, timeout=1800, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])}: {r.stderr.strip()[-300:]}")
    s = json.loads((out / "summary.json").read_text())
    t = _times(out)
    return {"median_ms": 1e3 * statistics.median(t[warmup:] or t),
            "mean_ms": 1e3 * s["amortised_step_s"], "micro_batch": s["micro_batch"],
            "peak_mb": r.peak_polled / MB, "budget_mb": (s.get("budget") or 0) / MB,
            "sys_share": r.sys_s / max(r.user_s + r.sys_s, 1e-9), "wall_s": r.seconds,
            "calibrations": s.get("calibrations", 0), "calib_steps": s.get("calib_steps", 0),
            "loss_last": s["loss_last"],
            "test_acc": s.get("test_acc"), "cmd": "instant-runtime train " + " ".join(
                [bundle.name, "--data", Path(data).name, *args])}


def peer(module: str, cfg: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    r = run_measured([sys.executable, "-m", f"benchmarks.peers.{module}", str(out / "config.json"),
                      str(out / "result.json")], timeout=1800, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{module}: {r.stderr.strip()[-300:]}")
    res = json.loads((out / "result.json").read_text())
    return {"median_ms": 1e3 * res["median_step_s"], "peak_mb": r.peak_polled / MB}


def minilm(a) -> list[str]:
    from benchmarks.peers.run import package_dirs

    bundle = ensure_bundle("minilm-l6", "last:3", 1800)
    work = WORK / "minilm"
    common = ["--batch", "32", "--steps", str(a.steps), "--optimizer", "sgd", "--lr", "0.05",
              "--threads", str(a.threads)]
    log("[minilm] ours @256MB")
    ours = train(bundle, "rotten-tomatoes", work / "budget", [*common, "--budget", "256MB"],
                 a.warmup)
    m = str(ours["micro_batch"])
    log(f"[minilm] vanilla and instant at micro-batch {m}")
    van = train(bundle, "rotten-tomatoes", work / "vanilla", [*common, "--mode", "vanilla",
                                                              "--micro-batch", m], a.warmup)
    ins = train(bundle, "rotten-tomatoes", work / "instant", [*common, "--micro-batch", m],
                a.warmup)
    cfg = {"bundle": str(bundle), "data": "rotten-tomatoes", "model": "minilm-l6", "batch": 32,
           "steps": a.steps, "warmup": a.warmup, "lr": 0.05, "weight_decay": 0.0, "seed": 0,
           "threads": a.threads, "eval_batch": 64, "fwd_repeats": 10, "optimizer": "sgd",
           "package_dirs": package_dirs()}
    log("[minilm] pytorch eager")
    torch = peer("torch_worker", cfg, work / "pytorch")
    log("[minilm] pytorch eager, each batch padded to its longest text only")
    torch_trim = peer("torch_worker", {**cfg, "trim_padding": True}, work / "pytorch-trim")
    log("[minilm] forward only")
    fwd = peer("infer_worker", cfg, work / "forward")
    log("[minilm] whole batch in one pass: vanilla, INSTANT, INSTANT + int8 saved tensors")
    one = [*common, "--micro-batch", "32"]
    full = {"vanilla": train(bundle, "rotten-tomatoes", work / "full-vanilla",
                             [*one, "--mode", "vanilla"], a.warmup),
            "INSTANT": train(bundle, "rotten-tomatoes", work / "full-instant", one, a.warmup)}
    int8 = ensure_bundle("minilm-l6", "last:3", 1800, extra=("--saved-int8",))
    full["INSTANT, --saved-int8 bundle"] = train(int8, "rotten-tomatoes", work / "full-int8", one,
                                                 a.warmup)
    rows = [
        "| system | step ms (median) | amortised ms (calibration included) | micro-batch | "
        "peak MB (outside) | kernel share of CPU |",
        "|---|---:|---:|---:|---:|---:|",
        f"| PyTorch eager, no budget | {torch['median_ms']:.0f} | – | 32 | "
        f"{torch['peak_mb']:.0f} | – |",
        f"| PyTorch eager, no budget, batch padded to its longest text | "
        f"{torch_trim['median_ms']:.0f} | – | 32 | {torch_trim['peak_mb']:.0f} | – |",
        f"| forward only (onnxruntime) | {fwd['median_ms']:.0f} | – | 32 | {fwd['peak_mb']:.0f} |"
        " – |",
        f"| ours, INSTANT, --budget 256MB | {ours['median_ms']:.0f} | {ours['mean_ms']:.0f} | {m} |"
        f" {ours['peak_mb']:.1f} | {100 * ours['sys_share']:.1f} % |",
        f"| ours, vanilla, micro-batch {m} | {van['median_ms']:.0f} | {van['mean_ms']:.0f} | {m} | "
        f"{van['peak_mb']:.1f} | {100 * van['sys_share']:.1f} % |",
        f"| ours, INSTANT, micro-batch {m} | {ins['median_ms']:.0f} | {ins['mean_ms']:.0f} | {m} | "
        f"{ins['peak_mb']:.1f} | {100 * ins['sys_share']:.1f} % |",
        "",
        f"- 256 MB step / PyTorch step: {ours['median_ms'] / torch['median_ms']:.2f} "
        f"(calibration amortised: {ours['mean_ms'] / torch['median_ms']:.2f}); peak "
        f"{ours['peak_mb']:.1f} MB of 256; against PyTorch with each batch padded to its "
        f"longest text: {ours['median_ms'] / torch_trim['median_ms']:.2f} "
        f"({ours['mean_ms'] / torch_trim['median_ms']:.2f})",
        f"- INSTANT / vanilla at micro-batch {m}: {ins['median_ms'] / van['median_ms']:.2f} "
        f"(amortised, calibration included: {ins['mean_ms'] / van['mean_ms']:.2f})",
        f"- step / forward at batch 32: 256 MB run {ours['median_ms'] / fwd['median_ms']:.2f}, "
        f"INSTANT at micro-batch {m} {ins['median_ms'] / fwd['median_ms']:.2f}, PyTorch "
        f"{torch['median_ms'] / fwd['median_ms']:.2f}",
        f"- kernel (sys) share of the 256 MB run's CPU time: {100 * ours['sys_share']:.1f} %; "
        f"{ours['calibrations']} calibrations ({ours['calib_steps']} steps collected Grams)",
        f"- commands: `{ours['cmd']}`; the others add `--mode vanilla --micro-batch {m}` / "
        f"`--micro-batch {m}` instead of `--budget`",
        "",
        "Whole batch of 32 in one pass (no budget), training peak against the inference peak of "
        "the same batch:",
        "",
        "| system | peak MB (outside) | peak / forward-only peak | step ms (median) |",
        "|---|---:|---:|---:|",
        *(f"| ours, {k}, micro-batch 32 | {v['peak_mb']:.1f} | "
          f"{v['peak_mb'] / fwd['peak_mb']:.2f} | {v['median_ms']:.0f} |" for k, v in full.items()),
        f"| forward only (onnxruntime) | {fwd['peak_mb']:.1f} | 1.00 | {fwd['median_ms']:.0f} |",
    ]
    return rows


def token_mlp(a) -> list[str]:
    from benchmarks.seqdata import make_sequences

    bundle = ensure_bundle("token-mlp", "all", 1800)
    work = WORK / "token-mlp"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "seq.npz"
    if not data.is_file():
        x, y = make_sequences(1024)
        np.savez(data, x=x, y=y)
    common = ["--batch", "256", "--steps", "20", "--lr", "1e-3", "--threads", str(a.threads)]
    log("[token-mlp] vanilla and instant, 20 steps")
    van = train(bundle, str(data), work / "vanilla", [*common, "--mode", "vanilla"], 0)
    ins = train(bundle, str(data), work / "instant", common, 0)
    fast = train(bundle, str(data), work / "instant-flop05", [*common, "--flop-ratio", "0.5"], 0)
    rows = ["| mode | amortised step ms over 20 steps (calibration included) | median step ms |"
            " peak MB (outside) | final loss |", "|---|---:|---:|---:|---:|"]
    for name, r in (("vanilla", van), ("INSTANT (defaults)", ins),
                    ("INSTANT --flop-ratio 0.5", fast)):
        rows.append(f"| {name} | {r['mean_ms']:.0f} | {r['median_ms']:.0f} | {r['peak_mb']:.1f} |"
                    f" {r['loss_last']:.4f} |")
    return rows + [
        "",
        f"- INSTANT / vanilla over the 20-step run, calibration included: defaults "
        f"{ins['mean_ms'] / van['mean_ms']:.2f}, --flop-ratio 0.5 "
        f"{fast['mean_ms'] / van['mean_ms']:.2f}; peak {ins['peak_mb'] / van['peak_mb']:.2f} / "
        f"{fast['peak_mb'] / van['peak_mb']:.2f} of vanilla's",
        f"- command: `{ins['cmd']}` (and `--mode vanilla`, `--flop-ratio 0.5`)",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="minilm-l6,token-mlp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    out = [f"command: python -m benchmarks.speed --workloads {a.workloads} --steps {a.steps}",
           f"machine: {cpu_description()}; onnxruntime {dist_version('onnxruntime')}, torch "
           f"{dist_version('torch')}", ""]
    for w in a.workloads.split(","):
        out += [f"### {w}", ""]
        out += minilm(a) if w == "minilm-l6" else token_mlp(a)
        out.append("")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
