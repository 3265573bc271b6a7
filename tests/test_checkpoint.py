"""Crash-safe training: SIGKILL at random points and ``--resume`` end bit-identical to an
uninterrupted run (``--threads 1``); SIGINT/SIGTERM checkpoint and exit 130/143; a failed or
corrupt checkpoint never costs the previous good one; non-finite losses are skipped, then stop."""

from __future__ import annotations

import errno
import io
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_trainer

from devices.planner import Plan
from runtime.bundle import open_bundle
from runtime.checkpoint import Checkpointer, write_npz
from runtime.config import RunConfig
from runtime.data import Dataset, load_data
from runtime.errors import UserError
from runtime.run import train
from runtime.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
QUIET = ("--data", "digits", "--batch", 32, "--no-progress", "--threads", 1)


def _params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), f"parameter {k} differs"


def latest_step(out: Path) -> int:
    """Newest step named by the pointer file (-1: none yet). The pointer is replaced atomically,
    so a read sees either the old or the new one."""
    try:
        return json.loads((out / "checkpoints" / "latest").read_text())["checkpoints"][0]["step"]
    except (OSError, ValueError):
        return -1


def start(bundle: Path, out: Path, *args: object) -> subprocess.Popen:
    argv = [sys.executable, "-m", "runtime", "train", str(bundle), "--out", str(out),
            *map(str, QUIET), *map(str, args)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint_after(proc: subprocess.Popen, out: Path, step: int,
                              timeout: float = 60) -> bool:
    """True once the pointer names a step past ``step``; False if the process exited first."""
    t0 = time.monotonic()
    while latest_step(out) <= step:
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.002)
    return True


def kill_and_resume(bundle: Path, out: Path, args: tuple, seed: int, kills: int = 4) -> list[int]:
    """SIGKILL the run at random points (the first one during start-up, before any checkpoint),
    resume until it completes; returns the steps the resumed runs started from."""
    rnd = random.Random(seed)
    resumed_from: list[int] = []
    for i in range(kills):
        step = latest_step(out)
        resumed_from.append(step)
        proc = start(bundle, out, *args, "--resume")
        if i == 0:
            time.sleep(rnd.uniform(0.05, 0.2))  # inside imports / bundle loading
        elif wait_for_checkpoint_after(proc, out, step):
            time.sleep(rnd.uniform(0.0, 0.05))  # mid-step, mid-calibration or mid-write
        proc.kill()
        proc.communicate()
    proc = start(bundle, out, *args, "--resume")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return resumed_from


