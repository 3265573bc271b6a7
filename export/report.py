"""``instant-runtime report RUN --out report.png``: a training run's metrics drawn (workstation side).

Reads ``RUN/metrics.jsonl`` (one JSON object per line, written by ``train``) and, when present,
``RUN/summary.json``, and draws whichever of these the run recorded:

(a) training loss and accuracy against the step, with the held-out evaluations as points;
(b) resident memory (RSS and its running peak) against the step, with the budget and the
    planner's predicted peak;
(c) INSTANT ranks at each calibration: the mean of the layers' ``Rx`` and ``Ry`` and their
    min-max range.

Records (fields may be missing)::

    {"kind": "plan", "budget": bytes|null, "predicted_peak": bytes, "micro_batch": int, ...}
    {"kind": "step", "step": int, "loss": float, "accuracy": float|null, "lr": float,
     "step_s": float, "rss": bytes, "peak_rss": bytes}
    {"kind": "calibration", "step": int, "seconds": float, "ranks": {layer: [rx, ry]}}
    {"kind": "eval", "step": int, "split": "val", "loss": float, "accuracy": float|null}

A resumed run appends the steps it repeats; the last record of a step wins. A torn last line (a
run killed mid-write) is skipped; any other line that is not a JSON object is an error. Only
matplotlib's Agg canvas is used (no pyplot, no display); the device never imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import UserError
from contract.files import drop_dead_staging, refuse_special

__all__ = ["Metrics", "add_report_parser", "cmd_report", "read_metrics", "write_report"]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ROUNDS_FILE = "rounds.jsonl"  # a fleet server's
MAX_METRICS_BYTES = 1 << 30  # a metrics file is KBs to MBs; refuse absurd ones
_MB = 1e6


@dataclass
class Metrics:
    """A run's records by kind, one per step (the last one written wins)."""

    source: Path
    steps: list[dict] = field(default_factory=list)  # sorted by step
    evals: list[dict] = field(default_factory=list)  # sorted by step
    calibrations: list[dict] = field(default_factory=list)  # sorted by step
    plan: dict | None = None  # the last plan record
    summary: dict | None = None  # summary.json (None where it is of another step)
    stale_summary: object = None  # that summary's step count, where it was left out
    torn_last_line: bool = False
    unit: str = "step"  # "round": a fleet server's rounds.jsonl, drawn round by round
    other_data: int = 0  # rounds evaluated on other data than the last (left out)

    @property
    def budget(self) -> float | None:
        for rec in (self.plan, self.summary):
            v = _num((rec or {}).get("budget"))
            if v is not None:
                return v
        return None

    @property
    def predicted_peak(self) -> float | None:
        for rec in (self.plan, self.summary):
            v = _num((rec or {}).get("predicted_peak"))
            if v is not None:
                return v
        return None


_LIMIT = 1e30  # no loss, accuracy, byte count or rank comes near; beyond it a tampered file


