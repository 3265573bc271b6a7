"""INSTANT vs vanilla on the two real pretrained models built into the exporter.

    python -m benchmarks.real_models            # full: both models, both parts (~15-20 min, 2 cores)
    python -m benchmarks.real_models --quick    # smoke: 3 steps at batch 8, 64 held-out, sweep [8]
    python benchmarks/real_models.py --models minilm-l6 --steps 40 --sweep-batches 8,32,128

Models: ``minilm-l6`` (pretrained all-MiniLM-L6-v2, ``--trainable last:3``: the last 2 encoder
layers + a new head, as ``make demo-minilm``) on Rotten Tomatoes, and ``efficientnet-lite0``
(ImageNet-pretrained, ``--trainable last:2``: the last MBConv stage + head, the exporter's
documented choice) on MNIST 5k. Bundles are exported once into ``results/tmp/bench-work/bundles``
(shared with ``benchmarks.peers``; ``--reexport`` refreshes them).

Part 1 (compare): per model, ``python -m runtime train BUNDLE --data D --steps K --batch B --seed S
--mode {vanilla,instant} --threads 2 --no-progress --out DIR`` (plus the model's optimizer and lr;
instant adds ``--oversample``), each a fresh process, the same steps, seed, data order and batch;
read from DIR/summary.json: held-out accuracy before/after (the built-in 1,000-example split),
whole-process peak RSS (VmHWM, loading, calibration and both evaluations included: the runtime
evaluates at batch 64, which can set the peak), median step time (calibration excluded), and the
analytic backward FLOPs of the compressed layers
(``runtime.accounting.layer_costs``: vanilla exact, instant at the ranks in summary.json).

Part 2 (sweep): per model and batch B, a few steps with ``--batch B --micro-batch B`` (no
accumulation) in each mode; the smallest B at which vanilla peaks above the threshold (256 MB)
while instant stays at or below it. The sweep's data is an .npz of B pre-processed training
examples without a held-out split, so no evaluation (at batch 64) sets the peak.

Output: a Markdown report (tables, the command line, the machine) printed and written to
``results/real/results.md`` (``results-quick.md`` with ``--quick``), with ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: python benchmarks/real_models.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    ROOT,
    cpu_description,
    dist_version,
    ensure_bundle,
    fmt,
    log,
    md_table,
    run_cmd,
)
from contract import read_manifest  # noqa: E402
from runtime.accounting import layer_costs  # noqa: E402

WORK = ROOT / "results" / "tmp" / "real-work"  # subset data and per-run output folders
OUT = ROOT / "results" / "real"
MB = 1e6  # the runtime's MB (summary lines and --budget 256MB are decimal)
MODES = ("vanilla", "instant")

Result = dict[str, Any]


@dataclass(frozen=True)
class RealModel:
    name: str
    trainable: str
    data: str
    steps: int
    batch: int
    optimizer: str
    lr: float
    sweep: tuple[int, ...]


MODELS = {
    # SGD momentum, lr 0.05, as `make demo-minilm` (AdamW would add 2 moments of ~3.6M params)
    "minilm-l6": RealModel("minilm-l6", "last:3", "rotten-tomatoes", 80, 32, "sgd", 0.05,
                           (8, 16, 32, 64, 128)),
    # AdamW lr 1e-3, as the peer benchmark; the compressed layers run at 2x2 pixels (1/32 of 64)
    "efficientnet-lite0": RealModel("efficientnet-lite0", "last:2", "mnist5k", 100, 32, "adamw",
                                    1e-3, (16, 32, 64, 128, 256)),
}
QUICK = {"steps": 3, "batch": 8, "sweep": (8,), "sweep_steps": 2, "eval_examples": 64}


# ------------------------------------------------------------------------------------ running

def rel(path: Path | str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def subset_npz(bundle: Path, dataset: str, n_train: int, n_test: int, path: Path) -> Path:
    """The first ``n_train`` training and ``n_test`` held-out examples of a built-in dataset,
    pre-processed for ``bundle`` (tokenised / resized) and saved as an .npz the runtime reads.
    Every example is held in memory by the training process: small subsets only. Made again
    when the bundle is newer (a re-export may change the input shapes)."""
    if path.is_file() and path.stat().st_mtime >= (bundle / "manifest.json").stat().st_mtime:
        return path
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    b = open_bundle(bundle, verify=False)
    ds = load_data(dataset, b)
    x, y = ds.take(np.arange(min(n_train, len(ds))))
    arrays = {**x, "y": y}
    if n_test and ds.test is not None:
        xt, yt = ds.test.take(np.arange(min(n_test, len(ds.test))))
        arrays.update({f"{k}_test": v for k, v in xt.items()}, y_test=yt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def train(bundle: Path, data: str, mode: str, model: RealModel, a: argparse.Namespace, out: Path,
          steps: int, batch: int, micro_batch: int | None = None) -> Result:
    """One ``python -m runtime train`` process; its summary.json plus status, command, wall time."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", str(bundle), "--data", data, "--steps", str(steps), "--batch", str(batch)]
    if micro_batch:
        args += ["--micro-batch", str(micro_batch)]
    args += ["--seed", str(a.seed), "--mode", mode, "--threads", str(a.threads),
             "--optimizer", model.optimizer, "--lr", f"{model.lr:g}"]
    if mode == "instant" and a.oversample is not None:
        args += ["--oversample", str(a.oversample)]
    if mode == "instant" and a.energy is not None:
        args += ["--energy", str(a.energy)]
    args += ["--checkpoint-every", "0", "--no-progress", "--out", str(out)]
    shown = "python -m runtime " + shlex.join(
        rel(v) if v in (str(bundle), data, str(out)) else v for v in args)
    log(f"$ {shown}")
    t0 = time.perf_counter()
    ok, msg = run_cmd([sys.executable, "-m", "runtime", *args], a.timeout)
    res: Result = {"mode": mode, "cmd": shown, "wall_s": time.perf_counter() - t0}
    if not ok:
        log(f"  failed: {msg}")
        return {**res, "status": f"failed: {msg}"}
    return {**res, "status": "ok", **json.loads((out / "summary.json").read_text())}


