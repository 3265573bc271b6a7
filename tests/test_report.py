"""``instant-runtime report``: metrics.jsonl (+ summary.json) of a run drawn to a PNG."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from contract.errors import UserError

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")


def _load_report():
    """export/report.py loaded by path: ``import export.report`` would run export/__init__,
    which imports onnx and the exporter (the report needs neither)."""
    spec = importlib.util.spec_from_file_location("export_report", REPO / "export" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


report = _load_report()


def _records(steps: int = 40, calib_every: int = 10) -> list[dict]:
    rng = np.random.default_rng(0)
    recs: list[dict] = [{"kind": "plan", "budget": 256_000_000, "predicted_peak": 225_000_000,
                         "micro_batch": 11}]
    for s in range(1, steps + 1):
        if s % calib_every == 1:
            ranks = {f"layer{i}": [int(rng.integers(4, 30)), int(rng.integers(4, 30))]
                     for i in range(4)}
            recs.append({"kind": "calibration", "step": s, "seconds": 1.5, "ranks": ranks})
        recs.append({"kind": "step", "step": s, "loss": 2.0 / s ** 0.3,
                     "accuracy": min(1.0, 0.1 + s / 50), "lr": 1e-3, "step_s": 0.5,
                     "rss": 150_000_000 + int(rng.integers(0, 40_000_000)),
                     "peak_rss": 200_000_000 + s * 100_000})
        if s % 20 == 0:
            recs.append({"kind": "eval", "step": s, "split": "val", "loss": 1.0 / s ** 0.2,
                         "accuracy": 0.5 + s / 100})
    return recs


def _write_run(folder: Path, recs: list[dict], summary: dict | None = None,
               tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


SUMMARY = {"mode": "instant", "steps": 40, "test_acc": 0.75, "test_acc_before": 0.58,
           "peak_rss": 227_100_000, "idle_rss": 161_400_000, "budget": 256_000_000,
           "predicted_peak": 225_000_000}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_full_report_three_panels(tmp_path):
    run = _write_run(tmp_path / "run", _records(), SUMMARY)
    out = report.write_report(run, tmp_path / "out" / "report.png")
    w, h = _png_size(out)
    assert w > 800 and h > 900  # three stacked panels
    assert not list((tmp_path / "out").glob(".*tmp*"))  # written via a temporary name
    m = report.read_metrics(run)
    assert len(m.steps) == 40 and len(m.evals) == 2 and len(m.calibrations) == 4
    assert m.budget == 256_000_000 and m.predicted_peak == 225_000_000
    # the default output is RUN/report.png
    assert report.write_report(run) == run / "report.png" and (run / "report.png").is_file()


def test_a_run_folder_named_in_no_utf_8_is_drawn(tmp_path):
    """Session 46 probe: a run in 'lat\\xe9n' (Latin-1 bytes) ended `report` in a traceback from
    matplotlib's font code; the name is drawn by its bytes, a summary's lone surrogate escaped."""
    run = _write_run(tmp_path / os.fsdecode(b"lat\xe9n"), _records(),
                     {**SUMMARY, "mode": "inst\ud800nt"})
    assert report._title(report.read_metrics(run), run.name).startswith("lat\\xe9n · mode "
                                                                         "inst\\ud800nt")
    w, _ = _png_size(report.write_report(run, tmp_path / "out.png"))
    assert w > 800


def test_a_run_named_in_glyphs_the_font_lacks_is_drawn_without_warnings(tmp_path, recwarn):
    """Session 47 probe: a run named 漢字 or with an emoji printed matplotlib's two-line "Glyph
    23383 missing from font(s) DejaVu Sans" warning with our report's source line."""
    run = _write_run(tmp_path / "漢字😀", _records(), SUMMARY)
    assert _png_size(report.write_report(run, tmp_path / "out.png"))[0] > 800
    assert not [w for w in recwarn if "Glyph" in str(w.message)], [str(w.message)
                                                                  for w in recwarn]