def _num(v: object) -> float | None:
    """A finite number within +-1e30, or None (missing, null, a string, a bool, NaN, a value
    whose axis range matplotlib cannot compute: was a ValueError traceback at 1e308)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        v = float(v)
    except OverflowError:  # an int of 400 digits
        return None
    return v if math.isfinite(v) and abs(v) <= _LIMIT else None


def _step(rec: dict) -> int | None:
    s = rec.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _LIMIT else None


def _count(m: Metrics) -> int:
    """Steps (rounds) of the run: the last one's number, where metrics.jsonl keeps one line in
    10, 100, ... past 10,000 steps (a session 36 probe's 17,000-step run was "10700 steps")."""
    last = _step(m.steps[-1])
    return max(last, len(m.steps)) if last is not None else len(m.steps)


def read_metrics(run: str | os.PathLike) -> Metrics:
    """Parse ``RUN/metrics.jsonl`` (``run`` may also be the file itself) and ``summary.json``.

    Raises:
        UserError: no such run or file, an unreadable or empty file, a line (other than a torn
            last one) that is not a JSON object, a corrupt summary.json.
    """
    run = Path(run)
    if run.is_file() and run.suffix.lower() != ".jsonl":  # (a session 45 probe: params.npz was
        raise UserError(f"{run} is a file, not a run folder; pass the --out folder of a `train` "
                        "run (or its metrics.jsonl)")  # read as metrics: "delete that line")
    path = run if run.is_file() else run / METRICS_FILE
    if not run.is_file() and not path.exists() and (run / ROUNDS_FILE).is_file():
        path = run / ROUNDS_FILE  # a fleet server's folder (an outside probe: "has no metrics")
    folder = path.parent
    if not run.exists():
        raise UserError(f"run '{run}' not found; pass the --out folder of a `train` run")
    if not path.is_file():
        if path.exists() or path.is_symlink():  # (a probe's FIFO: "has no metrics.jsonl")
            raise UserError(f"{path} is not a regular file; pass the --out folder of a `train` "
                            "run (every run writes RUN/metrics.jsonl as a file)")
        raise UserError(f"{run} has no {METRICS_FILE}; pass the --out folder of a `train` run "
                        "(every run writes RUN/metrics.jsonl) or of a fleet server (rounds.jsonl)")
    for f in (path, folder / SUMMARY_FILE):
        if f.is_symlink():  # (a run from elsewhere: the link may lead anywhere)
            raise UserError(f"{f} is a symbolic link: a run's files are never read through a "
                            "link; replace it with the file itself (cp -L), or pass another run")
    try:
        size = path.stat().st_size
        if size > MAX_METRICS_BYTES:
            # (session 50 probe: "it is not a run's metrics" of an old runtime's, which logged
            # every step: 1.1 GB after 5.3 million steps)
            raise UserError(f"{path} has {size / 1e9:.1f} GB, more than this runtime's runs "
                            "write (older ones logged every step); draw its last part: "
                            f"tail -n 200000 {shlex.quote(str(path))} > last.jsonl, then "
                            "instant-runtime report last.jsonl")
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    m = Metrics(path, unit="round" if path.name == ROUNDS_FILE else "step")
    steps: dict[int, dict] = {}
    evals: dict[tuple[int, str], dict] = {}
    calibs: dict[int, dict] = {}
    rounds: list[dict] = []
    lines = raw.split(b"\n")
    last = len(lines) - 1  # after a final "\n" the last element is empty
    records = 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            if i == last:  # no newline after it: a write cut short (the run was killed)
                m.torn_last_line = True
                continue
            raise UserError(f"{path}: line {i + 1} is not valid JSON ({str(exc)[:60]}); the "
                            "file is corrupt: delete that line or run again") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}: line {i + 1} is not a JSON object; the file is not a run's "
                            "metrics")
        records += 1
        kind, step = rec.get("kind"), _step(rec)
        if kind == "round" and m.unit == "round":  # the aggregate's evaluation, the clients' fit
            rounds.append(rec)
        elif kind == "plan":
            m.plan = rec
        elif kind == "step" and step is not None:
            steps[step] = rec
        elif kind == "eval" and step is not None:
            evals[(step, str(rec.get("split", "val")))] = rec
        elif kind == "calibration" and step is not None:
            calibs[step] = rec
        # other kinds (newer runtimes) are skipped
    if not records:  # (empty, or a torn single line: a probe's 67 MB without a newline)
        raise UserError(f"{path} holds no records ("
                        + ("empty file" if not raw.strip() else
                           f"{len(raw)} bytes without one complete JSON line")
                        + "); the run wrote no metrics, or this is not a run's metrics file")
    on = rounds[-1].get("evaluated_on") if rounds else None
    for rec in rounds:  # (a server resumed on other --data: one data's curve, the last one's)
        same = rec.get("evaluated_on") == on
        _round(rec, steps, evals if same else None)
        m.other_data += not same
    m.steps = [steps[k] for k in sorted(steps)]
    m.evals = [evals[k] for k in sorted(evals)]
    m.calibrations = [calibs[k] for k in sorted(calibs)]
    spath = folder / SUMMARY_FILE
    if spath.is_file():
        try:
            if spath.stat().st_size > 1 << 20:  # a run's holds ~1 KB
                raise UserError(f"{spath} has more than 1 MiB: it is not a run's summary; delete "
                                "it to draw the metrics alone")
            summary = json.loads(spath.read_bytes())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise UserError(f"{spath} is unreadable or corrupt ({str(exc)[:60]}); delete it to "
                            "draw the metrics alone") from None
        if not isinstance(summary, dict):
            raise UserError(f"{spath} is not a JSON object; delete it to draw the metrics alone")
        # a run resumed after it finished and stopped early logs past its summary: the
        # summary's figures (first/last loss, held-out accuracy, peak) are of another step
        last = _step(m.steps[-1]) if m.steps else None
        if last is None or summary.get("steps") == last or m.unit == "round":
            m.summary = summary
        else:
            m.stale_summary = summary.get("steps")
    return m