def backward_mflops(manifest, ranks: dict[str, list[int]] | None) -> float:
    """Backward MFLOP per example of the compressed layers: exact (``ranks`` None) or INSTANT."""
    layers = manifest.instant.layers
    if ranks is None:
        return sum(c.vanilla_flops for c in layer_costs(layers, {})) / 1e6
    costs = layer_costs(layers, {k: (int(v[0]), int(v[1])) for k, v in ranks.items()})
    return sum(c.instant_flops for c in costs) / 1e6


def compare(model: RealModel, bundle: Path, a: argparse.Namespace) -> Result:
    data, shown = model.data, model.data
    if a.eval_examples:
        n_train = model.steps * model.batch
        data = str(subset_npz(bundle, model.data, n_train, a.eval_examples,
                              WORK / "data" / f"{model.name}-{n_train}-{a.eval_examples}.npz"))
        shown = f"{model.data} (.npz: {n_train} train, {a.eval_examples} held-out)"
    manifest = read_manifest(bundle / "manifest.json")
    rec: Result = {"data": shown, "data_path": rel(data), "runs": {}}
    for mode in MODES:
        log(f"[{model.name}] compare: {mode}, {model.steps} steps x batch {model.batch}")
        r = train(bundle, data, mode, model, a, WORK / "runs" / model.name / mode, model.steps,
                  model.batch)
        if r["status"] == "ok":
            r["bwd_mflops"] = backward_mflops(manifest, r["ranks"] if mode == "instant" else None)
        rec["runs"][mode] = r
    rec["layers"] = len(manifest.instant.layers)
    van, ins = rec["runs"]["vanilla"], rec["runs"]["instant"]
    if van.get("test_acc") is not None and ins.get("test_acc") is not None:
        rec["acc_diff_pts"] = 100.0 * (ins["test_acc"] - van["test_acc"])
    if van.get("bwd_mflops") and ins.get("bwd_mflops") is not None:
        rec["flop_ratio"] = ins["bwd_mflops"] / van["bwd_mflops"]
    return rec