def test_partial_metrics_draw_what_is_present(tmp_path):
    only_loss = [{"kind": "step", "step": s, "loss": 1.0 / s} for s in range(1, 6)]
    out = report.write_report(_write_run(tmp_path / "a", only_loss), tmp_path / "a.png")
    w, h = _png_size(out)
    assert h < 500  # one panel
    only_calib = [{"kind": "calibration", "step": 1, "ranks": {"l": [3, 4]}}]
    assert report.write_report(_write_run(tmp_path / "b", only_calib), tmp_path / "b.png")
    no_budget = [{"kind": "step", "step": 1, "loss": 1.0, "accuracy": None, "rss": 1e8,
                  "peak_rss": 1.2e8}]
    assert report.write_report(_write_run(tmp_path / "c", no_budget), tmp_path / "c.png")
    # the metrics file itself may be passed
    assert report.write_report(tmp_path / "a" / "metrics.jsonl", tmp_path / "d.png")
    # values no run writes (a tampered file) are left out, not drawn (was: matplotlib's
    # "arange: cannot compute length" traceback at +-1e308)
    extreme = [{"kind": "step", "step": 1, "loss": 1.0}, {"kind": "step", "step": 2, "loss": 1e308},
               {"kind": "step", "step": 3, "loss": -1e308}, {"kind": "step", "step": 10**400,
                                                             "loss": 2.0},
               {"kind": "step", "step": 4, "loss": 10**400}]
    assert report.write_report(_write_run(tmp_path / "e", extreme), tmp_path / "e.png")


def test_resumed_run_last_record_wins_and_torn_tail_skipped(tmp_path):
    recs = [{"kind": "step", "step": s, "loss": 1.0} for s in range(1, 11)]
    recs += [{"kind": "plan", "budget": None, "predicted_peak": 9e7}]
    recs += [{"kind": "step", "step": s, "loss": 0.5} for s in range(6, 13)]  # resumed at 5
    run = _write_run(tmp_path / "run", recs, tail='{"kind": "step", "step": 13, "lo')
    m = report.read_metrics(run)
    assert [r["step"] for r in m.steps] == list(range(1, 13))
    assert [r["loss"] for r in m.steps] == [1.0] * 5 + [0.5] * 7
    assert m.torn_last_line and m.budget is None and m.predicted_peak == 9e7
    assert report.write_report(run).is_file()
    # the title's peak is the run's largest, not the resumed process's alone (session 39 probe)
    recs = [{"kind": "step", "step": s, "loss": 1.0, "peak_rss": 175_600_000} for s in (1, 2)]
    recs += [{"kind": "step", "step": s, "loss": 0.5, "peak_rss": 170_000_000} for s in (3, 4)]
    run = _write_run(tmp_path / "run2", recs, summary={"steps": 4, "peak_rss": 174_200_000})
    assert "peak 175.6 MB" in report._title(report.read_metrics(run), "run2")


def test_the_title_says_a_run_is_unfinished_resumed_or_has_non_finite_losses(tmp_path):
    """Session 48 probe: the image of a run stopped at step 212 of 1500 said "212 steps", of a
    resumed run nothing of its resume, and of a diverged run nothing (its curve just ended)."""
    recs = [{"kind": "step", "step": s, "loss": 1.0} for s in range(1, 5)]
    title = report._title(report.read_metrics(_write_run(tmp_path / "a", recs)), "a")
    assert "4 steps (not finished: stopped, failed or running)" in title, title
    run = _write_run(tmp_path / "b", recs, summary={"steps": 4, "resumed_from": 2})
    title = report._title(report.read_metrics(run), "b")
    assert "4 steps · resumed at step 2" in title and "not finished" not in title, title
    recs += [{"kind": "step", "step": s, "loss": None} for s in (5, 6)]
    title = report._title(report.read_metrics(_write_run(tmp_path / "c", recs)), "c")
    assert "2 non-finite losses" in title, title
    run = _write_run(tmp_path / "d", recs[:4], summary={"steps": 4, "resumed_from": None})
    title = report._title(report.read_metrics(run), "d")
    assert "resumed" not in title and "non-finite" not in title and "not finished" not in title