def _round(rec: dict, steps: dict, evals: dict | None) -> None:
    """A fleet server's round record as an evaluation (the aggregate's held-out loss and
    accuracy; not where ``evals`` is None) and a step (the clients' mean last loss and their
    largest peak)."""
    r = rec.get("round")
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= _LIMIT:
        return
    if evals is not None:
        evals[(r, "val")] = {"step": r, "loss": rec.get("loss"), "accuracy": rec.get("accuracy")}
    fit = rec.get("fit")
    if isinstance(fit, dict):
        steps[r] = {"step": r, "loss": fit.get("loss_last"), "peak_rss": fit.get("peak_rss_max")}


def _series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = _num(r.get(key))
        if v is not None:
            xs.append(r["step"])
            ys.append(v / scale)
    return xs, ys


def _rank_stats(calibrations: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"step": [], "rx": [], "ry": [], "min": [], "max": []}
    for c in calibrations:
        ranks = c.get("ranks")
        if not isinstance(ranks, dict):
            continue
        rx, ry = [], []
        for v in ranks.values():
            if isinstance(v, list | tuple) and len(v) == 2 and all(_num(r) is not None
                                                                   for r in v):
                rx.append(float(v[0]))
                ry.append(float(v[1]))
        if not rx:
            continue
        out["step"].append(c["step"])
        out["rx"].append(sum(rx) / len(rx))
        out["ry"].append(sum(ry) / len(ry))
        out["min"].append(min(rx + ry))
        out["max"].append(max(rx + ry))
    return out


def _lost(m: Metrics) -> list:
    """The steps that logged a loss that is not a number (null is how the runtime writes a NaN
    or inf); not a batch without a labelled position (no loss)."""
    return [r["step"] for r in m.steps if "loss" in r and _num(r["loss"]) is None
            and not r.get("unlabelled")]


def _title(m: Metrics, run_name: str) -> str:
    s = m.summary or {}
    parts = [run_name]
    if isinstance(s.get("mode"), str):
        parts.append(f"mode {s['mode']}")
    if m.steps:  # (session 48 probe: a stopped, resumed or diverged run's title said none)
        parts.append(f"{_count(m)} {m.unit}s" + (" (not finished: stopped, failed or running)"
                                                 if m.unit == "step" and not s else ""))
    if isinstance(s.get("resumed_from"), int) and not isinstance(s["resumed_from"], bool):
        parts.append(f"resumed at step {s['resumed_from']}")
    if lost := _lost(m):
        parts.append(f"{len(lost)} non-finite loss{'es' if len(lost) > 1 else ''}")
    acc, before = _num(s.get("test_acc")), _num(s.get("test_acc_before"))
    if acc is not None:
        parts.append(f"held-out acc {before:.3f} → {acc:.3f}" if before is not None
                     else f"held-out acc {acc:.3f}")
    # the largest of the run's processes (session 39 probe: after a resume, the summary's is the
    # resumed process's alone, below the plotted peak before it)
    peaks = [v for v in (_num(r.get("peak_rss")) for r in [*m.steps, s]) if v is not None]
    peak = max(peaks) if peaks else None
    if peak is not None:
        budget = m.budget
        parts.append(f"peak {peak / _MB:.1f} MB" + (f" / budget {budget / _MB:.0f} MB"
                                                    if budget is not None else ""))
    # a folder name that is not UTF-8 shown by its bytes, a summary's lone surrogate escaped:
    # matplotlib's font code refused them (session 46 probe: a traceback for a run in 'lat\xe9n')
    return " · ".join(map(_shown, parts))


