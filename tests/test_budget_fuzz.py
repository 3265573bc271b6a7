"""The budget holds on workloads it was not tuned on (random draws), and does not creep.

Memory is measured from outside: the parent polls the child's ``/proc/PID/status``.
The fuzz sample in the default tier is small and fixed-seed; the >= 50-workload run is
``pytest -m slow tests/test_budget_fuzz.py`` (or ``python -m benchmarks.budget_fuzz``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.memory import proc_status

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.budget_fuzz import fuzz  # noqa: E402

MB = 1_000_000
FAILED = ("over", "refused-then-failed", "error")


def _check(records: list[dict]) -> None:
    bad = [r for r in records if r["result"] in FAILED]
    assert not bad, json.dumps(bad, indent=1)
    for r in records:  # within budget, or refused up front and then within the stated minimum
        assert r["peak"] <= r["budget"], r


def test_budget_fuzz_small_sample():
    """Two random workloads (fixed seed): each trains within a budget drawn between its stated
    minimum and its unplanned exact peak, or is refused up front with a minimum that then holds.
    The seed's second workload is a ``--saved-int8`` bundle (x̂ planned at 1 byte per element)."""
    records = fuzz(2, seed=3, log=lambda *_: None)
    assert any(r["saved_int8"] for r in records), records
    _check(records)


@pytest.mark.slow
def test_budget_fuzz_fifty_workloads():
    _check(fuzz(50, seed=0))


def _rss_by_step(argv: list[str], metrics: Path, timeout: float) -> tuple[int, dict[int, int]]:
    """Run ``argv``; poll its VmRSS from outside every few ms and attribute each sample to the
    step the run is in (the last ``step`` record of ``metrics.jsonl`` + 1)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    by_step: dict[int, int] = {}
    step, seen = 0, 0
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv} ran past {timeout} s")
            rss = proc_status(proc.pid).get("VmRSS", 0)
            if metrics.exists():
                lines = metrics.read_text().splitlines()
                for ln in lines[seen:]:
                    try:
                        rec = json.loads(ln)
                    except ValueError:  # a line being written
                        break
                    seen += 1
                    if rec.get("kind") == "step":
                        step = rec["step"]
            by_step[step + 1] = max(by_step.get(step + 1, 0), rss)
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    return proc.returncode, by_step


def test_no_creep_over_500_steps(cnn_bundle, tmp_path):
    """500 steps with calibration every 50, evaluation every 100 and checkpoints every 100:
    the RSS peak of the last 100 steps is at most the first 100 steps' peak + 2 MB."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "runtime", "train", str(cnn_bundle), "--data", "digits",
            "--steps", "500", "--batch", "64", "--calib-every", "50", "--eval-every", "100",
            "--checkpoint-every", "100", "--budget", "200MB", "--threads", "2", "--no-progress",
            "--out", str(out)]
    _, by_step = _rss_by_step(argv, out / "metrics.jsonl", timeout=600)
    first = max(v for k, v in by_step.items() if 1 <= k <= 100)
    last = max(v for k, v in by_step.items() if 401 <= k <= 500)
    assert len([k for k in by_step if 401 <= k <= 500]) >= 50, sorted(by_step)[-5:]
    assert last <= first + 2 * MB, (first / MB, last / MB)
    assert json.loads((out / "summary.json").read_text())["peak_rss"] <= 200 * MB