@pytest.mark.parametrize("mode", ["vanilla", "instant"])
def test_sigkill_at_random_points_then_resume_is_bit_identical(mode, mlp_bundle, cnn_bundle,
                                                               tmp_path) -> None:
    bundle = mlp_bundle if mode == "vanilla" else cnn_bundle
    steps = 300 if mode == "vanilla" else 120
    # calibration windows of 3 steps every 7: some checkpoints fall inside a window
    args = ("--mode", mode, "--steps", steps, "--checkpoint-every", 6, "--calib-every", 7,
            "--calib-batches", 3, "--lr", 3e-3)
    ref = start(bundle, tmp_path / "ref", *args)
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    out = tmp_path / "killed"
    resumed = kill_and_resume(bundle, out, args, seed=1 if mode == "vanilla" else 2)
    assert any(0 < s < steps for s in resumed), resumed  # resumed mid-run at least once
    assert_same_params(out / "params.npz", tmp_path / "ref" / "params.npz")
    ref_sum = json.loads((tmp_path / "ref" / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    for key in ("loss_first", "loss_last", "train_acc", "test_acc", "test_acc_before",
                "calibrations", "ranks"):
        assert got[key] == ref_sum[key], key
    if mode == "instant":
        assert got["calibrations"] == 1 + (steps - 3) // 7  # every window that ended


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_after_the_step_and_exits_128_plus_signal(sig, mlp_bundle,
                                                                     tmp_path) -> None:
    out = tmp_path / "run"
    proc = start(mlp_bundle, out, "--mode", "vanilla", "--steps", 10**6,
                 "--checkpoint-every", 100)
    assert wait_for_checkpoint_after(proc, out, -1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {sig.name} after step "), lines
    step = latest_step(out)
    assert f"after step {step}; checkpoint " in lines[0] and "--resume" in lines[0]
    b = open_bundle(mlp_bundle)
    _, meta = Checkpointer(out / "checkpoints", b).load()
    assert meta["step"] == step == meta["trainer"]["step_count"]


# ------------------------------------------------------------------------- Python API runs
def _trainer(bundle: Path, mode: str = "vanilla", seed: int = 0) -> Trainer:
    return make_trainer(bundle, mode=mode, lr=3e-3, seed=seed)


def _train(bundle: Path, out: Path | None, steps: int, seed: int = 0, checkpoint_writer=None,
           **cfg):
    b = open_bundle(bundle)
    tr = _trainer(bundle, seed=seed)
    s = train(tr, load_data("digits", b), RunConfig(steps=steps, progress=False, **cfg), out,
              writer=checkpoint_writer)
    return tr, s


def half_then_full_disk(fail_on: int):
    """A writer that works ``fail_on - 1`` times, then writes half the file and raises ENOSPC."""
    calls = 0

    def writer(path: Path, arrays: dict[str, np.ndarray]) -> None:
        nonlocal calls
        calls += 1
        if calls < fail_on:
            return write_npz(path, arrays)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        path.write_bytes(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return writer


def test_failed_write_keeps_the_last_good_checkpoint(mlp_bundle, tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write checkpoint .*ckpt-000030\.npz: No space "
                                        r"left on device; the last good checkpoint "
                                        r".*ckpt-000020\.npz is intact"):
        _train(mlp_bundle, out, 50, checkpoint_every=10, checkpoint_writer=half_then_full_disk(3))
    folder = out / "checkpoints"
    assert sorted(f.name for f in folder.iterdir()) == ["ckpt-000010.npz", "ckpt-000020.npz",
                                                        "latest"]  # no half-written file left
    _, meta = Checkpointer(folder, open_bundle(mlp_bundle)).load()
    assert meta["step"] == 20
    # ... and resuming from it completes the run exactly as if nothing had happened.
    tr, s = _train(mlp_bundle, out, 50, checkpoint_every=10, resume=True)
    assert s.resumed_from == 20
    _, ref = _train(mlp_bundle, tmp_path / "ref", 50, checkpoint_every=10)
    assert_same_params(out / "params.npz", tmp_path / "ref" / "params.npz")


def test_final_params_write_is_atomic(mlp_bundle, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10)
    before = (out / "params.npz").read_bytes()
    import runtime.trainer

    monkeypatch.setattr(runtime.trainer, "write_npz", half_then_full_disk(1))
    with pytest.raises(OSError, match="No space left"):
        _train(mlp_bundle, out, 20)
    assert (out / "params.npz").read_bytes() == before  # the previous weights, untouched
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]


def test_resume_keeps_the_guard_shrunk_micro_batch(mlp_bundle, tmp_path) -> None:
    out = tmp_path / "run"
    b = open_bundle(mlp_bundle)
    tr = _trainer(mlp_bundle)
    tr.use_plan(Plan(micro_batch=8, calib_micro_batch=4))  # as a budget guard leaves them
    train(tr, load_data("digits", b), RunConfig(steps=10, progress=False), out)
    again = _trainer(mlp_bundle)
    again.use_plan(Plan(micro_batch=16))  # the new run's plan: the smaller saved value wins
    train(again, load_data("digits", b), RunConfig(steps=20, progress=False, resume=True), out)
    assert (again.plan.micro_batch, again.plan.calib_micro_batch) == (8, 4)


def test_unwritable_checkpoint_folder_is_one_error_line(cli, mlp_bundle, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    proc = cli("train", mlp_bundle, "--out", out, *QUIET, "--mode", "vanilla", "--steps", 20,
               "--checkpoint-every", 10)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write checkpoints to "), lines
    assert "it is a file" in lines[0]
    assert not (out / "params.npz").exists()  # refused before the first step


def test_full_disk_during_training_is_one_error_line(mlp_bundle, tmp_path) -> None:
    """A checkpoint write that fails mid-run (disk full) ends in one error naming the last good
    checkpoint (or none)."""
    with pytest.raises(UserError, match="no earlier checkpoint exists"):
        _train(mlp_bundle, tmp_path / "run", 20, checkpoint_every=10,
               checkpoint_writer=half_then_full_disk(1))


def test_corrupt_latest_falls_back_to_the_previous_one(mlp_bundle, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 30, checkpoint_every=10)
    newest = out / "checkpoints" / "ckpt-000030.npz"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    capsys.readouterr()
    _, s = _train(mlp_bundle, out, 30, checkpoint_every=10, resume=True)
    err = capsys.readouterr().err
    assert "ckpt-000030.npz is unusable (SHA-256 differs" in err
    assert "resuming from" in err and "ckpt-000020.npz (step 20)" in err
    assert s.resumed_from == 20
    _train(mlp_bundle, tmp_path / "ref", 30, checkpoint_every=10)
    assert_same_params(out / "params.npz", tmp_path / "ref" / "params.npz")


def test_unreadable_pointer_uses_the_newest_checkpoint_that_loads(mlp_bundle, tmp_path,
                                                                  capsys) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 20, checkpoint_every=10)
    (out / "checkpoints" / "latest").write_text('{"checkpoints": [')
    (out / "checkpoints" / "ckpt-000020.npz").write_bytes(b"PK\x03\x04 truncated")
    _, meta = Checkpointer(out / "checkpoints", open_bundle(mlp_bundle)).load()
    assert meta["step"] == 10
    assert "pointer" in capsys.readouterr().err


def test_resume_with_another_bundle_is_refused(cli, mlp_bundle, cnn_bundle, tmp_path) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10)
    proc = cli("train", cnn_bundle, "--out", out, *QUIET, "--steps", 20, "--resume")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "was written for another bundle" in lines[0], lines


def test_resume_with_another_seed_is_refused(mlp_bundle, tmp_path) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10)
    with pytest.raises(UserError, match=r"seed 0 \(this run: 1\)"):
        _train(mlp_bundle, out, 20, seed=1, resume=True)


# ------------------------------------------------------------------------- non-finite losses
class NaNBatches(Dataset):
    """Digits whose ``take`` returns NaN inputs on the given calls (= steps, in vanilla mode
    without a test split: nothing else reads batches)."""

    def __init__(self, base: Dataset, bad: set[int]) -> None:
        super().__init__("nan-digits", base.x, base.y)
        self.bad, self.calls = bad, 0

    def take(self, idx):
        self.calls += 1
        x, y = super().take(idx)
        if self.calls in self.bad:
            x = {k: np.full_like(v, np.nan) for k, v in x.items()}
        return x, y


def test_non_finite_loss_skips_the_update_and_warns(mlp_bundle, capsys) -> None:
    b = open_bundle(mlp_bundle)
    tr = _trainer(mlp_bundle)
    s = train(tr, NaNBatches(load_data("digits", b), {3, 4, 9}),
              RunConfig(steps=12, progress=False))
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if "non-finite" in ln] == [
        f"warning: non-finite loss or gradient (nan) at step {i}; skipped the update"
        for i in (3, 4, 9)]
    assert tr.step_count == 12 and tr.optimizer.t == 9
    assert all(np.isfinite(v).all() for v in tr.params.values())
    assert np.isfinite(s.loss_last)


def test_persistent_non_finite_loss_stops(mlp_bundle) -> None:
    b = open_bundle(mlp_bundle)
    with pytest.raises(UserError, match=r"non-finite loss for 5 consecutive steps \(up to step 9\)"):
        train(_trainer(mlp_bundle), NaNBatches(load_data("digits", b), set(range(5, 100))),
              RunConfig(steps=50, progress=False))


def test_pointer_never_leads_outside_the_folder(mlp_bundle, tmp_path):
    """``latest`` naming a file outside the checkpoints folder is not followed (the newest
    checkpoint file of the folder is used instead)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not yours")
    (folder / "latest").write_text(json.dumps(
        {"checkpoints": [{"file": "../secret.bin", "sha256": "0" * 64, "bytes": 9, "step": 1}]}))
    ck = Checkpointer(folder, open_bundle(mlp_bundle))
    assert ck.entries() == []
    assert ck.load() is None  # no checkpoint file of its own: nothing to resume