def _shown(text: str) -> str:
    try:  # a file name's undecodable bytes as \xNN
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # any other lone surrogate as \udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_report(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
    """Draw the run's metrics into ``out_png`` (default ``RUN/report.png``, which a new report
    replaces); returns its path. Another existing file is replaced only with ``overwrite``.

    Raises:
        UserError: everything :func:`read_metrics` raises, nothing to draw, matplotlib missing,
            an output that is not a .png, an existing file without ``overwrite``, an unwritable
            output.
    """
    run = Path(run_dir)
    folder = run.parent if run.is_file() else run
    out = Path(out_png) if out_png is not None else folder / "report.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the report is a PNG image; give a path ending in .png")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of a .png file")
    refuse_special(out)
    if (out.parent / "manifest.json").exists():  # (a session 45 probe: the PNG then blocked
        raise UserError(f"--out {out} is in a bundle folder, which holds the bundle's own "
                        "files only; give a path elsewhere (the default is RUN/report.png)")
    if out.exists() and not overwrite and out.resolve() != (folder / "report.png").resolve():
        raise UserError(f"--out {out} exists; pass --overwrite to replace it, or choose another "
                        "path")
    m = read_metrics(run_dir)
    loss = _series(m.steps, "loss")
    acc = _series(m.steps, "accuracy")
    ev_loss = _series(m.evals, "loss")
    ev_acc = _series(m.evals, "accuracy")
    rss = _series(m.steps, "rss", _MB)
    peak = _series(m.steps, "peak_rss", _MB)
    ranks = _rank_stats(m.calibrations)
    panels = []
    if loss[0] or acc[0] or ev_loss[0] or ev_acc[0]:
        panels.append("loss")
    if rss[0] or peak[0]:
        panels.append("memory")
    if ranks["step"]:
        panels.append("ranks")
    if not panels:
        raise UserError(f"{m.source} has no step, evaluation or calibration records with values "
                        "to draw")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the report needs matplotlib (workstation side); install it with "
                        "`pip install matplotlib`") from None

    fig = Figure(figsize=(11.0, 3.0 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    fig.suptitle(_title(m, folder.name or str(folder)), fontsize=10)
    for ax, panel in zip(axes, panels, strict=True):
        ax.grid(alpha=0.3)
        if panel == "loss":
            _draw_loss(ax, loss, acc, ev_loss, ev_acc, "clients' last loss (mean)"
                       if m.unit == "round" else "train loss")
        elif panel == "memory":
            _draw_memory(ax, m, rss, peak)
        else:
            _draw_ranks(ax, ranks, max((r["step"] for r in m.steps), default=0))
    axes[-1].set_xlabel(m.unit)
    if m.unit == "round":
        from matplotlib.ticker import MaxNLocator

        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    drop_dead_staging(out, "tmp", r"\.png")  # (a SIGKILLed report's: session 36 probe)
    tmp = out.with_name(f".{out.name[:100]}.tmp{os.getpid()}.png")  # (as drop_dead_staging)
    try:
        with warnings.catch_warnings():  # (a CJK or emoji run name: "Glyph 23383 missing
            warnings.filterwarnings("ignore", r"Glyph \d+", UserWarning)  # from font", session
            fig.savefig(tmp, dpi=110)  # 47 probe; the title shows a box for it)
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):  # (a read-only folder refuses the unlink too)
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}; pass another --out") \
            from None
    return out


def _draw_loss(ax, loss, acc, ev_loss, ev_acc, train_label: str = "train loss") -> None:
    handles = []
    if loss[0]:
        handles += ax.plot(*loss, color="tab:blue", lw=1.2, label=train_label)
    if ev_loss[0]:
        handles += ax.plot(*ev_loss, "o", color="tab:blue", mfc="white", label="held-out loss")
    ax.set_ylabel("loss")
    if acc[0] or ev_acc[0]:
        ax2 = ax.twinx()
        if acc[0]:
            handles += ax2.plot(*acc, color="tab:green", lw=1.0, alpha=0.7,
                                label="train accuracy")
        if ev_acc[0]:
            handles += ax2.plot(*ev_acc, "s", color="tab:green", mfc="white",
                                label="held-out accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.02)
    _legend(ax, handles, 1.09 if (acc[0] or ev_acc[0]) else 1.01)
    ax.set_title("loss and accuracy", fontsize=9, loc="left")


def _draw_memory(ax, m: Metrics, rss, peak) -> None:
    if rss[0]:
        ax.plot(*rss, color="tab:purple", lw=1.0, label="RSS after step")
    if peak[0]:
        ax.plot(*peak, color="tab:purple", lw=1.4, ls="--", label="largest client peak RSS"
                if m.unit == "round" else "peak RSS (running)")
    budget, predicted = m.budget, m.predicted_peak
    if budget is not None:
        ax.axhline(budget / _MB, color="tab:red", lw=1.5, label=f"budget {budget / _MB:.0f} MB")
    if predicted is not None:
        ax.axhline(predicted / _MB, color="tab:orange", lw=1.2, ls=":",
                   label=f"predicted peak {predicted / _MB:.1f} MB")
    measured = _num((m.summary or {}).get("peak_rss"))
    if measured is not None:
        ax.axhline(measured / _MB, color="grey", lw=0.8, ls="-.",
                   label=f"measured peak {measured / _MB:.1f} MB")
    ax.set_ylabel("MB")
    _legend(ax, ax.get_legend_handles_labels()[0])
    ax.set_title("resident memory (whole process)", fontsize=9, loc="left")


def _draw_ranks(ax, ranks: dict[str, list[float]], last_step: int) -> None:
    """Ranks hold from one calibration to the next (and to the last step): steps, not lines."""
    xs = list(ranks["step"])
    ext = {k: list(v) for k, v in ranks.items()}
    if last_step > xs[-1]:
        for k in ext:
            ext[k].append(ext[k][-1])
        ext["step"][-1] = last_step
    ax.fill_between(ext["step"], ext["min"], ext["max"], color="tab:cyan", alpha=0.2,
                    step="post", label="min-max over layers")
    for key, color, label in (("rx", "tab:cyan", "mean Rx"), ("ry", "tab:olive", "mean Ry")):
        ax.plot(ext["step"], ext[key], color=color, drawstyle="steps-post", label=label)
        ax.plot(xs, ranks[key], "o", color=color)
    ax.set_ylabel("rank")
    ax.set_ylim(bottom=0)
    _legend(ax, ax.get_legend_handles_labels()[0])
    ax.set_title("INSTANT ranks at each calibration", fontsize=9, loc="left")


def _legend(ax, handles: list, x: float = 1.01) -> None:
    """Outside the axes, on the right: it never hides a curve."""
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(x, 1.0), fontsize=8,
              frameon=False)


