"""Speed inside the budget, side by side in one run (the targets of the speed issue).

    python -m benchmarks.speed                 # MiniLM-L6 and the token MLP, ~15 min on 2 cores
    python -m benchmarks.speed --workloads minilm-l6 --steps 20

Every figure comes from a fresh process, measured from outside (peak: VmHWM polled from
another process; CPU: ``wait4``'s user and system time of the training process):

MiniLM-L6 (``last:3`` + head, Rotten Tomatoes, batch 32, SGD 0.05 as ``make demo``):
  * ``pytorch``: eager PyTorch, same model, trainable subset, batch, optimizer and data order,
    every batch padded to the bundle's length as the runtime's training graphs see it; and again
    with each batch padded only to its longest text (what a PyTorch user's collator does; the
    runtime's frozen prefix runs without padding, export/prefix.py);
  * ``forward``: the bundle's inference graph on one batch in plain onnxruntime;
  * ``ours@256MB``: ``instant-runtime train --budget 256MB`` (the demo configuration), and the
    same on a bundle exported with ``--lengths none`` (trainable part at the full length only,
    export/lengths.py) and with ``--no-prefix --lengths none`` (graphs whole, padded throughout);
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
from collections.abc import Callable
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


def _repeated(runs: dict[str, Callable[[Path], dict]], work: Path, repeats: int) -> dict:
    """Each system ``repeats`` times, interleaved (repeat k runs them in a rotated order), so a
    slow phase of the machine hits every system alike. Per system: the runs' results and the
    median over repeats of each figure (``med``)."""
    names_ = list(runs)
    got: dict[str, list[dict]] = {k: [] for k in names_}
    for k in range(repeats):
        order = names_[k % len(names_):] + names_[:k % len(names_)]
        for name in order:
            log(f"  repeat {k + 1}/{repeats}: {name}")
            got[name].append(runs[name](work / f"{name}-{k}"))
    out = {}
    for name, rs in got.items():
        med = {key: statistics.median(r[key] for r in rs) for key, v in rs[0].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[name] = {**rs[0], **med, "runs": rs}
    return out


def _spread(r: dict, key: str = "median_ms") -> str:
    """``median (min–max)`` over the repeats."""
    vals = [x[key] for x in r["runs"]]
    if len(vals) == 1:
        return f"{vals[0]:.0f}"
    return f"{statistics.median(vals):.0f} ({min(vals):.0f}–{max(vals):.0f})"


def _ratios(a: dict, b: dict, key_a: str = "median_ms", key_b: str = "median_ms") -> str:
    """Median of the per-repeat ratios a/b (same repeat: same phase of the machine), and their
    range."""
    rs = [x[key_a] / y[key_b] for x, y in zip(a["runs"], b["runs"], strict=True)]
    if len(rs) == 1:
        return f"{rs[0]:.2f}"
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f})"


def minilm(a) -> list[str]:
    from benchmarks.peers.run import package_dirs

    bundle = ensure_bundle("minilm-l6", "last:3", 1800)
    work = WORK / "minilm"
    common = ["--batch", "32", "--steps", str(a.steps), "--optimizer", "sgd", "--lr", "0.05",
              "--threads", str(a.threads)]
    log("[minilm] ours @256MB (for the micro-batch the plan chooses)")
    first = train(bundle, "rotten-tomatoes", work / "budget-plan", [*common, "--budget", "256MB"],
                  a.warmup)
    m = str(first["micro_batch"])
    cfg = {"bundle": str(bundle), "data": "rotten-tomatoes", "model": "minilm-l6", "batch": 32,
           "steps": a.steps, "warmup": a.warmup, "lr": 0.05, "weight_decay": 0.0, "seed": 0,
           "threads": a.threads, "eval_batch": 64, "fwd_repeats": 10, "optimizer": "sgd",
           "package_dirs": package_dirs()}
    rt = "rotten-tomatoes"
    log(f"[minilm] {a.repeats} interleaved repeats of every system")
    whole = ensure_bundle("minilm-l6", "last:3", 1800,
                          extra=("--no-prefix", "--lengths", "none"))
    fixed = ensure_bundle("minilm-l6", "last:3", 1800, extra=("--lengths", "none"))
    res = _repeated({
        "budget": lambda o: train(bundle, rt, o, [*common, "--budget", "256MB"], a.warmup),
        "budget-whole": lambda o: train(whole, rt, o, [*common, "--budget", "256MB"], a.warmup),
        "budget-fixed": lambda o: train(fixed, rt, o, [*common, "--budget", "256MB"], a.warmup),
        "vanilla": lambda o: train(bundle, rt, o, [*common, "--mode", "vanilla",
                                                   "--micro-batch", m], a.warmup),
        "instant": lambda o: train(bundle, rt, o, [*common, "--micro-batch", m], a.warmup),
        "pytorch": lambda o: peer("torch_worker", cfg, o),
        "pytorch-trim": lambda o: peer("torch_worker", {**cfg, "trim_padding": True}, o),
        "forward": lambda o: peer("infer_worker", cfg, o),
    }, work, a.repeats)
    ours, van, ins = res["budget"], res["vanilla"], res["instant"]
    torch, torch_trim, fwd = res["pytorch"], res["pytorch-trim"], res["forward"]
    log("[minilm] whole batch in one pass: vanilla, INSTANT, INSTANT + int8 saved tensors")
    one = [*common, "--micro-batch", "32"]
    full = {"vanilla": train(bundle, rt, work / "full-vanilla", [*one, "--mode", "vanilla"],
                             a.warmup),
            "INSTANT": train(bundle, rt, work / "full-instant", one, a.warmup)}
    int8 = ensure_bundle("minilm-l6", "last:3", 1800, extra=("--saved-int8",))
    full["INSTANT, --saved-int8 bundle"] = train(int8, rt, work / "full-int8", one, a.warmup)
    n = a.repeats
    rows = [
        f"Step times: median over {n} interleaved runs of each system's median step (min–max "
        "of the runs); ratios: median of the per-run ratios (runs of the same repeat), range.",
        "",
        "| system | step ms (median) | amortised ms (calibration included) | micro-batch | "
        "peak MB (outside, max of runs) | kernel share of CPU |",
        "|---|---:|---:|---:|---:|---:|",
        f"| PyTorch eager, no budget, batch padded to the bundle's 64 tokens | {_spread(torch)} |"
        f" – | 32 | {max(r['peak_mb'] for r in torch['runs']):.0f} | – |",
        f"| PyTorch eager, no budget, batch padded to its longest text | {_spread(torch_trim)} |"
        f" – | 32 | {max(r['peak_mb'] for r in torch_trim['runs']):.0f} | – |",
        f"| forward only (onnxruntime, padded) | {_spread(fwd)} | – | 32 | "
        f"{max(r['peak_mb'] for r in fwd['runs']):.0f} | – |",
        *(f"| ours, {label} | {_spread(r)} | {_spread(r, 'mean_ms')} | {m} | "
          f"{max(x['peak_mb'] for x in r['runs']):.1f} | {100 * r['sys_share']:.1f} % |"
          for label, r in (("INSTANT, --budget 256MB", ours),
                           ("INSTANT, --budget 256MB, trainable part at 64 tokens only "
                            "(export --lengths none)", res["budget-fixed"]),
                           ("INSTANT, --budget 256MB, whole graphs padded throughout "
                            "(export --no-prefix, no shorter lengths)", res["budget-whole"]),
                           (f"vanilla, micro-batch {m}", van),
                           (f"INSTANT, micro-batch {m}", ins))),
        "",
        f"- 256 MB step / PyTorch step (padded to 64): {_ratios(ours, torch)}; calibration "
        f"amortised: {_ratios(ours, torch, 'mean_ms')}; peak at most "
        f"{max(x['peak_mb'] for x in ours['runs']):.1f} MB of 256",
        f"- 256 MB step / PyTorch step with each batch padded to its longest text: "
        f"{_ratios(ours, torch_trim)}; calibration amortised: "
        f"{_ratios(ours, torch_trim, 'mean_ms')}",
        f"- 256 MB step with the frozen prefix run without padding / whole graphs: "
        f"{_ratios(ours, res['budget-whole'])}",
        f"- 256 MB step with the trainable part also at 32/48 tokens where a micro-batch fits "
        f"/ at 64 only (export --lengths none): {_ratios(ours, res['budget-fixed'])}",
        f"- INSTANT / vanilla at micro-batch {m}: {_ratios(ins, van)} (amortised, calibration "
        f"included: {_ratios(ins, van, 'mean_ms', 'mean_ms')})",
        f"- step / forward at batch 32: 256 MB run {_ratios(ours, fwd)}, INSTANT at micro-batch "
        f"{m} {_ratios(ins, fwd)}, PyTorch {_ratios(torch, fwd)}",
        f"- kernel (sys) share of the 256 MB run's CPU time: {100 * ours['sys_share']:.1f} % "
        f"(median of runs); {ours['calibrations']} calibration"
        f"{'' if ours['calibrations'] == 1 else 's'} ({ours['calib_steps']} steps "
        "collected Grams)",
        f"- commands: `{ours['cmd']}`; the others add `--mode vanilla --micro-batch {m}` / "
        f"`--micro-batch {m}` instead of `--budget`",
        "",
        "Whole batch of 32 in one pass (no budget, one run each), training peak against the "
        "inference peak of the same batch:",
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
    log(f"[token-mlp] vanilla and instant, 20 steps, {a.repeats} interleaved repeats")
    res = _repeated({
        "vanilla": lambda o: train(bundle, str(data), o, [*common, "--mode", "vanilla"], 0),
        "instant": lambda o: train(bundle, str(data), o, common, 0),
        "instant-flop05": lambda o: train(bundle, str(data), o, [*common, "--flop-ratio", "0.5"],
                                          0),
    }, work, a.repeats)
    van, ins, fast = res["vanilla"], res["instant"], res["instant-flop05"]
    rows = ["| mode | amortised step ms over 20 steps (calibration included) | median step ms |"
            " peak MB (outside, max of runs) | final loss |", "|---|---:|---:|---:|---:|"]
    for name, r in (("vanilla", van), ("INSTANT (defaults)", ins),
                    ("INSTANT --flop-ratio 0.5", fast)):
        rows.append(f"| {name} | {_spread(r, 'mean_ms')} | {_spread(r)} | "
                    f"{max(x['peak_mb'] for x in r['runs']):.1f} | {r['loss_last']:.4f} |")
    return rows + [
        "",
        f"- INSTANT / vanilla over the 20-step run, calibration included (median of per-repeat "
        f"ratios, range): defaults {_ratios(ins, van, 'mean_ms', 'mean_ms')}, --flop-ratio 0.5 "
        f"{_ratios(fast, van, 'mean_ms', 'mean_ms')}; peak {ins['peak_mb'] / van['peak_mb']:.2f}"
        f" / {fast['peak_mb'] / van['peak_mb']:.2f} of vanilla's",
        f"- command: `{ins['cmd']}` (and `--mode vanilla`, `--flop-ratio 0.5`)",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="minilm-l6,token-mlp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved runs of every system (timings on a shared VM swing)")
    a = ap.parse_args(argv)
    out = [f"command: python -m benchmarks.speed --workloads {a.workloads} --steps {a.steps} "
           f"--repeats {a.repeats}",
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