def sweep(model: RealModel, bundle: Path, a: argparse.Namespace) -> Result:
    rows: list[Result] = []
    threshold = a.threshold_mb * MB
    rec: Result = {"threshold_mb": a.threshold_mb, "steps": a.sweep_steps, "rows": rows}
    for b in model.sweep:
        data = str(subset_npz(bundle, model.data, b, 0, WORK / "data" / f"{model.name}-{b}-0.npz"))
        row: Result = {"batch": b}
        for mode in MODES:
            log(f"[{model.name}] sweep: {mode}, micro-batch {b}")
            r = train(bundle, data, mode, model, a, WORK / "runs" / model.name / f"{mode}-b{b}",
                      a.sweep_steps, b, micro_batch=b)
            row[mode] = {k: r.get(k) for k in ("status", "cmd", "peak_rss", "idle_rss",
                                               "median_step_s", "micro_batch", "ranks")}
        rows.append(row)
        van, ins = row["vanilla"].get("peak_rss"), row["instant"].get("peak_rss")
        if van is not None and ins is not None and van > threshold >= ins:
            rec["crossing"] = b
            break
        if ins is not None and ins > threshold:
            rec["stopped"] = f"instant peaked above {a.threshold_mb:g} MB at batch {b}"
            break
    return rec


# ------------------------------------------------------------------------------------ report

def _acc(r: Result) -> str:
    if r.get("test_acc") is None:
        return "–"
    before = r.get("test_acc_before")
    return (f"{before:.3f} → " if before is not None else "") + f"{r['test_acc']:.3f}"


def _status(r: Result) -> str:
    note = r.get("status", "not run")
    if r.get("calibrations"):
        note += f"; calibrated {r['calibrations']}x, {r['calib_s']:.1f} s"
    return note