def test_a_summary_of_another_step_is_left_out(tmp_path, capsys):
    """A finished run resumed for more steps and stopped early: metrics.jsonl goes past the
    summary.json of its first end, whose figures (first and last loss, held-out accuracy, peak)
    are of another step: left out and said (was: printed and drawn as the run's)."""
    run = _write_run(tmp_path / "run", _records(60), {**SUMMARY, "loss_first": 2.0,
                                                      "loss_last": 0.9, "loss_window": 4})
    m = report.read_metrics(run)
    assert m.summary is None and m.stale_summary == 40
    assert report.cmd_report(argparse.Namespace(run=str(run), out=None, overwrite=False)) == 0
    out = capsys.readouterr().out
    assert "60 steps, loss 2.0000 -> 0.5856" in out and "0.9000" not in out, out
    assert "summary.json is of step 40 but metrics.jsonl goes to step 60" in out, out
    _write_run(tmp_path / "whole", _records(40), SUMMARY)
    assert report.read_metrics(tmp_path / "whole").summary == SUMMARY


def test_losses_left_out_of_the_curve_are_said(tmp_path, capsys):
    """A diverged run logs NaN, inf or 1e300 losses (the runtime writes null for NaN and inf;
    a session 35 probe: no note for those; json writes NaN / Infinity): the curve leaves them
    out, and the report says how many and from which step (was: silently)."""
    recs = _records(20)
    for r in recs:
        if r.get("kind") == "step" and r["step"] in (7, 9, 12, 14, 16):
            r["loss"] = {7: float("nan"), 9: float("inf"), 12: 1e300, 14: None,
                         16: None}[r["step"]]
            if r["step"] == 16:  # a batch without a labelled position: skipped, not diverged
                r["unlabelled"] = True
    run = _write_run(tmp_path / "run", recs)
    assert report.cmd_report(argparse.Namespace(run=str(run), out=None, overwrite=False)) == 0
    out = capsys.readouterr().out
    assert "4 step(s) logged a loss that is not a number within +-1e30" in out, out
    assert "the first at step 7" in out, out
    _write_run(tmp_path / "fine", _records(20))
    assert report.cmd_report(argparse.Namespace(run=str(tmp_path / "fine"), out=None,
                                                overwrite=False)) == 0
    assert "not a number" not in capsys.readouterr().out


def test_a_long_runs_thinned_log_counts_its_steps(tmp_path, capsys):
    """Past 10,000 steps metrics.jsonl keeps one step line in 10 (runtime/run_log.py): the
    report counts the run's steps, not its lines (a session 36 probe's 17,000-step run was
    "10700 steps")."""
    from runtime.run_log import step_logged

    recs = [{"kind": "step", "step": s, "loss": 1.0 / s} for s in range(1, 17_001)
            if step_logged(s)]
    assert len(recs) == 10_700
    run = _write_run(tmp_path / "run", recs)
    assert report.cmd_report(argparse.Namespace(run=str(run), out=None, overwrite=False)) == 0
    assert "(17000 steps, loss" in capsys.readouterr().out
    assert report._title(report.read_metrics(run), "run").count("17000 steps") == 1


