"""Memory-budget tests: real subprocess runs, measured whole-process peak RSS (VmHWM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from devices.planner import SAFETY, BudgetError, LayerSpec, MemoryModel, make_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from seqdata import make_sequences  # noqa: E402

MB = 1_000_000
BATCH = 128


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """token-mlp (width 512, 4 layers, seq 128) on synthetic sequences, batch 128."""
    from export import export_bundle

    root = tmp_path_factory.mktemp("budget")
    bundle = export_bundle("token-mlp", root / "token-mlp")
    x, y = make_sequences(3 * BATCH)
    xt, yt = make_sequences(BATCH, seed=1)
    data = root / "seq.npz"
    np.savez(data, x=x, y=y, x_test=xt, y_test=yt)
    return bundle, data


def _train(cli, bundle, data, out, *extra):
    r = cli("train", bundle, "--data", data, "--batch", BATCH, "--lr", "3e-3",
            "--calib-batches", "2", "--threads", "2", "--no-progress", "--out", out, *extra,
            timeout=300)
    summary = json.loads((Path(out) / "summary.json").read_text()) if r.returncode == 0 else None
    return r, summary


@pytest.mark.parametrize("budget_mb", [200, 256])
def test_peak_stays_within_budget_and_loss_decreases(cli, workload, tmp_path, budget_mb):
    bundle, data = workload
    r, s = _train(cli, bundle, data, tmp_path / "run", "--steps", "10",
                  "--budget", f"{budget_mb}MB")
    assert r.returncode == 0, r.stderr
    assert s["peak_rss"] <= budget_mb * MB, s
    assert s["budget"] == budget_mb * MB
    assert s["loss_last"] < s["loss_first"], s
    assert f"budget {budget_mb} MB: predicted peak" in r.stdout


def test_vanilla_at_the_same_batch_does_not_fit_that_budget(cli, workload, tmp_path):
    """Makes the budget tests mean something: unplanned exact training peaks above 256 MB."""
    bundle, data = workload
    r, s = _train(cli, bundle, data, tmp_path / "run", "--steps", "2", "--mode", "vanilla")
    assert r.returncode == 0, r.stderr
    assert s["peak_rss"] > 256 * MB, s


def test_infeasible_budget_is_refused_up_front_with_the_minimum(cli, workload, tmp_path):
    bundle, data = workload
    r, _ = _train(cli, bundle, data, tmp_path / "run", "--steps", "2", "--budget", "100MB")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: budget 100 MB is below the minimum")
    assert "raise --budget to at least" in lines[0]
    assert not (tmp_path / "run" / "params.npz").exists()  # nothing trained, nothing written


def test_budget_syntax_errors(cli, workload, tmp_path):
    bundle, data = workload
    for bad in ("256", "256XB", "-1MB"):
        r, _ = _train(cli, bundle, data, tmp_path / "run", "--steps", "1", f"--budget={bad}")
        assert r.returncode == 2 and "invalid size" in r.stderr, (bad, r.stderr)


def test_custom_profile_supplies_the_budget(cli, workload, tmp_path):
    bundle, data = workload
    prof = tmp_path / "board.toml"
    prof.write_text('''name = "board"
description = "test board"
arch = "x86_64"
ram = "1GiB"
cores = 2
execution_providers = ["CPUExecutionProvider"]
fp16 = false
gflops = 10.0
default_threads = 2
default_budget = "280MB"
''')
    r, s = _train(cli, bundle, data, tmp_path / "run", "--steps", "3", "--profile", prof)
    assert r.returncode == 0, r.stderr
    assert s["budget"] == 280 * MB and s["peak_rss"] <= 280 * MB


# ---- the planner itself (pure) ------------------------------------------------------------

def _model(**kw):
    base = dict(idle=100 * MB, static=10 * MB, fixed=5 * MB, per_sample_other=1 * MB,
                calib_fixed=5 * MB, calib_per_sample=2 * MB)
    base.update(kw)
    return MemoryModel(**base)


def test_planner_picks_the_largest_micro_batch_that_fits():
    plan = make_plan(_model(), 200 * MB, 128, [])
    assert plan.predicted_peak <= SAFETY * 200 * MB
    assert _model().step_peak(plan.micro_batch + 1, 0) > SAFETY * 200 * MB or plan.micro_batch == 128
    assert plan.calib_micro_batch <= plan.micro_batch
    assert _model().calib_peak(plan.calib_micro_batch) <= SAFETY * 200 * MB


def test_planner_lowers_ranks_only_when_micro_batch_one_does_not_fit():
    big = LayerSpec("a", 4 * 1000, (0.5, 0.3, 0.1, 0.05, 0.05), 5)
    cheap = LayerSpec("b", 4 * 10, (0.9, 0.1), 2)
    roomy = make_plan(_model(), 400 * MB, 8, [big, cheap])
    assert roomy.ranks == {"a": 5, "b": 2}
    m = _model(per_sample_other=0, fixed=0, static=0, calib_fixed=0, calib_per_sample=0,
               idle=int(SAFETY * 100 * MB) - 12_000)
    tight = make_plan(m, 100 * MB, 1, [big, cheap])
    assert tight.micro_batch == 1 and tight.ranks["a"] < 5 and tight.ranks["b"] == 2
    assert tight.predicted_peak <= SAFETY * 100 * MB


def test_planner_refuses_with_the_minimum():
    with pytest.raises(BudgetError, match=r"below the minimum \d+ MB"):
        make_plan(_model(), 100 * MB, 32, [])