def report(recs: dict[str, Result], meta: dict[str, str], a: argparse.Namespace) -> str:
    lines = ["# Real pretrained models: INSTANT vs vanilla (instant-runtime)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    compared = {n: r["compare"] for n, r in recs.items() if "compare" in r}
    if compared:
        lines += ["", "## Same steps, seed and batch: accuracy, memory, time", "",
                  "One fresh `python -m runtime train` process per row. peak RSS: whole-process "
                  "VmHWM (loading, calibration and both held-out evaluations included; the "
                  "evaluation runs at batch 64 and can set the peak of both modes, the sweep "
                  "below measures training alone); idle: RSS after loading; step: median step "
                  "time (calibration excluded); bwd MFLOP/ex: "
                  "analytic backward FLOPs per example of the compressed (INSTANT) layers, "
                  "exact for vanilla, at the run's final ranks for instant; Δ acc: instant − "
                  "vanilla held-out accuracy in points.", ""]
        rows = []
        for name, c in compared.items():
            m = recs[name]["model"]
            for mode in MODES:
                r = c["runs"][mode]
                diff = c.get("acc_diff_pts") if mode == "instant" else None
                rows.append([name, c["data"], mode, f"{m['steps']} × {m['batch']}", _acc(r),
                             fmt(diff, "+.1f"), fmt(r.get("peak_rss"), ".1f", 1 / MB),
                             fmt(r.get("idle_rss"), ".1f", 1 / MB),
                             fmt(r.get("median_step_s"), ".0f", 1e3),
                             fmt(r.get("bwd_mflops"), ".2f"), _status(r)])
        lines += md_table(["model", "data", "mode", "steps × batch", "held-out acc before → after",
                           "Δ acc pts", "peak RSS MB", "idle MB", "step ms", "bwd MFLOP/ex",
                           "status"], rows, align="lllllrrrrrl")
        lines.append("")
        for name, c in compared.items():
            m = recs[name]["model"]
            parts = [f"**{name}** (`--trainable {m['trainable']}`, {m['optimizer']} lr "
                     f"{m['lr']:g}):"]
            diff = c.get("acc_diff_pts")
            if diff is not None:
                verdict = "met" if abs(diff) <= a.target_pts else "not met"
                parts.append(f"Δ acc {diff:+.1f} pts (target |Δ| ≤ {a.target_pts:g}: {verdict}"
                             + ("; instant better" if diff > a.target_pts else "") + ");")
            if c.get("flop_ratio") is not None:
                parts.append(f"backward FLOPs of the {c['layers']} compressed layers, "
                             f"instant/vanilla {c['flop_ratio']:.3f};")
            ins, van = c["runs"]["instant"], c["runs"]["vanilla"]
            if ins.get("peak_rss") and van.get("peak_rss"):
                parts.append(f"peak RSS instant/vanilla {ins['peak_rss'] / van['peak_rss']:.2f};")
            if ins.get("median_step_s") and van.get("median_step_s"):
                parts.append(f"step time instant/vanilla "
                             f"{ins['median_step_s'] / van['median_step_s']:.2f}.")
            if ins.get("ranks"):
                parts.append("Final ranks (Rx, Ry): " + ", ".join(
                    f"{k} {tuple(v)}" for k, v in ins["ranks"].items()) + ".")
            lines += ["- " + " ".join(parts)]
    swept = {n: r["sweep"] for n, r in recs.items() if "sweep" in r}
    if swept:
        thr = a.threshold_mb
        lines += ["", f"## Batch sweep: whole-process peak RSS vs micro-batch ({thr:g} MB)", "",
                  f"`--batch B --micro-batch B` (no accumulation), {a.sweep_steps} steps, data: "
                  "B pre-processed training examples in an .npz without a held-out split (no "
                  "evaluation). The sweep stops at the first batch where vanilla is above and "
                  "instant at or below the threshold, or where instant is above it.", ""]
        rows = []
        for name, s in swept.items():
            for row in s["rows"]:
                v, i = row["vanilla"].get("peak_rss"), row["instant"].get("peak_rss")
                notes = [f"{mode}: {row[mode]['status']}" for mode in MODES
                         if row[mode]["status"] != "ok"]
                rows.append([name, row["batch"], fmt(v, ".1f", 1 / MB), fmt(i, ".1f", 1 / MB),
                             fmt(i / v if v and i else None, ".2f"),
                             "–" if v is None else ("yes" if v > thr * MB else "no"),
                             "–" if i is None else ("yes" if i <= thr * MB else "no"),
                             "; ".join(notes) or "ok"])
        lines += md_table(["model", "micro-batch", "vanilla peak MB", "instant peak MB",
                           "instant/vanilla", f"vanilla > {thr:g} MB", f"instant ≤ {thr:g} MB",
                           "status"], rows, align="lrrrrlll")
        lines.append("")
        for name, s in swept.items():
            tried = [row["batch"] for row in s["rows"]]
            span = f"{tried[0]}–{tried[-1]}" if len(tried) > 1 else str(tried[0])
            if "crossing" in s:
                found = (f"smallest micro-batch with vanilla > {thr:g} MB and instant ≤ {thr:g} "
                         f"MB: **{s['crossing']}**")
            else:
                found = (f"no micro-batch in {span} with vanilla > {thr:g} MB and instant ≤ "
                         f"{thr:g} MB" + (f" ({s['stopped']})" if "stopped" in s else ""))
            lines.append(f"- **{name}**: {found}.")
    lines += ["", "## Commands", "", "Each run, from the repository root (`python` = "
              f"`{rel(sys.executable)}`):", "", "```"]
    for r in recs.values():
        for mode in MODES:
            if "compare" in r:
                lines.append(r["compare"]["runs"][mode]["cmd"])
        for row in r.get("sweep", {}).get("rows", []):
            lines += [row[mode]["cmd"] for mode in MODES if row[mode].get("cmd")]
    lines += ["```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}"
                                         ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.real_models",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK['steps']} steps at batch {QUICK['batch']}, "
                         f"{QUICK['eval_examples']} held-out examples, sweep {list(QUICK['sweep'])}"
                         f" for {QUICK['sweep_steps']} steps")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--parts", default="compare,sweep", help="compare, sweep or both")
    ap.add_argument("--steps", type=int, default=None,
                    help="compare: steps per run (default: minilm-l6 80, efficientnet-lite0 100)")
    ap.add_argument("--batch", type=int, default=None, help="compare: batch (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--energy", type=float, default=None,
                    help="INSTANT energy threshold ε for the instant runs (default: the bundle's)")
    ap.add_argument("--oversample", type=int, default=7,
                    help="INSTANT oversampling p for --mode instant, as `make demo`")
    ap.add_argument("--eval-examples", type=int, default=None,
                    help="compare on an .npz of the first N held-out and steps×batch training "
                         "examples (pre-processed, held in memory: smoke runs) instead of the "
                         "built-in 1,000-example split (quick: 64)")
    ap.add_argument("--sweep-batches", type=_batches, default=None,
                    help="sweep: comma-separated micro-batches for every model (default: "
                         + "; ".join(f"{m.name} {','.join(map(str, m.sweep))}"
                                     for m in MODELS.values()) + ")")
    ap.add_argument("--sweep-steps", type=int, default=None, help="sweep: steps per run (3)")
    ap.add_argument("--threshold-mb", type=float, default=256.0,
                    help="sweep: peak RSS threshold, MB (10^6 bytes)")
    ap.add_argument("--target-pts", type=float, default=1.0,
                    help="compare: accuracy target |instant − vanilla| in points")
    ap.add_argument("--reexport", action="store_true", help="export the bundles again")
    ap.add_argument("--timeout", type=float, default=1800, help="per process, seconds")
    ap.add_argument("--out", default=None,
                    help="output folder (default results/real; results-quick.md with --quick)")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if unknown := [n for n in names if n not in MODELS]:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if not parts or parts - {"compare", "sweep"}:
        ap.error(f"--parts takes compare, sweep or both, got {a.parts!r}")
    if a.quick:
        a.eval_examples = a.eval_examples or QUICK["eval_examples"]
    a.sweep_steps = a.sweep_steps or (QUICK["sweep_steps"] if a.quick else 3)
    t0 = time.time()
    recs: dict[str, Result] = {}
    for name in names:
        m = MODELS[name]
        if a.quick:
            m = replace(m, steps=QUICK["steps"], batch=QUICK["batch"], sweep=QUICK["sweep"])
        m = replace(m, steps=a.steps or m.steps, batch=a.batch or m.batch,
                    sweep=a.sweep_batches or m.sweep)
        rec: Result = {"model": asdict(m)}
        recs[name] = rec
        try:
            bundle = ensure_bundle(m.name, m.trainable, a.timeout, fresh=a.reexport)
        except RuntimeError as exc:
            log(f"[{name}] {exc}")
            rec["error"] = str(exc)
            continue
        rec["bundle"] = rel(bundle)
        if "compare" in parts:
            rec["compare"] = compare(m, bundle, a)
        if "sweep" in parts:
            rec["sweep"] = sweep(m, bundle, a)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.real_models " + shlex.join(argv),
        "machine": f"{cpu_description()}; onnxruntime threads {a.threads}",
        "software": f"Python {platform.python_version()}, onnxruntime "
                    f"{dist_version('onnxruntime')}, numpy {dist_version('numpy')}, torch "
                    f"{dist_version('torch')} (export only)",
        "bundles": ", ".join(f"{n} `{r['bundle']}`" for n, r in recs.items() if "bundle" in r)
                   or "none",
        "total wall time": f"{time.time() - t0:.0f} s",
    }
    meta.update({f"{n} failed": r["error"] for n, r in recs.items() if "error" in r})
    text = report(recs, meta, a)
    out = Path(a.out) if a.out else OUT
    out.mkdir(parents=True, exist_ok=True)
    stem = "results-quick" if a.quick else "results"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "models": recs}, indent=1,
                                                 default=str))
    print(text)
    print(f"written: {rel(out / (stem + '.md'))}")
    return 1 if any("error" in r for r in recs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