@pytest.mark.parametrize("case,match", [
    ("no_run", r"run '.*' not found"),
    ("no_metrics", r"has no metrics.jsonl; pass the --out folder"),
    ("empty", r"holds no records \(empty file\)"),
    ("corrupt", r"line 2 is not valid JSON .*corrupt"),
    ("not_object", r"line 1 is not a JSON object"),
    ("nothing_to_draw", r"no step, evaluation or calibration records"),
    ("bad_summary", r"summary.json is unreadable or corrupt"),
    ("linked_metrics", r"metrics.jsonl is a symbolic link"),
    ("linked_summary", r"summary.json is a symbolic link"),
    ("huge_summary", r"summary.json has more than 1 MiB"),
    # session 28 probe: "has no metrics.jsonl" and "(empty file)" for these
    ("fifo_metrics", r"metrics.jsonl is not a regular file"),
    ("one_garbage_line", r"holds no records \(5000 bytes without one complete JSON line\)"),
    # session 45 probe: a run's params.npz was read as its metrics ("delete that line")
    ("weights_file", r"params.npz is a file, not a run folder; pass the --out folder"),
])
def test_bad_runs_are_one_line_errors(tmp_path, case, match):
    run = tmp_path / "run"
    if case == "no_metrics":
        run.mkdir()
    elif case == "empty":
        _write_run(run, [])
    elif case == "corrupt":
        _write_run(run, [{"kind": "step", "step": 1, "loss": 1.0}], tail="garbage\n{}\n")
    elif case == "not_object":
        _write_run(run, [[1, 2]])
    elif case == "nothing_to_draw":
        _write_run(run, [{"kind": "plan", "budget": 1}, {"kind": "step", "step": 1}])
    elif case == "bad_summary":
        _write_run(run, _records(3))
        (run / "summary.json").write_text("{not json")
    elif case == "linked_metrics":  # a run from elsewhere: the link may lead anywhere
        _write_run(tmp_path / "elsewhere", _records(3))
        run.mkdir()
        (run / "metrics.jsonl").symlink_to(tmp_path / "elsewhere" / "metrics.jsonl")
    elif case == "linked_summary":
        _write_run(tmp_path / "elsewhere", _records(3), SUMMARY)
        _write_run(run, _records(3))
        (run / "summary.json").symlink_to(tmp_path / "elsewhere" / "summary.json")
    elif case == "huge_summary":
        _write_run(run, _records(3))
        (run / "summary.json").write_text(json.dumps({"class_names": ["x" * 10] * 200_000}))
    elif case == "fifo_metrics":
        run.mkdir()
        os.mkfifo(run / "metrics.jsonl")
    elif case == "one_garbage_line":
        run.mkdir()
        (run / "metrics.jsonl").write_bytes(b"x" * 5000)
    elif case == "weights_file":
        _write_run(tmp_path / "trained", _records(3))
        run = tmp_path / "trained" / "params.npz"
        run.write_bytes(b"PK\x03\x04 weights")
    with pytest.raises(UserError, match=match) as e:
        report.write_report(run, tmp_path / "r.png")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r.png").exists()


def test_the_report_replaces_no_other_file(tmp_path):
    """A PNG only: --out at a run's params.npz, metrics.jsonl or a text file is refused (the
    report once overwrote them); an existing .png only with ``overwrite``; the default
    RUN/report.png is always redrawn. Nothing refused is touched."""
    run = _write_run(tmp_path / "run", _records(12), SUMMARY)
    (run / "params.npz").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "old.png").write_bytes(b"old")
    before = {p: p.read_bytes() for p in (run / "params.npz", run / "metrics.jsonl",
                                          tmp_path / "notes.txt", tmp_path / "old.png")}
    for out, match in ((run / "params.npz", "give a path ending in .png"),
                       (run / "metrics.jsonl", "give a path ending in .png"),
                       (tmp_path / "notes.txt", "give a path ending in .png"),
                       (tmp_path / "old.png", "exists; pass --overwrite")):
        with pytest.raises(UserError, match=match):
            report.write_report(run, out)
    assert {p: p.read_bytes() for p in before} == before
    assert report.write_report(run, tmp_path / "old.png", overwrite=True) == tmp_path / "old.png"
    assert _png_size(tmp_path / "old.png")
    assert report.write_report(run) == run / "report.png"
    assert report.write_report(run, run / "report.png") == run / "report.png"
    bundle = tmp_path / "bundle"  # (session 45 probe: a PNG there blocked `export --overwrite`)
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="is in a bundle folder.*give a path elsewhere"):
        report.write_report(run, bundle / "report.png")
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json"]