# ---------------------------------------------------------------------------- CLI
def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``report RUN [--out PNG]`` to the CLI; its handler is ``cmd_report`` (also set as
    the parser default ``handler``). Imports nothing heavy: matplotlib loads when it runs."""
    p = subparsers.add_parser("report", help="draw a run's loss, accuracy, memory and ranks "
                                             "to a PNG (workstation; needs matplotlib)")
    p.add_argument("run", help="a training run folder (train --out), holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/report.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (RUN/report.png is always replaced)")
    p.set_defaults(handler=cmd_report)
    return p


def _mean_of(records: list[dict], start: int | None = None) -> float | None:
    """The mean loss of consecutive steps (from step ``start`` where given); None where a step
    is missing (a long run logs one in 10, 100, ...) or a loss is not a number."""
    nums = [_step(r) for r in records]
    losses = [_num(r.get("loss")) for r in records]
    if (not records or None in nums or None in losses
            or nums != list(range(nums[0], nums[0] + len(nums)))
            or (start is not None and nums[0] != start)):
        return None
    return sum(losses) / len(losses)


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report and print one line per fact. Raises UserError (the CLI prints it)."""
    path = write_report(args.run, args.out, args.overwrite)
    m = read_metrics(args.run)
    line = f"report written to {path}"
    if m.steps:
        s = m.summary or {}
        first, last, k = (_num(s.get("loss_first")), _num(s.get("loss_last")),
                          s.get("loss_window"))
        if first is None or last is None or not isinstance(k, int):  # no summary: a stopped run
            first, last, k = _num(m.steps[0].get("loss")), _num(m.steps[-1].get("loss")), 1
        elif m.unit == "step":  # the logged steps' own means where they are all there (session
            means = _mean_of(m.steps[:k], 1), _mean_of(m.steps[-k:])  # 50 probe: an older
            first = first if means[0] is None else means[0]  # fleet client's summary held its
            last = last if means[1] is None else means[1]  # last round's first loss)
        if first is not None and last is not None:
            what = f"means of the first and last {k} steps" if k > 1 else \
                f"first and last {m.unit}" + (" (the clients' mean last loss)"
                                              if m.unit == "round" else "")
            line += f" ({_count(m)} {m.unit}s, loss {first:.4f} -> {last:.4f}, {what})"
    print(line.translate({c: f"\\x{c:02x}" for c in [*range(9), *range(10, 32)]}))  # (a path's
    if m.stale_summary is not None:  # control characters escaped, as the runtime's lines)
        print(f"note: summary.json is of step {str(m.stale_summary)[:20]} but metrics.jsonl goes "
              f"to step {_step(m.steps[-1])} (a resumed run that stopped early); it is left out")
    # (null is how the runtime writes a NaN or inf: a session 35 probe saw no note for it)
    if lost := _lost(m):
        print(f"note: {len(lost)} {m.unit}(s) logged a loss that is not a number within +-1e30 (NaN, "
              f"inf or an overflow; the first at step {lost[0]}) and are left out of the loss "
              "curve")
    if m.other_data:
        print(f"note: {m.other_data} earlier round evaluation(s) were on other data than the "
              "last rounds' (a server resumed with another --data) and are left out")
    if m.torn_last_line:
        print("note: the last line of metrics.jsonl was cut short (the run was killed while "
              "writing it) and is left out")
    return 0