def test_cli_helper(tmp_path, capsys):
    run = _write_run(tmp_path / "run", _records(12), SUMMARY)
    ap = argparse.ArgumentParser(prog="instant-runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    report.add_report_parser(sub)
    args = ap.parse_args(["report", str(run), "--out", str(tmp_path / "r.png")])
    assert args.handler is report.cmd_report
    assert args.handler(args) == 0
    assert (tmp_path / "r.png").is_file()
    out = capsys.readouterr().out
    assert "report written to" in out and "12 steps" in out


def test_building_the_parser_imports_no_matplotlib():
    code = f"""
import argparse, importlib.util, sys
spec = importlib.util.spec_from_file_location("r", {str(REPO / "export" / "report.py")!r})
mod = importlib.util.module_from_spec(spec); sys.modules["r"] = mod; spec.loader.exec_module(mod)
mod.add_report_parser(argparse.ArgumentParser().add_subparsers())
bad = [m for m in ("matplotlib", "torch", "onnx") if m in sys.modules]
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-1000:]


def test_a_metrics_file_past_the_limit_names_how_to_draw_its_end(tmp_path):
    """Session 50 probe: older runtimes logged every step, so a long run's metrics.jsonl passed
    1 GiB and was refused as "not a run's metrics" with no way out. The refusal names a way
    that draws its last part (the file here is sparse: no disk is used)."""
    run = tmp_path / "old run"
    run.mkdir()
    with open(run / "metrics.jsonl", "wb") as f:
        f.truncate(report.MAX_METRICS_BYTES + 1)
    with pytest.raises(UserError, match=r"more than this runtime's runs write \(older ones logged "
                                        r"every step\); draw its last part: tail -n 200000 "
                                        r"'.*old run/metrics.jsonl' > last.jsonl, then "
                                        r"instant-runtime report last.jsonl"):
        report.read_metrics(run)
    with open(tmp_path / "last.jsonl", "w") as f:  # the way out reads such a part
        f.writelines(json.dumps(r) + "\n" for r in _records())
    assert report.read_metrics(tmp_path / "last.jsonl").steps


def test_the_printed_loss_means_are_the_logged_steps(tmp_path, capsys):
    """Session 50 probe: an older runtime's fleet client wrote each round's own first loss to
    summary.json, and `report` printed it as the run's ("2.2016 -> 2.0989" where its first two
    logged steps averaged 2.3086). The means come from the logged steps where they are all
    there; the summary's where a step is missing (a long run logs one in 10, 100, ...)."""
    recs = _records(steps=20)
    losses = [r["loss"] for r in recs if r["kind"] == "step"]
    run = _write_run(tmp_path / "run", recs, {"steps": 20, "loss_first": 9.0, "loss_last": 8.0,
                                              "loss_window": 2})
    assert report.cmd_report(argparse.Namespace(run=str(run), out=None, overwrite=False)) == 0
    want = f"loss {np.mean(losses[:2]):.4f} -> {np.mean(losses[-2:]):.4f}, means of the first"
    assert want in capsys.readouterr().out
    thinned = [r for r in recs if r["kind"] != "step" or r["step"] % 2 == 0]  # (2, 4, ... 20)
    run = _write_run(tmp_path / "thin", thinned, {"steps": 20, "loss_first": 9.0,
                                                  "loss_last": 8.0, "loss_window": 2})
    assert report.cmd_report(argparse.Namespace(run=str(run), out=None, overwrite=False)) == 0
    assert "loss 9.0000 -> 8.0000, means of the first and last 2 steps" in \
        capsys.readouterr().out
