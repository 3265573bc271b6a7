"""Crash-safe training: SIGKILL at random points and ``--resume`` end bit-identical to an
uninterrupted run (``--threads 1``); SIGINT/SIGTERM checkpoint and exit 130/143 (before training
began: the folder put back as it was); a failed or corrupt checkpoint never costs the previous
good one, and a damaged one is one error naming it; non-finite losses are skipped, then stop;
non-finite weights stop at once."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import make_trainer

from contract import file_sha256
from devices.planner import Plan
from runtime.bundle import open_bundle
from runtime.checkpoint import Checkpointer, bundle_sha256, write_npz
from runtime.config import OptimConfig, RunConfig
from runtime.data import Dataset, load_data
from runtime.errors import UserError
from runtime.run import Metrics, RunFolder, train
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
    # SIGHUP as a terminal gives it (the tests send it), whether or not the tests run under nohup
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP,
                                                                        signal.SIG_DFL))


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
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


def test_under_nohup_a_hang_up_leaves_the_run_going(mlp_bundle, tmp_path) -> None:
    """SIGHUP stops a run with a checkpoint, unless it was started ignoring it (nohup: the
    user asked for the run to outlive the terminal; a review of session 24)."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "runtime", "train", str(mlp_bundle), "--out", str(out),
            *map(str, QUIET), "--mode", "vanilla", "--steps", str(10**6),
            "--checkpoint-every", "100"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP,
                                                                        signal.SIG_IGN))
    try:
        assert wait_for_checkpoint_after(proc, out, -1)
        proc.send_signal(signal.SIGHUP)
        step = latest_step(out)
        assert wait_for_checkpoint_after(proc, out, step + 200), proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
        proc.communicate()


def test_a_stalled_output_pipe_neither_holds_the_run_nor_its_stop(mlp_bundle, tmp_path) -> None:
    """A session-24 probe (`train ... 2>&1 | sleep 60`): once the pipe was full the progress
    bar's write blocked, the trainer sat in it through SIGTERM, SIGTERM and SIGINT, then died
    of the broken pipe 178 steps after its last checkpoint. Output the pipe cannot take is now
    dropped (runtime/console.py): the run trains on and stops on SIGTERM with a checkpoint."""
    out = tmp_path / "run"
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "train", str(mlp_bundle), "--out",
                             str(out), "--data", "digits", "--mode", "vanilla", "--threads", "1",
                             "--steps", str(10**6), "--checkpoint-every", "50"],
                            cwd=REPO, stdout=w, stderr=w)
    try:
        assert wait_for_checkpoint_after(proc, out, -1)
        # nobody reads: fill what the pipe has left, through a descriptor of its own (O_NONBLOCK
        # on w would be the trainer's too: they share one open file description)
        fill = os.open(f"/proc/self/fd/{w}", os.O_WRONLY | os.O_NONBLOCK)
        for size in (4096, 64, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(fill, b"x" * size)
        os.close(fill)
        time.sleep(2.0)  # progress refreshes (every 0.5 s) meet the full pipe
        assert wait_for_checkpoint_after(proc, out, latest_step(out), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        assert latest_step(out) > 100
    finally:
        proc.kill()
        proc.wait()
        os.close(r)
        os.close(w)


def test_a_run_with_stdout_and_stderr_closed_exits_as_it_ended(mlp_bundle, tmp_path) -> None:
    """Session 46 probe: with stdout or stderr closed (`>&-`, as a supervisor may start it) the
    run trained, then its final flush raised: exit 1 and a traceback (and a refusal exited 1,
    not 2)."""
    base = (f"{shlex.quote(sys.executable)} -m runtime train {shlex.quote(str(mlp_bundle))} "
            "--data digits --steps 3 --no-progress --threads 1 --out ")
    for extra, code in (("", 0), (" --lr -5", 2)):
        out = tmp_path / f"run{code}"
        r = subprocess.run(["sh", "-c", f"{base}{shlex.quote(str(out))}{extra} >&- 2>&-"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == code and (out / "params.npz").exists() == (code == 0), r
    r = subprocess.run(["sh", "-c", f"{sys.executable} -m runtime eval {mlp_bundle} --weights "
                        f"{tmp_path / 'run0'} --data digits >&-"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r


def test_a_stop_before_an_overwrite_began_does_not_offer_the_old_runs_checkpoint(
        mlp_bundle, tmp_path) -> None:
    """Session 46 probe: `train --overwrite` stopped while its data loaded said "the run's newest
    checkpoint is ...: continue from it with --resume" of the old run, which it had not touched
    (and a --resume with the new options was then refused)."""
    from types import SimpleNamespace

    from runtime.cli import _interrupted

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "runtime", "train", str(mlp_bundle), "--data",
                        "digits", "--steps", "5", "--no-progress", "--threads", "1", "--out",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    args = SimpleNamespace(cmd="train", out=str(out), bundle=str(mlp_bundle), overwrite=True)
    assert _interrupted(args) == f"interrupted before training began; '{out}' is as it was"
    args.overwrite = False  # (a run of its own stopped: its checkpoint is the way on)
    assert "ckpt-000005.npz: continue from it with --resume" in _interrupted(args)


# ------------------------------------------------------------------------- Python API runs
def _trainer(bundle: Path, mode: str = "vanilla", seed: int = 0) -> Trainer:
    return make_trainer(bundle, mode=mode, lr=3e-3, seed=seed)


def _train(bundle: Path, out: Path | None, steps: int, seed: int = 0, checkpoint_writer=None,
           mode: str = "vanilla", **cfg):
    b = open_bundle(bundle)
    tr = _trainer(bundle, mode=mode, seed=seed)
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


def test_a_full_disk_in_the_metrics_log_names_the_checkpoint_and_resume_logs_each_step_once(
        mlp_bundle, tmp_path, monkeypatch) -> None:
    """metrics.jsonl filling the disk ended the run with 'No space left on device' alone (no
    file, no checkpoint); its half-written last line then had the resumed run's first line
    written onto it (`report` refused the file), and the steps logged after the checkpoint
    were logged twice (also after a SIGKILL)."""
    import runtime.run_log

    out = tmp_path / "run"
    real_write, lines = os.write, [0]

    def full_after_25_steps(fd: int, data: bytes) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            return real_write(fd, data)
        lines[0] += 1
        if b'"step"' in data and lines[0] > 26:  # the plan, 25 steps, then half a line
            real_write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(runtime.run_log.os, "write", full_after_25_steps)
    with pytest.raises(UserError, match=r"cannot write '.*metrics\.jsonl': No space left on "
                                        r"device; the last good checkpoint .*ckpt-000020\.npz is "
                                        r"intact: free space and --resume"):
        _train(mlp_bundle, out, 40, checkpoint_every=10)
    monkeypatch.undo()
    text = (out / "metrics.jsonl").read_bytes()
    assert not text.endswith(b"\n")  # the half line a full disk leaves
    _, s = _train(mlp_bundle, out, 40, checkpoint_every=10, resume=True)
    assert s.resumed_from == 20
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps == list(range(1, 41)), steps
    _train(mlp_bundle, tmp_path / "ref", 40, checkpoint_every=10)
    assert_same_params(out / "params.npz", tmp_path / "ref" / "params.npz")


def test_final_params_write_is_atomic(mlp_bundle, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10)
    before = (out / "params.npz").read_bytes()
    import runtime.trainer

    monkeypatch.setattr(runtime.trainer, "write_npz", half_then_full_disk(1))
    # named: the file (not its temporary name) and the checkpoint a --resume finishes from
    with pytest.raises(UserError, match=r"cannot write '.*run/params\.npz' \(No space left on "
                                        r"device\); the last checkpoint .*ckpt-000020\.npz is "
                                        r"intact: .* --resume to finish"):
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


def test_a_step_repeated_after_the_arena_cap_restarts_sgd_momentum(mlp_bundle) -> None:
    """SGD's momentum takes the gradients straight from the backward (v = μv + λp, then + g per
    micro-batch). A step that ran into the arena's cap after one micro-batch, repeated at half
    the micro-batch, scaled v twice and kept the first micro-batch's gradient in it (an outside
    review's finding). The repeated step now starts from zeroed momentum, as after a
    non-finite step: the weights equal those of a run whose momentum was reset before a clean
    step at the smaller micro-batch."""
    from runtime.run import ShrinkGuard
    from runtime.trainer import ArenaExhausted, IndexBatch

    b = open_bundle(mlp_bundle)
    data = load_data("digits", b)
    first, second = IndexBatch(data, np.arange(16)), IndexBatch(data, np.arange(16, 32))

    def trainer() -> Trainer:
        tr = make_trainer(mlp_bundle, mode="vanilla", lr=0.05, optimizer="sgd")
        tr.use_plan(Plan(micro_batch=8, calib_micro_batch=8, eval_micro_batch=8,
                         arena_cap=1 << 40))
        tr.train_step(first)
        return tr

    hit = trainer()
    assert hit.fused
    real, calls = hit._micro_step, []

    def exhausted_once(*args):
        calls.append(1)
        if len(calls) == 2:  # the step's second micro-batch
            raise ArenaExhausted("training at micro-batch 8: (the test's cap)")
        return real(*args)

    hit._micro_step = exhausted_once
    lines = []
    ShrinkGuard(hit, lines.append).run(lambda: hit.train_step(second))
    assert hit.plan.micro_batch == 4 and len(calls) == 2 + 4, len(calls)
    assert "SGD momentum restarts from zero" in lines[0], lines

    ref = trainer()
    ref.optimizer.reset()
    ref.use_plan(ref.plan.with_micro_batch(4))
    ref.train_step(second)
    for k, p in ref.params.items():
        np.testing.assert_allclose(hit.params[k], p, rtol=1e-5, atol=1e-6, err_msg=k)
    # a run's trainer (its batch known) repeats at one part more per batch, not half
    # (session 39 probe: 11 of 32 went on at 5 where 8 fits)
    run = trainer()
    run.train_batch = 16
    calls.clear()
    real = run._micro_step
    run._micro_step = exhausted_once
    lines.clear()
    ShrinkGuard(run, lines.append).run(lambda: run.train_step(second))
    assert run.plan.micro_batch == 6 and "repeating at 6;" in lines[0], lines


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


def test_a_failed_write_names_what_is_left_and_the_right_way_out(mlp_bundle, tmp_path):
    """A folder where the checkpoint file goes, or a pointer made a folder: the error named a
    'last good checkpoint' that was that folder, or said none exists while four did, and told
    to free space."""
    b = open_bundle(mlp_bundle)
    folder = tmp_path / "checkpoints"
    ck = Checkpointer(folder, b)
    tr = _trainer(mlp_bundle)
    arrays, meta = tr.state()
    ck.save(2, arrays, meta)
    (folder / "ckpt-000004.npz").mkdir()  # in the way of the next one
    with pytest.raises(UserError) as e:
        ck.save(4, arrays, meta)
    msg = str(e.value)
    assert f"the last good checkpoint {folder / 'ckpt-000002.npz'} is intact" in msg, msg
    assert "free space" not in msg and "check what is in the way" in msg, msg
    (folder / "ckpt-000004.npz").rmdir()
    (folder / "latest").unlink()
    (folder / "latest").mkdir()  # the pointer cannot be read, nor written
    with pytest.raises(UserError) as e:
        ck.save(6, arrays, meta)
    msg = str(e.value)
    assert f"the checkpoint {folder / 'ckpt-000006.npz'} itself was written" in msg \
        and "no earlier checkpoint" not in msg, msg  # (it was: the newest file, step 2)


def test_a_checkpoint_being_read_is_not_pruned_under_its_reader(mlp_bundle, tmp_path):
    """Session 48 probe: `eval --weights RUN/checkpoints/latest` beside a run checkpointing
    every step failed 19 of 31 times ("cannot read parameters from ckpt-000139.npz: No such
    file"): the checkpoint it chose was pruned before it was read. What newest_intact chose
    is held (a shared lock) and the writer prunes it only once it is let go."""
    import runtime.checkpoint as ckpt
    from contract import release_bundles

    b = open_bundle(mlp_bundle)
    folder = tmp_path / "checkpoints"
    ck = Checkpointer(folder, b, keep=1)
    arrays, meta = _trainer(mlp_bundle).state()
    ck.save(1, arrays, meta)
    assert ckpt.newest_intact(folder) == (1, folder / "ckpt-000001.npz")  # a reader chose it
    try:
        for step in (2, 3):
            ck.save(step, arrays, meta)
        names = sorted(p.name for p in folder.glob("ckpt-*.npz"))
        assert names == ["ckpt-000001.npz", "ckpt-000003.npz"], names
        assert b.load_params(folder / "ckpt-000001.npz")  # the reader reads it whole
        ck.save(4, arrays, meta)  # and lets it go: pruned as any other
        assert sorted(p.name for p in folder.glob("ckpt-*.npz")) == ["ckpt-000004.npz"]
        # a reader that chose one and never read it holds it to its command's end
        assert ckpt.newest_intact(folder) == (4, folder / "ckpt-000004.npz")
        ck.save(5, arrays, meta)
        assert (folder / "ckpt-000004.npz").is_file()
    finally:
        release_bundles()
    ck.save(6, arrays, meta)
    assert sorted(p.name for p in folder.glob("ckpt-*.npz")) == ["ckpt-000006.npz"]


def test_a_pointer_entry_missing_or_leading_outside_is_said(mlp_bundle, tmp_path, capsys):
    """Session 49 probe: `eval --weights RUN` whose pointer names a checkpoint that is not there
    (or a file outside the folder, which is never opened) took an older one silently, where a
    resume says so. A file a run going on pruned (and took out of its pointer) is not said."""
    import runtime.checkpoint as ckpt
    from contract import release_bundles

    b = open_bundle(mlp_bundle)
    folder = tmp_path / "checkpoints"
    ck = Checkpointer(folder, b, keep=3)
    arrays, meta = _trainer(mlp_bundle).state()
    for step in (1, 2):
        ck.save(step, arrays, meta)
    pointer = folder / "latest"
    data = json.loads(pointer.read_text())
    try:
        capsys.readouterr()
        assert ckpt.newest_intact(folder) == (2, folder / "ckpt-000002.npz")
        assert capsys.readouterr().err == ""
        data["checkpoints"].insert(0, {"file": "ckpt-000009.npz", "sha256": "0" * 64})
        pointer.write_text(json.dumps(data))
        assert ckpt.newest_intact(folder) == (2, folder / "ckpt-000002.npz")
        err = capsys.readouterr().err
        assert f"checkpoint {folder / 'ckpt-000009.npz'}, named by the pointer, is missing; " \
            "skipped" in err, err
        data["checkpoints"][0]["file"] = "../outside/ckpt-000009.npz"
        pointer.write_text(json.dumps(data))
        assert ckpt.newest_intact(folder) == (2, folder / "ckpt-000002.npz")
        err = capsys.readouterr().err
        assert f"checkpoint pointer {pointer} is unreadable or names files outside its " \
            "folder; using the newest checkpoint that loads" in err, err
    finally:
        release_bundles()


@pytest.mark.parametrize("how", ["moved", "removed", "moved-as-written"])
def test_a_run_whose_folder_is_moved_or_removed_stops_instead_of_splitting(mlp_bundle,
                                                                           tmp_path, how):
    """Session 48 probe: a run whose folder was deleted made it again at its next checkpoint
    (no run.json, no log) and exited 0; one whose folder was renamed went on in a new folder,
    the run split in two. It stops with one error naming it, and the moved run resumes."""
    out, moved = tmp_path / "p" / "run", tmp_path / "q"
    calls = 0

    def writer(path: Path, arrays: dict[str, np.ndarray]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2 and how != "moved-as-written":
            shutil.rmtree(out.parent) if how == "removed" else out.parent.rename(moved)
        write_npz(path, arrays)
        if calls == 2 and how == "moved-as-written":
            out.parent.rename(moved)  # (between the file and its rename into place)

    with pytest.raises(UserError, match=r"the run folder '.*run' was removed or moved while "
                                        r"the run went on .*--resume --out") as e:
        _train(mlp_bundle, out, 40, checkpoint_every=10, checkpoint_writer=writer)
    assert "no earlier checkpoint" not in str(e.value)
    assert not out.parent.exists()  # not made again
    if how != "removed":
        assert (moved / "run" / "checkpoints" / "ckpt-000010.npz").is_file()
        _, s = _train(mlp_bundle, moved / "run", 40, checkpoint_every=10, resume=True)
        assert s.resumed_from == 10 and (moved / "run" / "params.npz").is_file()


def test_a_full_disk_in_an_overwrite_says_the_previous_run_is_back(cli, mlp_bundle, tmp_path):
    """The error named the new run's checkpoint as 'intact' after the failed --overwrite had
    removed it and put the previous run back."""
    out = tmp_path / "run"
    first = cli("train", mlp_bundle, "--out", out, *QUIET, "--mode", "vanilla", "--steps", 4)
    assert first.returncode == 0, first.stderr
    before = (out / "params.npz").read_bytes()
    code = (  # the second checkpoint write finds the disk full
        "import errno, os, sys, runtime.checkpoint as c\n"
        "calls, orig = [], c.write_npz\n"
        "def write(p, arrays):\n"
        "    calls.append(p)\n"
        "    if len(calls) >= 2:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    return orig(p, arrays)\n"
        "c.write_npz = write\n"
        "from runtime.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "train", str(mlp_bundle), "--out", str(out),
                        *map(str, QUIET), "--mode", "vanilla", "--steps", "20",
                        "--checkpoint-every", "5", "--overwrite"],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "No space left on device; this run's files were removed and the previous run in" \
        in lines[0] and "is intact" not in lines[0], lines[0]
    assert lines[0].endswith("free space, then run the same command again"), lines[0]
    assert (out / "params.npz").read_bytes() == before
    # without an --overwrite the way out is to make room and resume (session 43 probe: "pass
    # another --out" started from step 0)
    r = subprocess.run([sys.executable, "-c", code, "train", str(mlp_bundle), "--out",
                        str(tmp_path / "new"), *map(str, QUIET), "--mode", "vanilla", "--steps",
                        "20", "--checkpoint-every", "5"], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.strip().endswith("free space, then --resume"), \
        r.stderr[-2000:]


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


def test_a_packed_member_is_never_unpacked(mlp_bundle, tmp_path, capsys) -> None:
    """A checkpoint member that unpacks to 256 MB from 0.25 MB (a zip bomb; the pointer's
    SHA-256 updated to match) is refused before it is inflated (was: the whole member was read
    into memory first, 1.6 GB under --budget 200MB in a probe), and the resume falls back to
    the checkpoint before it."""
    import tracemalloc

    out = tmp_path / "run"
    _train(mlp_bundle, out, 20, checkpoint_every=10)
    newest = out / "checkpoints" / "ckpt-000020.npz"
    bomb = io.BytesIO()
    np.lib.format.write_array_header_1_0(bomb, {"descr": "|u1", "fortran_order": False,
                                               "shape": (256 << 20,)})
    with zipfile.ZipFile(newest, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("zzz.npy", "w", force_zip64=True) as f:
            f.write(bomb.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(256):
                f.write(zeros)
    pointer = out / "checkpoints" / "latest"
    data = json.loads(pointer.read_text())
    for e in data["checkpoints"]:
        if e["file"] == newest.name:
            e["sha256"], e["bytes"] = file_sha256(newest), newest.stat().st_size
    pointer.write_text(json.dumps(data))
    assert newest.stat().st_size < 2 << 20
    capsys.readouterr()
    tracemalloc.start()
    try:
        _, meta = Checkpointer(out / "checkpoints", open_bundle(mlp_bundle)).load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["step"] == 10
    assert "member 'zzz.npy' is compressed" in capsys.readouterr().err
    assert peak < 64 << 20, peak


def test_unreadable_pointer_uses_the_newest_checkpoint_that_loads(mlp_bundle, tmp_path,
                                                                  capsys) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 20, checkpoint_every=10)
    (out / "checkpoints" / "latest").write_text('{"checkpoints": [')
    (out / "checkpoints" / "ckpt-000020.npz").write_bytes(b"PK\x03\x04 truncated")
    _, meta = Checkpointer(out / "checkpoints", open_bundle(mlp_bundle)).load()
    assert meta["step"] == 10
    assert "pointer" in capsys.readouterr().err


def test_without_a_pointer_the_newest_checkpoint_is_by_step_past_a_million(mlp_bundle,
                                                                            tmp_path) -> None:
    """Checkpoint names are padded to 6 digits: past step 999,999 their text order is not their
    step order, and a resume with a damaged pointer took ckpt-999999 for the newest (an outside
    review); as does the hint of a damaged checkpoint, which named a later one as earlier."""
    b = open_bundle(mlp_bundle)
    folder = tmp_path / "checkpoints"
    arrays, meta = _trainer(mlp_bundle).state()
    ck = Checkpointer(folder, b)
    for step in (999_999, 1_000_000, 1_000_001):
        ck.save(step, arrays, {**meta, "step": step})
    (folder / "latest").write_text('{"checkpoints": [')
    again = Checkpointer(folder, b)
    _, loaded = again.load()
    assert loaded["step"] == 1_000_001 and again.loaded.name == "ckpt-1000001.npz"
    hint = str(again.damaged(ValueError("test")))
    assert f"delete it to resume from {folder / 'ckpt-1000000.npz'}" in hint, hint


def test_a_resume_that_starts_afresh_starts_the_metrics_afresh(mlp_bundle, tmp_path) -> None:
    """A session-24 probe: a run killed before its first checkpoint (or stopped by a full disk),
    then --resume (no checkpoint: it starts from step 0), kept the first attempt's
    metrics.jsonl: steps 1..N twice, and a torn half line glued to the new run's first line
    that `report` refused."""
    out = tmp_path / "run"
    out.mkdir()
    first = [json.dumps({"kind": "step", "step": k, "loss": 2.0}) for k in (1, 2, 3)]
    (out / "metrics.jsonl").write_text("\n".join(first) + '\n{"kind": "step", "st')
    _train(mlp_bundle, out, 5, resume=True, new_log=True)  # (as train's CLI runs it)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4, 5]


def test_a_finished_run_resumed_from_an_older_checkpoint_logs_each_step_once(cli, mlp_bundle,
                                                                              tmp_path):
    """Session 33 probe: a finished run whose last checkpoint was gone resumed (rightly) from
    an older one, but metrics.jsonl kept the steps after it twice, and the first run's final
    evaluation and summary in the middle: the cut scanned back from the end and stopped at the
    summary line (no step). Events of no step now go with the steps around them."""
    out = tmp_path / "run"
    first = cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 30,
                "--checkpoint-every", 10)
    assert first.returncode == 0, first.stderr
    (out / "checkpoints" / "ckpt-000030.npz").unlink()
    again = cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 50, "--resume")
    assert again.returncode == 0, again.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "step"] == list(range(1, 51))
    assert [e["kind"] for e in events].count("summary") == 1 and events[-1]["kind"] == "summary"
    assert [e["step"] for e in events if e["kind"] == "eval"] == [50], events


def test_a_run_resumes_on_the_same_model_exported_again(cli, tmp_path) -> None:
    """Session 33 probe: exporting the same model again into the bundle folder (graphs and
    weights byte-identical, only the manifest's export time new) left its run impossible to
    resume: "a run of another bundle", with no way out. The identity leaves out when and from
    what the export ran; a bundle exported again with other settings is still refused, and
    the message says the folder was exported again. eval and export-model accept the run."""
    bundle, out = tmp_path / "b", tmp_path / "run"

    def export(*extra) -> None:
        r = cli("export", "--model", "mlp", "--out", bundle, "--overwrite", *extra)
        assert r.returncode == 0, r.stderr

    export()
    assert cli("train", bundle, "--out", out, *QUIET, "--steps", 4).returncode == 0
    before = json.loads((bundle / "manifest.json").read_text())
    time.sleep(1.1)  # (the manifest's export time is to the second)
    export()
    assert json.loads((bundle / "manifest.json").read_text())["created"] != before["created"]
    again = cli("train", bundle, "--out", out, *QUIET, "--steps", 8, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resum" in again.stdout + again.stderr and "another bundle" not in again.stderr
    scored = cli("eval", bundle, "--weights", out, "--data", "digits", "--threads", 1)
    assert scored.returncode == 0 and "another bundle" not in scored.stderr, scored.stderr
    export("--instant-exclude", "4")  # other settings, other graphs: another bundle
    other = cli("train", bundle, "--out", out, *QUIET, "--steps", 12, "--resume")
    assert other.returncode == 2, other.stderr
    assert "this bundle folder was exported again since" in other.stderr, other.stderr


def test_resume_with_another_bundle_is_refused(cli, mlp_bundle, cnn_bundle, tmp_path) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10)
    proc = cli("train", cnn_bundle, "--out", out, *QUIET, "--steps", 20, "--resume")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "was written for another bundle" in lines[0], lines
    # a CLI run (its run.json) resumed with another bundle whose classes differ: refused as
    # another bundle's run before its data is read (session 39 probe: "run.json: class_names
    # holds 3 names for a 10-class model; put back the run's own run.json")
    cli_run = tmp_path / "cli_run"
    r = cli("train", mlp_bundle, "--out", cli_run, *QUIET, "--steps", 2)
    assert r.returncode == 0, r.stderr
    run_json = json.loads((cli_run / "run.json").read_text())
    run_json["class_names"] = ["a", "b", "c"]  # (as a 3-class model's run records them)
    (cli_run / "run.json").write_text(json.dumps(run_json))
    proc = cli("train", cnn_bundle, "--out", cli_run, *QUIET, "--steps", 4, "--resume")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == [
        f"error: --out '{cli_run}' holds a run of another bundle ('{mlp_bundle}'); resume it "
        "with that bundle, or pass another --out"], lines


def test_resume_with_another_seed_is_refused(mlp_bundle, tmp_path) -> None:
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10)
    with pytest.raises(UserError, match=r"seed 0 \(this run: 1\)"):
        _train(mlp_bundle, out, 20, seed=1, resume=True)


def test_a_resume_without_the_runs_val_split_names_it(cli, mlp_bundle, tmp_path) -> None:
    """A run trained with --val-split resumed without it: the error named "n 160 (this run:
    200)" and the way out left --val-split unsaid (a first-time user's probe)."""
    out, data = tmp_path / "run", tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((200, 64)).astype(np.float32),
             y=rng.integers(0, 10, 200))
    common = ("train", mlp_bundle, "--out", out, "--data", data, "--no-progress", "--threads", 1)
    assert cli(*common, "--steps", 2, "--val-split", 0.2).returncode == 0
    proc = cli(*common, "--steps", 4, "--resume")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "training rows 160 (this run: 200)" in lines[0], lines
    assert "--val-split" in lines[0], lines


def test_a_resume_with_other_held_out_data_is_refused(cli, mlp_bundle, tmp_path) -> None:
    """Session 41 probe: a run started with --val A resumed with --val B printed "held-out
    accuracy 0.200 (before 0.100)", the two measured on different rows, and resumed without
    --val it evaluated nothing; both are another run's figures, refused in one line."""
    rng = np.random.default_rng(0)
    for name, rows in (("train", 200), ("a", 40), ("b", 10)):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((rows, 64)).astype(np.float32),
                 y=rng.integers(0, 10, rows))
    out = tmp_path / "run"
    base = ["--data", tmp_path / "train.npz", "--batch", 16, "--no-progress", "--threads", 1,
            "--out", out]
    first = cli("train", mlp_bundle, *base, "--val", tmp_path / "a.npz", "--steps", 4)
    assert first.returncode == 0, first.stderr
    for val in (["--val", tmp_path / "b.npz"], []):
        r = cli("train", mlp_bundle, *base, *val, "--steps", 6, "--resume")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and \
            "checkpoint was written with other held-out data" in lines[0], (val, r.stderr)
    # refused before the budget's planning probes, as other options are (session 42)
    for data, val, says in (("train", "b", "other held-out data"),
                            ("b", "a", "training rows 200 (this run: 10)")):
        r = cli("train", mlp_bundle, *base, "--data", tmp_path / f"{data}.npz", "--val",
                tmp_path / f"{val}.npz", "--steps", 6, "--resume", "--budget", "300MB")
        assert r.returncode == 2 and says in r.stderr and "plan for budget" not in r.stdout, \
            (data, val, r.stdout, r.stderr)
    r = cli("train", mlp_bundle, *base, "--val", tmp_path / "a.npz", "--steps", 6, "--resume")
    assert r.returncode == 0 and "resumed from step 4" in r.stdout + r.stderr, r.stderr


def test_resume_with_other_data_or_options_is_refused(cli, mlp_bundle, tmp_path) -> None:
    """A resume continues the same run or is refused in one line: another .npz of as many rows
    (reversed, relabelled) and a changed --lr or INSTANT option were resumed silently, and the
    losses then differed from the uninterrupted run's."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 64)).astype(np.float32), rng.integers(0, 10, 200)
    files = {"a": (x, y), "reversed": (x[::-1], y[::-1]), "relabelled": (x, y % 3)}
    for name, (xs, ys) in files.items():
        np.savez(tmp_path / f"{name}.npz", x=xs, y=ys)
    out = tmp_path / "run"
    base = ["--batch", 16, "--lr", 0.01, "--no-progress", "--threads", 1, "--out", out]
    first = cli("train", mlp_bundle, "--data", tmp_path / "a.npz", "--steps", 4, *base)
    assert first.returncode == 0, first.stderr

    def as_written_before(arrays, meta):  # the default decay was written as None
        meta["trainer"]["settings"]["--weight-decay"] = None

    rewrite_checkpoint(out / "checkpoints" / "ckpt-000004.npz", as_written_before)
    for data, extra, says in (
            ("reversed", [], "checkpoint was written for other data"),
            ("relabelled", [], "checkpoint was written for other data"),
            ("a", ["--lr", 0.02], "--lr 0.01 (this run: 0.02)"),
            ("a", ["--energy", 0.5], "--energy 0.95 (this run: 0.5)"),
            ("a", ["--weight-decay", 0.1], "--weight-decay 0.01 (this run: 0.1)"),
            # (session 33 probe: an option left to its default was said as Python's None)
            ("a", ["--max-rank", 4], "--max-rank its default (this run: 4)")):
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        r = cli("train", mlp_bundle, "--data", tmp_path / f"{data}.npz", "--steps", 6, *base,
                *extra, "--resume")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (data, r.stderr)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # AdamW's default decay given explicitly is the same run (it was refused as "None")
    r = cli("train", mlp_bundle, "--data", tmp_path / "a.npz", "--steps", 6, *base, "--resume",
            "--weight-decay", 0.01)
    assert r.returncode == 0 and "resumed from step 4" in r.stdout + r.stderr, r.stderr


def test_a_resumed_run_prices_its_ranks_at_their_micro_batch(cli, mlp_bundle, tmp_path):
    """The FLOP table after a resume with no calibration in it: the ranks were priced for one
    sample (12.39 where the run itself printed 0.986; compressed ranks: --variance)."""
    out = tmp_path / "run"
    base = ["--batch", 16, "--lr", 0.01, "--calib-every", 100, "--no-progress", "--threads", 1,
            "--data", "digits", "--out", out, "--variance", 0.99]

    def ratio(r):
        assert r.returncode == 0, r.stderr[-1500:]
        return re.search(r"backward FLOP ratio instant/vanilla = ([\d.]+)", r.stdout)[1]

    first = ratio(cli("train", mlp_bundle, "--steps", 4, *base))
    assert ratio(cli("train", mlp_bundle, "--steps", 6, *base, "--resume")) == first


def test_a_resume_repeats_whether_variance_was_given(cli, mlp_bundle, tmp_path):
    """A given --variance turns off the exact start of small layers (runtime/ranks.py:
    starts_exact), so adding or dropping it on a resume is another run, refused in one line,
    even at the default value; a checkpoint written before the exact start existed (no such
    record) resumes as it did."""
    base = ["--data", "digits", "--batch", 16, "--no-progress", "--threads", 1]
    for first, then, says in (([], ["--variance", 0.99], "--variance left out (this run gives it)"),
                              (["--variance", 0.99], [], "--variance 0.99 (this run: left out)")):
        out = tmp_path / f"run{len(first)}"
        ok = cli("train", mlp_bundle, "--steps", 2, *base, *first, "--out", out)
        assert ok.returncode == 0, ok.stderr
        r = cli("train", mlp_bundle, "--steps", 3, *base, *then, "--out", out, "--resume")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr

    def as_written_before(arrays, meta):
        del meta["trainer"]["exact_when_small"], meta["trainer"]["exact_start"]

    rewrite_checkpoint(tmp_path / "run0" / "checkpoints" / "ckpt-000002.npz", as_written_before)
    r = cli("train", mlp_bundle, "--steps", 3, *base, "--out", tmp_path / "run0", "--resume")
    assert r.returncode == 0 and "resumed from step 2" in r.stdout + r.stderr, r.stderr


# ------------------------------------------------------------------------- non-finite losses
class NaNBatches(Dataset):
    """Digits whose ``take`` returns NaN inputs on the given calls (= steps, in vanilla mode
    without a test split: nothing else reads batches)."""

    def __init__(self, base: Dataset, bad: set[int]) -> None:
        super().__init__("nan-digits", base.x, base.y)
        self.bad, self.calls = bad, 0

    def take(self, idx):
        if len(idx) <= 3:  # the run's data fingerprint (runtime/run.py), not a step
            return super().take(idx)
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
        f"warning: non-finite loss (nan) at step {i}; skipped the update"
        for i in (3, 4, 9)]
    assert tr.step_count == 12 and tr.optimizer.t == 9
    assert all(np.isfinite(v).all() for v in tr.params.values())
    assert np.isfinite(s.loss_last)


def test_persistent_non_finite_loss_stops(mlp_bundle) -> None:
    b = open_bundle(mlp_bundle)
    with pytest.raises(UserError, match=r"non-finite loss or gradient for 5 consecutive steps "
                                        r"\(up to step 9\)"):
        train(_trainer(mlp_bundle), NaNBatches(load_data("digits", b), set(range(5, 100))),
              RunConfig(steps=50, progress=False))


def test_a_non_finite_streak_writes_no_checkpoint_and_names_the_one_before_it(mlp_bundle,
                                                                               tmp_path):
    """Checkpoints written during a non-finite streak (weights ~1e30 after --lr 1e30: finite,
    but every loss NaN) were named "last good" and resumed or exported as a NaN model, and the
    way out (resume with a lower --lr) is refused by the resume. None is written during a
    streak; the error names the one before it and says to start again; the streak's last step
    has its metrics line."""
    b = open_bundle(mlp_bundle)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^non-finite loss or gradient for 5 consecutive steps "
                                        r"\(up to step 9\); the last good checkpoint is "
                                        r".*ckpt-000004\.npz \(the last with finite weights: "
                                        r"its loss may already be large\); lower --lr \(or "
                                        r"check the data\) "
                                        r"and start again with --overwrite$"):
        train(_trainer(mlp_bundle), NaNBatches(load_data("digits", b), set(range(5, 100))),
              RunConfig(steps=50, checkpoint_every=2, progress=False), out)
    assert latest_step(out) == 4
    steps = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 10)) and steps[-1]["loss"] is None


def test_a_run_whose_every_step_was_skipped_fails_and_blames_the_data(mlp_bundle, tmp_path):
    """Session 31 probe: 4 steps, all non-finite (fewer than --max-nonfinite), ended exit 0 with
    "trained weights" holding the bundle's own, and a fleet round of them was averaged in as if
    it had trained; a streak from the first step, before any update, was told to lower --lr
    (1e-30 too). Both now stop; the way out names the data, not --lr."""
    b = open_bundle(mlp_bundle)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^every step of this run \(4\) had a non-finite loss or "
                                        r"gradient: no update was applied; no checkpoint was "
                                        r"written before them; no update was applied, so --lr is "
                                        r"not the cause: the data's values \(inputs or targets\) "
                                        r"are too large"):
        train(_trainer(mlp_bundle), NaNBatches(load_data("digits", b), set(range(1, 100))),
              RunConfig(steps=4, progress=False), out)
    assert not (out / "params.npz").exists()
    with pytest.raises(UserError, match=r"^non-finite loss or gradient for 5 consecutive steps "
                                        r"\(up to step 5\); no checkpoint was written before them; "
                                        r"no update was applied, so --lr is not the cause"):
        train(_trainer(mlp_bundle), NaNBatches(load_data("digits", b), set(range(1, 100))),
              RunConfig(steps=9, progress=False))
    # after finite steps a streak is the learning rate's, as before
    with pytest.raises(UserError, match=r"\(up to step 6\); no checkpoint was written before "
                                        r"them; lower --lr \(or check the data\)"):
        train(_trainer(mlp_bundle), NaNBatches(load_data("digits", b), set(range(2, 100))),
              RunConfig(steps=9, progress=False))


def test_a_run_from_weights_too_large_for_float32_names_them(mlp_bundle, tmp_path, cli):
    """Session 50 probe: --init-from weights of ~1e28 (an older runtime's diverged run) made
    every step non-finite, and the way out blamed the digits data and said to start again with
    --overwrite, which failed the same way. Calibration's message and the steps' now name the
    weights and another way."""
    with np.load(mlp_bundle / "params.npz") as z:
        np.savez(tmp_path / "huge.npz", **{k: (z[k] * 1e28).astype(np.float32) for k in z.files})
    r = cli("train", mlp_bundle, "--data", "digits", "--init-from", tmp_path / "huge.npz",
            "--steps", 3, "--no-progress", "--threads", 1, "--out", tmp_path / "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"weights it started from (--init-from {tmp_path / 'huge.npz'})" in r.stderr
    assert "start from other weights (another --init-from, or none)" in r.stderr, r.stderr
    r = cli("train", mlp_bundle, "--data", "digits", "--init-from", tmp_path / "huge.npz",
            "--steps", 3, "--no-progress", "--threads", 1, "--out", tmp_path / "run",
            "--mode", "vanilla", "--overwrite")  # (the steps' message; above: calibration's)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no update was applied, so --lr is not the cause: the weights it started from" \
        in r.stderr and "another --init-from, or none" in r.stderr, r.stderr
    r = cli("train", mlp_bundle, "--data", "digits", "--steps", 3, "--no-progress",
            "--threads", 1, "--out", tmp_path / "run", "--overwrite")  # the way out works
    assert r.returncode == 0, r.stderr


def test_adamw_moments_of_a_gradient_past_float32s_square_root_resume(mlp_bundle, tmp_path,
                                                                      cli):
    """Session 31 probe: inputs of 1e20 (accepted data) gave finite gradients whose squares
    overflowed AdamW's second moment to inf; the run finished, but every checkpoint held the
    inf and each --resume refused them all as damaged. The moment now stops at float32's
    largest value (the update, m/√v, is ~0 either way)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "big.npz", x=rng.normal(size=(200, 64)).astype(np.float32) * 1e20,
             y=rng.integers(0, 10, 200))
    args = ("train", mlp_bundle, "--data", tmp_path / "big.npz", "--batch", 16,
            "--optimizer", "adamw", "--mode", "vanilla", "--checkpoint-every", 3,
            "--out", tmp_path / "run", "--no-progress", "--threads", 1)
    r = cli(*args, "--steps", 6)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "run" / "checkpoints" / "ckpt-000006.npz") as z:
        moments = [k for k in z.files if k.endswith("/v")]
        assert moments and all(np.isfinite(z[k]).all() for k in moments)
        assert max(float(z[k].max()) for k in moments) > 1e38  # the case: g² overflowed
    r = cli(*args, "--steps", 9, "--resume")
    assert r.returncode == 0, r.stderr


def test_skipped_steps_are_reported_in_the_summary(mlp_bundle, tmp_path, capsys):
    """--max-nonfinite 100 with 9 of 10 steps skipped ended "loss 2.3050 -> 2.3050", rc 0, as
    if it had trained: the summary line and summary.json give the count."""
    b = open_bundle(mlp_bundle)
    tr = _trainer(mlp_bundle)
    s = train(tr, NaNBatches(load_data("digits", b), {3, 4, 9}),
              RunConfig(steps=12, progress=False), tmp_path / "run")
    assert s.skipped == 3
    assert s.lines(tr)[0].endswith("; 3 of them skipped (non-finite loss or gradient: no update)")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped"] == 3
    capsys.readouterr()


def test_a_non_finite_gradient_is_named_and_weight_decay_in_the_way_out(mlp_bundle, capsys):
    """--weight-decay 1e38 (SGD) overflows the gradient while the loss is finite: the warning
    said "non-finite loss or gradient (2.31)" and the error blamed --lr alone."""
    b = open_bundle(mlp_bundle)
    tr = Trainer(b, replace(_trainer(mlp_bundle).config,
                            optim=OptimConfig(name="sgd", lr=1e-3, weight_decay=1e38)), Plan())
    with pytest.raises(UserError, match=r"; no checkpoint was written before them; no update "
                                        r"was applied, so --lr is not the cause: lower "
                                        r"--weight-decay \(SGD adds it to the gradient\) or "
                                        r"scale the data's values"):
        train(tr, load_data("digits", b), RunConfig(steps=10, max_nonfinite=2, progress=False))
    err = capsys.readouterr().err
    assert re.search(r"^warning: non-finite gradient \(loss \d+\.\d{4}\) at step 1; skipped the "
                     r"update$", err, re.M), err


def test_a_failed_overwrite_names_the_restored_run_not_its_own_checkpoint(mlp_bundle, tmp_path,
                                                                          cli):
    """A run that diverged after --overwrite is removed and the old run put back; its error
    named its own checkpoint, gone with it. It says the previous run is back, and its way out
    (a lower --lr, --overwrite) runs."""
    out = tmp_path / "run"
    args = ("train", mlp_bundle, "--out", out, *QUIET, "--steps", 6, "--checkpoint-every", 2)
    assert cli(*args).returncode == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    r = cli(*args, "--overwrite", "--lr", "1e30", "--max-nonfinite", 2)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert errors[0].endswith(f"this run's files were removed and the previous run in '{out}' is "
                              "back in place; lower --lr (or check the data) and start again "
                              "with --overwrite"), errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert cli(*args, "--overwrite", "--lr", "1e-3").returncode == 0


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


# ------------------------------------------------------------------------- damaged content
def rewrite_checkpoint(path: Path, change) -> None:
    """``change(arrays, meta)`` applied to a checkpoint (it may return other metadata bytes),
    and the pointer's SHA-256 updated: only the content check can catch it."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    blob = change(arrays, meta)
    if not isinstance(blob, bytes):
        blob = json.dumps(meta).encode()
    write_npz(path, {**arrays, "__meta__": np.frombuffer(blob, np.uint8)})
    pointer = path.parent / "latest"
    data = json.loads(pointer.read_text())
    for e in data["checkpoints"]:
        if e["file"] == path.name:
            e["sha256"], e["bytes"] = file_sha256(path), path.stat().st_size
    pointer.write_text(json.dumps(data))


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _first(arrays: dict, prefix: str, suffix: str = "") -> str:
    return next(k for k in sorted(arrays) if k.startswith(prefix) and k.endswith(suffix))


def _set(arrays: dict, key: str, value) -> None:
    arrays[key] = value


def _nan_weight(arrays: dict, meta: dict) -> None:
    k = _first(arrays, "param/")
    arrays[k] = arrays[k].copy()
    arrays[k].flat[0] = np.nan


# (mode, change, what the error says): each one used to end in a traceback (KeyError,
# IndexError, TypeError, ValueError) or to train on from NaN weights / a negative count
DAMAGE = {
    "no-run-meta": ("vanilla", lambda a, m: m.pop("run"), "checkpoint.run is missing"),
    "no-trainer-meta": ("vanilla", lambda a, m: m.pop("trainer"),
                        "checkpoint.trainer is missing"),
    "no-losses": ("vanilla", lambda a, m: a.pop("run/loss_last"),
                  "array 'run/loss_last' is missing"),
    "times-past-steps": ("vanilla", lambda a, m: _set(a, "run/times", np.ones(10**4)),
                         "array 'run/times' is float64 [10000], expected float64 [20]"),
    "time-sum-huge": ("vanilla", lambda a, m: m["run"].update(time_sum=1e300), "time_sum"),
    # every loss and time, as before session 21, more than the steps (read a chunk at a time:
    # 160 MB of them at step 10^7 took a resume to 1.1 GB under a 200 MB budget)
    "old-layout-too-many": ("vanilla", lambda a, m: a.update({"run/losses": np.zeros(1 << 21),
                                                              "run/times": np.zeros(1 << 21)}),
                            "array 'run/losses' holds more losses than its 20 steps"),
    "old-layout-times-short": ("vanilla", lambda a, m: a.update({"run/losses": np.zeros(20),
                                                                 "run/times": np.zeros(19)}),
                               "array 'run/times' holds 19 times for 20 losses"),
    "times-short": ("vanilla", lambda a, m: _set(a, "run/times", np.zeros(3)),
                    "array 'run/times' is float64 [3], expected float64 [20]"),
    "perm-out-of-range": ("vanilla", lambda a, m: _set(a, "run/perm", a["run/perm"] + 10**6),
                          "'run/perm' (int32 [1437]) is not a permutation of the 1437 samples"),
    "perm-float": ("vanilla", lambda a, m: _set(a, "run/perm", a["run/perm"] * 1.0),
                   "'run/perm' (float64 [1437]) is not a permutation"),
    "pos-a-string": ("vanilla", lambda a, m: m["run"].update(pos="x"),
                     "run.pos is 'x', expected an integer from 0 to 44"),
    "pos-negative": ("vanilla", lambda a, m: m["run"].update(pos=-1), "run.pos is -1"),
    "rng-garbage": ("vanilla", lambda a, m: m["run"].update(rng={"bit_generator": "MT19937"}),
                    "run.rng is not a random generator state"),
    "moment-of-another-shape": ("vanilla", lambda a, m: _set(a, _first(a, "opt/", "/m"),
                                                             np.zeros(3, np.float32)),
                                "is float32 [3], expected float32 ["),
    "nan-weights": ("vanilla", _nan_weight, "holds NaN or inf values"),
    "negative-optimizer-t": ("vanilla", lambda a, m: m["trainer"].update(optimizer_t=-1),
                             "trainer.optimizer_t is -1"),
    "negative-second-moment": ("vanilla", lambda a, m: _set(a, _first(a, "opt/", "/v"),
                                                            -np.ones_like(a[_first(a, "opt/",
                                                                                   "/v")])),
                               "(AdamW's second moment) holds negative values"),
    "step-count-not-the-file's": ("vanilla", lambda a, m: m["trainer"].update(step_count=7),
                                  "trainer.step_count 7 differs from the file's step 20"),
    "basis-of-another-shape": ("instant", lambda a, m: _set(a, _first(a, "basis/", "/p"),
                                                            a[_first(a, "basis/", "/p")][:1]),
                               "array 'basis/"),
    "bases-of-unknown-layers": ("instant", lambda a, m: m["trainer"].update(bases={"x": 1}),
                                "trainer.bases is {'x': 1}"),
}


@pytest.fixture(scope="module")
def damage_runs(mlp_bundle, tmp_path_factory) -> dict[str, Path]:
    """A 20-step run per mode with checkpoints at steps 10 and 20 (copied by each case)."""
    root = tmp_path_factory.mktemp("damage")
    for mode in ("vanilla", "instant"):
        _train(mlp_bundle, root / mode, 20, checkpoint_every=10, mode=mode)
    return {m: root / m for m in ("vanilla", "instant")}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_one_error_naming_it_and_writes_nothing(case, damage_runs,
                                                                      mlp_bundle, tmp_path):
    mode, change, says = DAMAGE[case]
    out = Path(shutil.copytree(damage_runs[mode], tmp_path / "run"))
    rewrite_checkpoint(out / "checkpoints" / "ckpt-000020.npz", change)
    before = folder_bytes(out)
    with pytest.raises(UserError) as err:
        _train(mlp_bundle, out, 30, checkpoint_every=10, resume=True, mode=mode)
    msg = str(err.value)
    assert "\n" not in msg and says in msg, msg
    assert msg.startswith(f"checkpoint {out / 'checkpoints' / 'ckpt-000020.npz'} cannot be "
                          "resumed: "), msg
    assert msg.endswith(f"delete it to resume from {out / 'checkpoints' / 'ckpt-000010.npz'}, "
                        "or pass --overwrite instead of --resume to start afresh"), msg
    assert folder_bytes(out) == before  # not even a plan record in metrics.jsonl


def test_damaged_checkpoint_way_out_works(damage_runs, mlp_bundle, tmp_path):
    """The error's way out: delete the damaged checkpoint and resume from the one before; with
    no earlier checkpoint, it says to start afresh with --overwrite."""
    out = Path(shutil.copytree(damage_runs["vanilla"], tmp_path / "run"))
    rewrite_checkpoint(out / "checkpoints" / "ckpt-000020.npz", DAMAGE["nan-weights"][1])
    with pytest.raises(UserError):
        _train(mlp_bundle, out, 30, checkpoint_every=10, resume=True)
    (out / "checkpoints" / "ckpt-000020.npz").unlink()
    _, s = _train(mlp_bundle, out, 30, checkpoint_every=10, resume=True)
    assert s.resumed_from == 10
    only = Path(shutil.copytree(damage_runs["vanilla"], tmp_path / "only"))
    (only / "checkpoints" / "ckpt-000010.npz").unlink()
    rewrite_checkpoint(only / "checkpoints" / "ckpt-000020.npz", DAMAGE["pos-negative"][1])
    with pytest.raises(UserError, match="run.pos is -1.*; no earlier checkpoint exists: pass "
                                        "--overwrite instead of --resume to start afresh$"):
        _train(mlp_bundle, only, 30, checkpoint_every=10, resume=True)


def test_damaged_checkpoint_resume_is_one_error_line_on_the_cli(cli, damage_runs, mlp_bundle,
                                                                 tmp_path):
    out = Path(shutil.copytree(damage_runs["vanilla"], tmp_path / "run"))
    rewrite_checkpoint(out / "checkpoints" / "ckpt-000020.npz", DAMAGE["no-losses"][1])
    before = folder_bytes(out)
    proc = cli("train", mlp_bundle, "--out", out, *QUIET, "--mode", "vanilla", "--steps", 30,
               "--resume", "--lr", 3e-3)  # (the run's options: other ones are refused first)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), lines
    assert "array 'run/loss_last' is missing" in lines[0]
    assert folder_bytes(out) == before


def test_metadata_that_is_not_an_object_is_an_unusable_checkpoint(damage_runs, mlp_bundle,
                                                                   tmp_path, capsys):
    out = Path(shutil.copytree(damage_runs["vanilla"], tmp_path / "run"))
    rewrite_checkpoint(out / "checkpoints" / "ckpt-000020.npz", lambda a, m: b"[1, 2]")
    _, meta = Checkpointer(out / "checkpoints", open_bundle(mlp_bundle)).load()
    assert meta["step"] == 10
    assert "ckpt-000020.npz is unusable (its metadata is a JSON list, not an object)" in \
        capsys.readouterr().err
    (out / "checkpoints" / "ckpt-000010.npz").unlink()
    with pytest.raises(UserError, match="no intact checkpoint in .*pass --overwrite"):
        Checkpointer(out / "checkpoints", open_bundle(mlp_bundle)).load()


def test_many_unusable_checkpoints_are_counted_not_listed(damage_runs, mlp_bundle, tmp_path,
                                                          capsys):
    """Session 28 probe: 20,000 bogus ``ckpt-*.npz`` gave a resume 20,002 warning lines (and a
    refusal would have named each on its one line). Three are named, the rest counted."""
    out = Path(shutil.copytree(damage_runs["vanilla"], tmp_path / "run"))
    ckpts = out / "checkpoints"
    (ckpts / "latest").unlink()  # (no pointer: every file is tried, newest first)
    for step in range(21, 29):
        (ckpts / f"ckpt-{step:06d}.npz").write_bytes(b"")
    _, meta = Checkpointer(ckpts, open_bundle(mlp_bundle)).load()
    err = capsys.readouterr().err
    assert meta["step"] == 20
    assert err.count("is unusable") == 3 and "5 more checkpoints were unusable" in err, err
    for f in ckpts.glob("ckpt-0000[12]0.npz"):
        f.unlink()
    with pytest.raises(UserError, match=r"no intact checkpoint in .*; 5 more; pass --overwrite"):
        Checkpointer(ckpts, open_bundle(mlp_bundle)).load()


def test_a_pointer_in_the_way_is_named(cli, mlp_bundle, tmp_path):
    """Session 28 probe: a folder named ``checkpoints/latest`` failed a resume with "cannot
    write checkpoint ckpt-000004.npz: Is a directory", naming the checkpoint, which was
    written; the path in the way is named now (session 35 probe: and the checkpoint, written,
    was said not to exist: "no earlier checkpoint exists")."""
    out = tmp_path / "run"
    assert cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 2, "--checkpoint-every",
               2).returncode == 0
    (out / "checkpoints" / "latest").unlink()
    (out / "checkpoints" / "latest").mkdir()
    r = cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 4, "--checkpoint-every", 2,
            "--resume")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith(
        f"error: cannot write the checkpoint pointer {out / 'checkpoints' / 'latest'}: Is a "
        "directory"), lines
    assert f"the checkpoint {out / 'checkpoints' / 'ckpt-000004.npz'} itself was written (a " \
        "--resume finds it)" in lines[-1], lines
    assert (out / "checkpoints" / "ckpt-000004.npz").is_file()


# ------------------------------------------------------------------------- the run folder
@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading waits for a writer forever)."""
    def fail(signum, frame):
        raise AssertionError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _folder(bundle: Path, out: Path) -> RunFolder:
    return RunFolder(out, {"format": "instant-runtime-run",
                           "bundle_sha256": bundle_sha256(open_bundle(bundle))})


def test_fifos_in_a_run_folder_never_block(damage_runs, mlp_bundle, tmp_path, capsys):
    out = Path(shutil.copytree(damage_runs["vanilla"], tmp_path / "run"))
    folder = out / "checkpoints"
    b = open_bundle(mlp_bundle)
    with deadline(20):
        (folder / "ckpt-000020.npz").unlink()
        os.mkfifo(folder / "ckpt-000020.npz")
        _, meta = Checkpointer(folder, b).load()  # the previous one, with a warning
        assert meta["step"] == 10
        assert "ckpt-000020.npz' is not a regular file" in capsys.readouterr().err
        (folder / "latest").unlink()
        os.mkfifo(folder / "latest")  # an unreadable pointer: the newest file that loads
        assert Checkpointer(folder, b).load()[1]["step"] == 10
        (out / "metrics.jsonl").unlink()
        os.mkfifo(out / "metrics.jsonl")
        with pytest.raises(UserError, match="metrics.jsonl' is not a regular file"):
            Metrics(out / "metrics.jsonl")
        (out / "run.json").unlink(missing_ok=True)
        os.mkfifo(out / "run.json")
        with pytest.raises(UserError, match="run.json' is not a regular file; remove it, or "
                                            "pass --overwrite"):
            _folder(mlp_bundle, out).prepare(resume=True, overwrite=False)


def test_run_json_that_is_not_an_object_is_ignored_on_resume(mlp_bundle, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("[1]")
    rf = _folder(mlp_bundle, out)
    # used to raise AttributeError; then it started afresh over it. A run.json that is not a
    # run's, and no checkpoint: not a run (a file of the user's), left as it is
    with pytest.raises(UserError, match="holds run.json but no training run"):
        rf.prepare(resume=True, overwrite=False)
    assert (out / "run.json").read_text() == "[1]"


def test_a_second_run_into_a_held_folder_is_refused(mlp_bundle, tmp_path):
    """Two trainers on one --out: the second (even with --overwrite) is refused while the
    first holds the folder (before, it moved the running trainer's files aside)."""
    out = tmp_path / "run"
    first = _folder(mlp_bundle, out)
    first.prepare(resume=False, overwrite=False)
    before = sorted(f.name for f in out.iterdir())
    for resume, overwrite in ((False, True), (True, False)):
        with pytest.raises(UserError, match=r"--out '.*run' is in use by another training run"):
            _folder(mlp_bundle, out).prepare(resume=resume, overwrite=overwrite)
        assert sorted(f.name for f in out.iterdir()) == before
    first.finish(True)
    second = _folder(mlp_bundle, out)
    second.prepare(resume=False, overwrite=True)  # free again
    second.finish(True)


def test_a_run_set_aside_by_a_killed_overwrite_is_put_back(mlp_bundle, tmp_path, capsys):
    """SIGKILL while an --overwrite planned left the old run in .replaced.PID, and a --resume
    then started from step 0. The next run into the folder puts it back (the replacement had
    no checkpoint), or drops it (the replacement had one)."""
    out = tmp_path / "run"
    old = out / ".replaced.4242"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "ckpt-000002.npz").write_bytes(b"old")
    (old / "checkpoints" / "latest").write_text('{"checkpoints": [{"file": "ckpt-000002.npz"}]}')
    (old / "params.npz").write_bytes(b"old params")
    (old / "run.json").write_text('{"format": "instant-runtime-run"}')
    (out / "checkpoints").mkdir()  # the killed replacement's stub
    (out / "run.json").write_text('{"format": "instant-runtime-run", "stub": 1}')
    rf = _folder(mlp_bundle, out)
    with pytest.raises(UserError, match="already holds a training run"):
        rf.prepare(resume=False, overwrite=False)
    assert "put back the run that an interrupted --overwrite had set aside" in \
        capsys.readouterr().err
    assert not old.exists() and (out / "params.npz").read_bytes() == b"old params"
    assert (out / "checkpoints" / "ckpt-000002.npz").read_bytes() == b"old"
    assert "stub" not in (out / "run.json").read_text()
    # a replacement that checkpointed stands; the set-aside run goes once a run goes on from
    # it, not before (session 43 probe: a resume then refused for its --lr had deleted it)
    old.mkdir()
    (old / "params.npz").write_bytes(b"older")
    rf = _folder(mlp_bundle, out)
    rf.prepare(resume=True, overwrite=False)
    rf.finish(False)  # refused after the folder's checks
    assert (old / "params.npz").read_bytes() == b"older"
    rf = _folder(mlp_bundle, out)
    rf.prepare(resume=True, overwrite=False)
    rf.finish(True)
    assert not old.exists() and (out / "params.npz").read_bytes() == b"old params"
    assert "its replacement went on" in capsys.readouterr().err


def test_an_overwrite_sets_aside_beside_a_run_kept_aside_under_its_own_pid(mlp_bundle,
                                                                         tmp_path, capsys):
    """A review: a run kept aside as `.replaced.PID` by an interrupted --overwrite, and a later
    --overwrite of the same PID (a container's entrypoint is always 1), failed "File exists"
    ("fix the permissions"). It sets aside under another name; both go once it stands."""
    out = tmp_path / "run"
    _train(mlp_bundle, out, 4, checkpoint_every=2)
    (out / "run.json").write_text('{"format": "instant-runtime-run"}')
    kept = out / f".replaced.{os.getpid()}"
    kept.mkdir()
    (kept / "params.npz").write_bytes(b"older")
    rf = _folder(mlp_bundle, out)
    rf.prepare(resume=False, overwrite=True)
    assert (kept / "params.npz").read_bytes() == b"older"
    assert len([f for f in out.iterdir() if f.name.startswith(".replaced.")]) == 2
    rf.finish(True)
    assert not [f for f in out.iterdir() if f.name.startswith(".replaced.")]
    assert "its replacement went on" in capsys.readouterr().err


def test_out_folder_holding_other_files_is_refused(mlp_bundle, tmp_path):
    """``--out /`` or a home folder: never written into; a new, empty or run-only folder is."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    (home / "photos").mkdir()
    with pytest.raises(UserError, match=r"--out '.*home' is a folder holding other files "
                                        r"\(notes.txt, photos\) and no training run; pass a "
                                        r"new or empty folder as --out"):
        _folder(mlp_bundle, home).prepare(resume=False, overwrite=True)
    assert sorted(f.name for f in home.iterdir()) == ["notes.txt", "photos"]
    for name, leftovers in (("new", None), ("empty", []), ("leftovers", [".replaced.12"])):
        out = tmp_path / name
        if leftovers is not None:
            out.mkdir()
            for f in leftovers:
                (out / f).mkdir()
        rf = _folder(mlp_bundle, out)
        rf.prepare(resume=False, overwrite=False)
        rf.finish(True)
        assert (out / "run.json").is_file()


@pytest.mark.parametrize("args, says", [
    (("--out", ""), "--out '' is empty; pass a folder for the run"),
    (("--out", "HOME"), "is a folder holding other files (notes.txt) and no training run"),
    (("--out", "RUN", "--lr", "1e39"), "--lr 1e+39 is invalid: must be at most 3.4e+38"),
], ids=["empty-out", "out-with-other-files", "lr-inf-in-float32"])
def test_bad_out_or_lr_is_one_error_line(cli, mlp_bundle, tmp_path, args, says):
    (tmp_path / "HOME").mkdir()
    (tmp_path / "HOME" / "notes.txt").write_text("mine")
    args = [str(tmp_path / a) if a in ("HOME", "RUN") else a for a in args]
    before = folder_bytes(tmp_path)
    proc = cli("train", mlp_bundle, *QUIET, "--steps", 2, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert folder_bytes(tmp_path) == before and not (tmp_path / "RUN").exists()


def test_hyperparameters_must_be_finite_in_float32():
    for kw in ({"lr": 1e39}, {"lr": 1e-50}, {"weight_decay": 1e40}):
        with pytest.raises(UserError, match="float32"):
            OptimConfig(**kw)
    OptimConfig(lr=3e38, weight_decay=0.0)  # large, but float32 holds it


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_during_start_up_puts_the_replaced_run_back(sig, mlp_bundle, tmp_path):
    """SIGTERM/SIGINT/SIGHUP while --overwrite plans the new run (budget probes): the old run
    is back, byte-identical, one line says so, exit 128 + signal (SIGHUP killed the process
    there, leaving the old run set aside under .replaced.*)."""
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10, checkpoint_every=5)
    before = folder_bytes(out)
    proc = start(mlp_bundle, out, "--mode", "vanilla", "--steps", 10**6, "--overwrite",
                 "--budget", "300MB")
    t0 = time.monotonic()
    while not any(f.name.startswith(".replaced.") for f in out.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 60, "the old run was never set aside"
        time.sleep(0.002)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    lines = stderr.strip().splitlines()
    assert lines == [f"interrupted by {sig.name} before training began; the previous run in "
                     f"'{out}' is back in place"], lines
    assert folder_bytes(out) == before
    assert sorted(f.name for f in out.iterdir()) == ["checkpoints", "metrics.jsonl",
                                                      "params.npz", "summary.json"]


def test_a_signal_after_an_overwrites_first_checkpoint_keeps_the_run_it_replaces(
        mlp_bundle, tmp_path):
    """Session 43 probe: SIGTERM after step 1 of an --overwrite ended it as an interrupted run
    to resume, and the finished run it replaced was deleted without a word. It stays set aside
    (the line says where) until the new run is resumed; a resume refused for its options keeps
    it too; the resume that goes on drops it, with a note."""
    out = tmp_path / "run"
    _train(mlp_bundle, out, 10, checkpoint_every=5)
    before = folder_bytes(out)
    opts = ("--mode", "vanilla", "--overwrite", "--checkpoint-every", 1, "--lr", 0.01)
    proc = start(mlp_bundle, out, "--steps", 10**6, *opts)
    try:
        _wait_until(proc, lambda: any((f / "checkpoints").is_dir() for f in out.iterdir()
                                      if f.name.startswith(".replaced."))
                    and latest_step(out) >= 1,  # (the old run's pointer moved aside first: it
                    "the new run never checkpointed")  # had read as the new run's, 1 in 4)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    aside = next(f for f in out.iterdir() if f.name.startswith(".replaced."))
    assert f"the run it replaces stays in '{aside}' until this one is resumed" in stderr, stderr
    assert folder_bytes(aside) == before
    step = latest_step(out)
    resume = ("--resume", "--steps", step + 2, "--mode", "vanilla", "--checkpoint-every", 1)
    r = run_cli(mlp_bundle, out, *resume, "--lr", 5)  # refused: another --lr
    assert r.returncode == 2 and "--lr" in r.stderr, r.stderr
    assert folder_bytes(aside) == before
    r = run_cli(mlp_bundle, out, *resume, "--lr", 0.01)
    assert r.returncode == 0, r.stderr
    assert not aside.exists() and "its replacement went on" in r.stderr, r.stderr


def _wait_until(proc: subprocess.Popen, ready, what: str, poll_s: float = 0.005) -> None:
    """Poll ``ready()`` until true; fails with ``what`` after 60 s, or if ``proc`` exits."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 60, what
        time.sleep(poll_s)


def run_cli(bundle: Path, out: Path, *args: object) -> subprocess.CompletedProcess:
    p = start(bundle, out, *args)
    stdout, stderr = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def test_two_signals_in_the_first_step_of_an_overwrite_lose_nothing(cnn_bundle, tmp_path):
    """Session 28 probe: a second SIGTERM in the first steps of ``train --overwrite`` (the step
    dropped, no checkpoint yet) deleted the run it replaced and left a run with nothing to
    resume (3 of 3 tries). Now the previous run is back, byte-identical, and one line says so;
    or, where the new run did write a checkpoint first, that line names it. Never neither."""
    out = tmp_path / "run"
    _train(cnn_bundle, out, 10, checkpoint_every=5)
    before = folder_bytes(out)
    proc = start(cnn_bundle, out, "--steps", 10**6, "--overwrite", "--batch", 1024,
                 "--checkpoint-every", 1000)
    try:  # (a failed wait must not leave a run of 10^6 steps behind)
        metrics = out / "metrics.jsonl"  # (the new run's, once the old one is set aside)
        _wait_until(proc, lambda: any(f.name.startswith(".replaced.") for f in out.iterdir())
                    and metrics.is_file() and b'"kind": "plan"' in metrics.read_bytes(),
                    "the run never started", poll_s=0.002)
        time.sleep(0.1)  # in the first step (the probe's timing: 3 of 3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = stderr.strip().splitlines()
    if proc.returncode == -signal.SIGTERM:  # the second came before training began, once the
        # first had put the old run back and given the signals back: it ends the process
        assert folder_bytes(out) == before, (lines, sorted(p.name for p in out.iterdir()))
        return
    assert proc.returncode == 143 and len(lines) == 1, (proc.returncode, stderr)
    if "back in place" in lines[0]:
        assert folder_bytes(out) == before, lines
    else:  # the new run stands: it checkpointed, and the line names that checkpoint
        ckpt = re.search(r"checkpoint (\S+ckpt-\d+\.npz)", lines[0])
        assert ckpt and Path(ckpt[1]).is_file(), lines


# ------------------------------------------------------------------------- divergence
class BlowUpAt(Dataset):
    """Digits whose ``take`` call ``at`` (= step, vanilla mode without a test split) sets the
    trainer's learning rate to inf in float32: that update makes every weight NaN."""

    def __init__(self, base: Dataset, trainer: Trainer, at: int) -> None:
        super().__init__("blow-up-digits", base.x, base.y)
        self.trainer, self.at, self.calls = trainer, at, 0

    def take(self, idx):
        if len(idx) <= 3:  # the run's data fingerprint (runtime/run.py), not a step
            return super().take(idx)
        self.calls += 1
        if self.calls == self.at:
            self.trainer.optimizer.lr = 1e39
        return super().take(idx)


def test_update_that_makes_weights_non_finite_stops_and_keeps_the_last_good_checkpoint(
        mlp_bundle, tmp_path):
    b = open_bundle(mlp_bundle)
    tr = _trainer(mlp_bundle)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"non-finite parameters \('.*' holds NaN or inf\) at "
                                        r"step 5: training diverged; the last good checkpoint is "
                                        r".*ckpt-000004\.npz \(the last with finite "
                                        r"weights: its loss may already be large\); lower --lr "
                                        r"and start again with "
                                        r"--overwrite$"):
        train(tr, BlowUpAt(load_data("digits", b), tr, 5),
              RunConfig(steps=12, checkpoint_every=2, progress=False), out)
    assert latest_step(out) == 4 and not (out / "params.npz").exists()
    arrays, _ = Checkpointer(out / "checkpoints", b).load()
    assert all(np.isfinite(v).all() for v in arrays.values() if v.dtype.kind == "f")


def test_stop_signals_leave_no_stopped_runs_thread_or_handler_behind() -> None:
    """The watchdog's terminate flag is process-wide (one RunOptions for every run): leaving
    ``StopSignals`` clears it (else every later run of the process, a final evaluation or a
    fleet client's next round, failed at once), ends its thread and puts the handlers back."""
    import threading

    from runtime.checkpoint import StopSignals
    from runtime.sessions import abort_runs, runs_aborted

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals():
        abort_runs()
        assert runs_aborted()
        assert signal.getsignal(signal.SIGTERM) is not before
    assert not runs_aborted()
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup fd left set
    assert not [t for t in threading.enumerate() if t.name == "signal-watchdog"]


def test_a_metrics_file_without_a_step_is_part_of_a_failed_runs_stub(tmp_path):
    """A run that failed at its first step (session 18 probe: ids past the embedding) left
    run.json, an empty checkpoints/ and a metrics.jsonl holding only its plan, and the same
    command was then refused ("already holds a training run"). Such a metrics file now counts
    as part of the stub that a failed run removes; one with a step does not."""
    from runtime.run_folder import RunFolder

    m = tmp_path / "metrics.jsonl"
    m.write_text('{"kind": "plan", "budget": null}\n{"kind": "calibration", "step": 0}\n')
    assert RunFolder._no_steps(m)
    m.write_text(m.read_text() + '{"kind": "step", "step": 1, "loss": 0.5}\n')
    assert not RunFolder._no_steps(m)
    m.write_text("not json\n")
    assert not RunFolder._no_steps(m)
    link = tmp_path / "link.jsonl"
    link.symlink_to(m)
    assert not RunFolder._no_steps(link)


def test_step_statistics_stay_bounded_and_read_the_old_layout(mlp_bundle, tmp_path):
    """Session 21 probe: every step's loss and time were kept in lists and checkpoints (~80
    bytes a step, outside any plan: a run resumed at step 10^7 peaked at 1.1 GB under a 200 MB
    budget). Now the summary's figures come from the first and last 10 losses, the last 4096
    step times, the count and the sum of times; a checkpoint with every loss still resumes."""
    from runtime.run import StepStats

    st = StepStats()
    rng = np.random.default_rng(0)
    losses, times = rng.random(100_000), rng.random(100_000)
    for lo, t in zip(losses, times, strict=True):
        st.add(float(lo), float(t))
    assert len(st.first) == 10 and len(st.last) == 10 and len(st.times) == 4096
    assert st.n == 100_000 and st.time_sum == pytest.approx(times.sum())
    assert list(st.last) == losses[-10:].tolist() and st.first == losses[:10].tolist()
    # a run's summary is the same whether it ran straight or resumed from the old layout
    out = tmp_path / "run"
    _, straight = _train(mlp_bundle, tmp_path / "ref", 30, checkpoint_every=20)
    _train(mlp_bundle, out, 20, checkpoint_every=20)
    ref = tmp_path / "ref" / "checkpoints" / "ckpt-000020.npz"
    with np.load(ref) as z:
        old_losses = np.r_[z["run/loss_first"]]  # 20 steps: the first 10 ...
        old_last = z["run/loss_last"]
        old_times = z["run/times"]
    every = np.r_[old_losses, old_last]  # ... and the last 10 are all 20

    def old_layout(arrays, meta):
        for k in ("run/loss_first", "run/loss_last", "run/times"):
            arrays.pop(k)
        arrays["run/losses"], arrays["run/times"] = every, old_times
        meta["run"].pop("finite_steps")
        meta["run"].pop("time_sum")

    rewrite_checkpoint(out / "checkpoints" / "ckpt-000020.npz", old_layout)
    _, resumed = _train(mlp_bundle, out, 30, checkpoint_every=20, resume=True)
    assert resumed.resumed_from == 20
    assert (resumed.loss_first, resumed.loss_last) == (straight.loss_first, straight.loss_last)
    assert_same_params(out / "params.npz", tmp_path / "ref" / "params.npz")


def test_metadata_of_millions_of_values_is_never_parsed(damage_runs, mlp_bundle, tmp_path,
                                                         capsys):
    """Session 21 probe: 30 MB of empty lists in a checkpoint's JSON metadata took a resume to
    836 MB under a 200 MB budget. It is unusable now, before it is parsed: the one before it
    resumes."""
    out = Path(shutil.copytree(damage_runs["vanilla"], tmp_path / "run"))

    def bloat(arrays, meta):
        return json.dumps({**meta, "junk": "@@"}).replace(
            '"@@"', "[" + "[]," * 1_100_000 + "[]]").encode()

    rewrite_checkpoint(out / "checkpoints" / "ckpt-000020.npz", bloat)
    _, s = _train(mlp_bundle, out, 30, checkpoint_every=10, resume=True)
    assert s.resumed_from == 10
    assert "JSON values, more than a checkpoint's can" in capsys.readouterr().err


def test_a_long_run_logs_fewer_step_lines_past_the_first_ten_thousand(mlp_bundle, tmp_path,
                                                                      monkeypatch):
    """Session 22 long-run probe: metrics.jsonl had no cap (~210 bytes a step; 1.6 GB for a
    small model over 8 hours). Past FULL_LOG_STEPS steps one line in 10 is kept, past ten times
    as many one in 100, and so on; the last step and a non-finite one always have their line,
    and a resume keeps the pattern. (The threshold is lowered here: 10,000 steps take minutes.)"""
    import runtime.run_log as run_log

    assert [run_log.step_logged(s) for s in (1, 9_999, 10_000, 10_005, 10_010, 99_990,
                                             100_000, 100_050, 1_000_000)] == \
        [1, 1, 10, 0, 10, 10, 100, 0, 1000]
    monkeypatch.setattr(run_log, "FULL_LOG_STEPS", 10)
    out = tmp_path / "run"
    _train(mlp_bundle, out, 57, checkpoint_every=20)
    _train(mlp_bundle, out, 125, checkpoint_every=20, resume=True)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["kind"] == "step"]
    logged = [e["step"] for e in steps]
    # 57: the first run's last step; the resume continues from its checkpoint
    assert logged == [*range(1, 10), *range(10, 60, 10), 57, *range(60, 100, 10), 100, 125], \
        logged
    assert all(e.get("logged_every") == (10 if 10 <= e["step"] < 100 and e["step"] != 57
                                         else 100 if e["step"] == 100 else None)
               for e in steps), steps


def test_each_calibration_event_has_its_own_seconds(mlp_bundle, tmp_path):
    """Session 22 long-run probe: a calibration event's ``seconds`` was the run's running total
    of calibration time. It is that calibration's now, the total beside it."""
    out = tmp_path / "run"
    b = open_bundle(mlp_bundle)
    tr = make_trainer(mlp_bundle, mode="instant", lr=3e-3, calib_every=4)
    train(tr, load_data("digits", b), RunConfig(steps=12, progress=False), out)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cal = [e for e in events if e["kind"] == "calibration"]
    assert len(cal) >= 3, cal
    assert sum(e["seconds"] for e in cal) == pytest.approx(cal[-1]["seconds_total"], abs=1e-3)
    assert all(0 <= e["seconds"] <= e["seconds_total"] for e in cal)
    assert cal[-1]["seconds"] < cal[-1]["seconds_total"]  # not the running total


def test_an_empty_checkpoints_folder_does_not_block_the_run(cli, mlp_bundle, tmp_path) -> None:
    """A run that failed before its first checkpoint (a probe: too few file descriptors) left
    OUT/checkpoints empty, and the same command run again was refused: "holds checkpoints but
    no training run"."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    proc = cli("train", mlp_bundle, "--out", out, *QUIET, "--mode", "vanilla", "--steps", 5)
    assert proc.returncode == 0, proc.stderr
    assert (out / "params.npz").is_file()


def test_a_resume_to_the_last_checkpoint_rewrites_an_older_params_file(mlp_bundle, tmp_path):
    """--resume of a run at its --steps is "already finished" only where params.npz is that
    checkpoint's; a finished run resumed for more steps and stopped keeps an older one, which
    the resume to the stop's step rewrites (a review of session 24). Which is which is read
    from summary.json's steps, not from file times (session 33 probe: a copy's times made a
    finished run train again, and eval and export-model score an older params.npz)."""
    from runtime.export_model import run_weights
    from runtime.run import RunFinished

    out = tmp_path / "run"
    _train(mlp_bundle, out, 10, checkpoint_every=5)
    with pytest.raises(RunFinished):
        _train(mlp_bundle, out, 10, checkpoint_every=5, resume=True)
    newest = out / "checkpoints" / "ckpt-000010.npz"
    old = out / "params.npz"
    os.utime(newest, (4e9, 4e9))  # a copy's times: the checkpoint "newer" than params.npz
    with pytest.raises(RunFinished):
        _train(mlp_bundle, out, 10, checkpoint_every=5, resume=True)
    assert run_weights(out) == old
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "steps": 5}))  # params.npz of an
    os.utime(old, (5e9, 5e9))  # older end (resumed for more steps and stopped), however new
    assert run_weights(out) == newest
    _train(mlp_bundle, out, 10, checkpoint_every=5, resume=True)
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert run_weights(out) == old
    # a disk that filled up after params.npz left no summary.json (an outside probe: the
    # resume said "already finished", and the summary never came): the resume writes it
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    _train(mlp_bundle, out, 10, checkpoint_every=5, resume=True)
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 10 and again["loss_last"] == summary["loss_last"], again
    with pytest.raises(RunFinished):
        _train(mlp_bundle, out, 10, checkpoint_every=5, resume=True)


def test_the_output_streams_compare_as_the_streams_they_wrap() -> None:
    """tqdm clears its bar before a line only where the line's stream is the bar's or both are
    the standard streams, comparing with ==: wrapped in runtime/console.Unblocking, log lines
    were glued to the bar (a review of session 24)."""
    from runtime.console import Unblocking

    assert Unblocking(sys.stderr) == sys.stderr and Unblocking(sys.stdout) in (sys.stdout,
                                                                               sys.stderr)
    assert Unblocking(sys.stderr) == Unblocking(sys.stderr) != Unblocking(sys.stdout)


def test_a_run_file_is_never_opened_through_a_link(tmp_path):
    """A run folder is untrusted: its files (checkpoints, the pointer, run.json) are opened
    without following a link, whatever checked the folder before (a probe's linked
    checkpoint was read by eval and copied out by export-model)."""
    from runtime.checkpoint import pointer_entries, read_regular

    (tmp_path / "real").write_bytes(b'{"checkpoints": []}')
    (tmp_path / "latest").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        read_regular(tmp_path / "latest")
    assert pointer_entries(tmp_path) == []


def test_a_run_json_too_large_to_read_back_is_never_written(mlp_bundle, tmp_path):
    """Class names that would make run.json larger than eval, export-model and --resume read
    (1 MiB) are refused before the run starts (a reviewer: 10,000 long names wrote 1.1 MB, and
    the run's own --resume and --overwrite then refused it); a folder already holding such a
    run.json is a run that --overwrite replaces."""
    from runtime.run_folder import MAX_RUN_JSON_BYTES

    out = tmp_path / "run"
    rf = _folder(mlp_bundle, out)
    rf.identity = {**rf.identity, "class_names": ["x" * 1000] * 1100}
    with pytest.raises(UserError, match=r"class names take [\d,]+ bytes in run.json, more than "
                                        r"it may hold"):
        rf.prepare(resume=False, overwrite=False)
    assert not (out / "run.json").exists()
    out.mkdir(exist_ok=True)
    (out / "run.json").write_text('{"bundle_sha256": "x", "pad": "' + "y" * MAX_RUN_JSON_BYTES
                                  + '"}')
    rf = _folder(mlp_bundle, out)
    rf.prepare(resume=False, overwrite=True)
    rf.finish(True)
    assert (out / "run.json").stat().st_size < MAX_RUN_JSON_BYTES


def test_the_stub_of_a_run_killed_before_its_first_step_is_started_afresh(mlp_bundle, tmp_path,
                                                                         capsys):
    """SIGKILL while the plan's probes ran left run.json and an empty checkpoints folder: the
    same command was refused ("already holds a training run"; a concurrency probe). Nothing
    of value is there: it starts afresh, with a note."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    rf = _folder(mlp_bundle, out)
    (out / "run.json").write_text(json.dumps(rf.identity))
    rf.prepare(resume=False, overwrite=False)
    rf.finish(True)
    assert "held only the start of a run that never trained a step" in capsys.readouterr().err
    (out / "params.npz").write_bytes(b"weights")  # a run with something to lose: refused
    with pytest.raises(UserError, match="already holds a training run"):
        _folder(mlp_bundle, out).prepare(resume=False, overwrite=False)
    # killed during the first evaluation: its metrics.jsonl holds the plan only
    (out / "params.npz").unlink()
    (out / "metrics.jsonl").write_text('{"kind": "plan", "micro_batch": 8}\n')
    rf = _folder(mlp_bundle, out)
    rf.prepare(resume=False, overwrite=False)
    rf.finish(True)
    # a file of the user's beside the stub: refused, the stub left as it was (a reviewer: it
    # was deleted, then the run refused)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        _folder(mlp_bundle, out).prepare(resume=False, overwrite=False)
    assert (out / "run.json").is_file()


def test_no_thread_left_for_the_signal_watchdog_is_one_error(monkeypatch):
    """Under a low ``ulimit -u`` the watchdog thread cannot start: one error naming the limit
    (a concurrency probe got "can't start new thread" and "cannot join thread before it is
    started" tracebacks), the signal handlers as they were."""
    import threading

    from runtime.checkpoint import StopSignals

    before = signal.getsignal(signal.SIGTERM)

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(UserError, match=r"cannot start a thread: .*\(ulimit -u\) is reached"):
        with StopSignals():
            pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_in_the_final_evaluation_exits_as_an_interrupt(tmp_path) -> None:
    """Session 27 probe: SIGINT during the held-out evaluation after the last step exited 2
    with "onnxruntime failed in the evaluation pass: interrupted by SIGINT ...; check that the
    data matches the bundle's inputs, or re-export the bundle" (the handler's exception was
    taken for onnxruntime's). Now exit 130 and the interrupt's own line."""
    r = subprocess.run([sys.executable, "-m", "runtime", "export", "--model", "token-mlp",
                        "--out", str(tmp_path / "b")], cwd=REPO, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    for name, n in (("train", 64), ("val", 1500)):  # the evaluation: seconds at 1 thread
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((n, 128, 64), np.float32),
                 y=rng.integers(0, 10, n))
    out = tmp_path / "run"
    proc = start(tmp_path / "b", out, "--data", tmp_path / "train.npz", "--val",
                 tmp_path / "val.npz", "--eval-every", 0, "--steps", 1, "--checkpoint-every", 1,
                 "--mode", "vanilla")
    assert wait_for_checkpoint_after(proc, out, 0, timeout=120)  # the loop is over
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        f"interrupted by SIGINT after step 1; checkpoint {out / 'checkpoints' / 'ckpt-000001.npz'}"
        "; continue with --resume"], stderr


def test_a_run_stopped_at_once_names_its_newest_checkpoint(mlp_bundle, tmp_path) -> None:
    """Session 27 probe: a second Ctrl-C (stop at once) ended a run with a bare "interrupted";
    the line now names the run folder's newest checkpoint and --resume (another command, or a
    run without a checkpoint, still says "interrupted")."""
    from argparse import Namespace

    from runtime.cli import _interrupted

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "runtime", "train", str(mlp_bundle), "--out",
                        str(out), *map(str, QUIET), "--steps", "3", "--checkpoint-every", "2",
                        "--mode", "vanilla"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    line = _interrupted(Namespace(cmd="train", out=str(out), bundle=str(mlp_bundle)))
    assert line == (f"interrupted; the run's newest checkpoint is "
                    f"{out / 'checkpoints' / 'ckpt-000003.npz'}: continue from it with --resume")
    assert _interrupted(Namespace(cmd="train", out=str(tmp_path / "none"),
                                  bundle=str(mlp_bundle))) == "interrupted"
    import os

    from runtime.run import STARTED

    (tmp_path / "begun").mkdir()  # a folder whose run began, without a checkpoint (session 39
    begun = Namespace(cmd="train", out=str(tmp_path / "begun"), bundle=str(mlp_bundle))  # probe)
    assert _interrupted(begun) == "interrupted"  # (only made: its steps had not begun)
    STARTED.append(os.path.realpath(tmp_path / "begun"))  # as train() records it
    try:
        assert _interrupted(begun) == (
            "interrupted before the run's first checkpoint, so nothing of it can be resumed (one "
            "Ctrl-C lets the step in progress end and checkpoints it)")
    finally:
        STARTED.clear()
    assert _interrupted(Namespace(cmd="export", out=str(out))) == "interrupted"
    assert _interrupted(None) == "interrupted"
    # a run whose --steps are done (weights and summary written) when the signal came: it
    # finished, said in one line, exit 0 (session 39 probe: "continue from it with --resume",
    # which then said there was nothing to resume)
    from runtime.cli import _finished_run
    from runtime.run import FINISHED

    args = Namespace(cmd="train", out=str(out), bundle=str(mlp_bundle), steps=3)
    # files alone are an earlier run's (an --overwrite stopped before it moved them): no
    assert not _finished_run(args)
    FINISHED.append(os.path.realpath(out))  # as train() records a run it finished
    try:
        assert _finished_run(args)
        assert not _finished_run(Namespace(cmd="train", out=str(out), bundle=str(mlp_bundle),
                                           steps=5))
    finally:
        FINISHED.remove(os.path.realpath(out))


def test_a_stop_signal_after_the_command_ended_keeps_its_exit_status(tmp_path) -> None:
    """Session 39 probe: a Ctrl-C while the interpreter cleaned up after a finished run printed
    a KeyboardInterrupt traceback from a destructor (exit 0). Once the command has its exit
    status, a stop signal ends the process with that status, without a word."""
    code = ("import atexit, os, signal, runtime.launch as launch\n"
            "import runtime.cli\n"
            "def main():\n"
            "    signal.signal(signal.SIGINT, runtime.cli._on_sigint)\n"
            "    atexit.register(lambda: os.kill(os.getpid(), signal.{sig}))\n"
            "    return {rc}\n"
            "launch.main = main\n"
            "launch.run()\n")
    for sig, rc in (("SIGINT", 0), ("SIGTERM", 2)):
        r = subprocess.run([sys.executable, "-c", code.format(sig=sig, rc=rc)], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == rc and r.stderr == "", (r.returncode, r.stderr)


def test_a_stop_signal_while_a_graph_loads_is_an_interruption_not_a_damaged_bundle(
        mlp_bundle, monkeypatch):
    """An outside probe: SIGTERM while a resumed run loaded its graphs (the signal handler
    raises TrainingInterrupted once a checkpoint exists) came out as "onnxruntime cannot load
    ...; re-export the bundle", exit 2, of a sound bundle. TrainingInterrupted is a
    BaseException now: no ``except Exception`` reads it as its own failure."""
    import signal

    from helpers import make_trainer

    from runtime import sessions
    from runtime.checkpoint import TrainingInterrupted

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGTERM, 275, None)

    tr = make_trainer(mlp_bundle)
    monkeypatch.setattr(sessions.ort, "InferenceSession", stopped)
    with pytest.raises(TrainingInterrupted) as got:
        tr.open_sessions()
    assert got.value.exit_code == 128 + signal.SIGTERM


def test_a_resume_into_a_full_disk_says_to_make_room_not_another_out(mlp_bundle, tmp_path,
                                                                      monkeypatch):
    """Session 43 probe: a --resume into a full (or read-only) --out was told "pass another
    --out", and that resume started from step 0. A resume is told to make room and resume;
    a new run still to pass another --out."""
    out = tmp_path / "run"
    _train(mlp_bundle, out, 4, checkpoint_every=2)
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".write-test."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError, match=r"not writable \(No space left on device\); free space "
                                        r"or make it writable, then --resume again"):
        _folder(mlp_bundle, out).prepare(resume=True, overwrite=False)
    with pytest.raises(UserError, match=r"not writable \(No space left on device\); pass "
                                        r"another --out"):
        _folder(mlp_bundle, tmp_path / "new").prepare(resume=False, overwrite=False)


def test_a_damaged_run_json_is_said_and_written_again_by_a_resume(mlp_bundle, tmp_path, capsys):
    """Session 43 probe: a run.json reading `{bad` was resumed without a word and left damaged;
    export-model then called the run "not inside a bundle"."""
    from runtime.export_model import resolve_source

    out = tmp_path / "run"
    _train(mlp_bundle, out, 4, checkpoint_every=2)
    (out / "run.json").write_text("{bad")
    with pytest.raises(UserError, match=r"not inside a bundle and its run.json, which names the "
                                        r"bundle, is unreadable; pass the bundle with --bundle"):
        resolve_source(out)
    rf = _folder(mlp_bundle, out)
    rf.prepare(resume=True, overwrite=False)
    assert "run.json' is unreadable or empty; this resume writes it again" in \
        capsys.readouterr().err
    rf.finish(True)
    assert json.loads((out / "run.json").read_text())["bundle_sha256"]


def test_a_run_killed_before_its_summary_logs_its_final_evaluation_once(mlp_bundle, tmp_path):
    """Session 43 probe: a kill after params.npz, before summary.json, then --resume: the
    resumed run evaluated again and metrics.jsonl held two eval lines of the last step (an
    unbroken run has one). The final evaluation's line is cut back with what follows the
    checkpoint; a periodic one at that step stays."""
    def evals(out: Path) -> list[dict]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e.get("kind") == "eval"]

    for every in (0, 10):
        out = tmp_path / f"run{every}"
        _train(mlp_bundle, out, 10, checkpoint_every=5, eval_every=every)
        whole = evals(out)
        (out / "summary.json").unlink()  # killed before it was written
        _, s = _train(mlp_bundle, out, 10, checkpoint_every=5, eval_every=every, resume=True)
        assert s.resumed_from == 10
        again = evals(out)
        assert [e["step"] for e in again] == [e["step"] for e in whole] == [10], again
        assert again[0]["loss"] == whole[0]["loss"]
    # a finished run resumed for more steps keeps the end it had (a review: it was cut)
    _train(mlp_bundle, out, 15, checkpoint_every=5, eval_every=every, resume=True)
    assert [e["step"] for e in evals(out)] == [10, 15], evals(out)


def test_a_dangling_link_as_out_and_a_bundle_as_init_from_are_said(mlp_bundle, tmp_path, capsys):
    """Session 43 probe: `--out` a symbolic link to a missing place was refused as "File
    exists"; `--init-from BUNDLE` started from the bundle's untrained weights without a word."""
    from runtime.bundle import open_bundle
    from runtime.cli import trained_source

    link = tmp_path / "L"
    link.symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(UserError, match=r"is a symbolic link to '.*nowhere/x', which does not "
                                        r"exist; create that folder, or pass another --out"):
        _folder(mlp_bundle, link).prepare(resume=False, overwrite=False)
    loop = tmp_path / "loop"  # (session 45 probe: a link to itself was told "create that folder")
    loop.symlink_to("loop")
    with pytest.raises(UserError, match=r"is a symbolic link that leads back to itself; remove "
                                        r"it, or pass another --out"):
        _folder(mlp_bundle, loop).prepare(resume=False, overwrite=False)
    weights, *_ = trained_source(open_bundle(mlp_bundle), mlp_bundle, "--init-from")
    assert weights == mlp_bundle / "params.npz"
    assert "is a bundle folder: its weights are those it was exported with, not trained" in \
        capsys.readouterr().err


def test_a_stop_signal_as_a_finished_run_exits_leaves_its_status_0(mlp_bundle, tmp_path):
    """SIGTERM sent once a run said "trained weights:" ended it killed (status -15, no word)
    while the interpreter cleaned up, or in a traceback of runtime.cli.Terminated as the
    command returned (a session 44 probe: 5 of 6 tries). Its outcome stands: exit 0."""
    for trial in range(6):
        out = tmp_path / f"r{trial}"
        proc = start(mlp_bundle, out, "--steps", 4, "--checkpoint-every", 0)
        for line in proc.stdout:
            if line.startswith("trained weights:"):
                time.sleep(0.004 * trial)
                proc.send_signal(signal.SIGTERM)
                if trial % 2:  # (and a second one)
                    time.sleep(0.01)
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0 and "Traceback" not in err, (trial, proc.returncode,
                                                                       err)
        assert (out / "params.npz").is_file()


def test_a_resume_without_the_checkpoint_pointer_keeps_the_runs_run_json(cli, mlp_bundle,
                                                                         tmp_path):
    """Session 47 probe: with checkpoints/latest gone, the resume went on from the newest
    ckpt-*.npz (as it should) but wrote run.json again from its command line (its "created",
    and the seed of a checkpoint copied in): the folder's record of the run changed."""
    out = tmp_path / "run"
    r = cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 4, "--checkpoint-every", 2)
    assert r.returncode == 0, r.stderr
    (out / "params.npz").unlink()  # (a run stopped after its checkpoint at step 4)
    (out / "summary.json").unlink()
    before = (out / "run.json").read_bytes()
    (out / "checkpoints" / "latest").unlink()
    time.sleep(1.1)  # ("created" is to the second)
    r = cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 6, "--checkpoint-every", 2,
            "--resume")
    assert r.returncode == 0 and "resumed from step 4" in r.stdout, r.stdout + r.stderr
    assert (out / "run.json").read_bytes() == before


def test_a_damaged_params_file_of_a_run_points_to_its_checkpoints(cli, mlp_bundle, tmp_path):
    """Session 47 probe: `eval RUN` of a run whose params.npz was cut short said "re-export the
    bundle or pass another --weights file", a checkpoint of the same step beside it."""
    out = tmp_path / "run"
    assert cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 2).returncode == 0
    with open(out / "params.npz", "r+b") as f:
        f.truncate(5000)
    r = cli("eval", mlp_bundle, "--weights", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"its run's checkpoints may hold them: pass {out / 'checkpoints' / 'latest'} in its " \
        "place" in r.stderr and "re-export" not in r.stderr, r.stderr
    r = cli("eval", mlp_bundle, "--weights", out / "checkpoints" / "latest")
    assert r.returncode == 0, r.stderr


def test_eval_of_a_run_folder_names_a_damaged_checkpoint_once(cli, mlp_bundle, tmp_path):
    """Session 47 probe: `eval RUN` of a stopped run whose newest checkpoint is damaged said
    its warning twice (the folder was looked into twice)."""
    out = tmp_path / "run"
    assert cli("train", mlp_bundle, "--out", out, *QUIET, "--steps", 2, "--checkpoint-every",
               1).returncode == 0
    (out / "params.npz").unlink()
    with open(out / "checkpoints" / "ckpt-000002.npz", "r+b") as f:
        f.truncate(3000)
    r = cli("eval", out)
    assert r.returncode == 0 and "ckpt-000001.npz" in r.stdout, r.stdout + r.stderr
    said = [ln for ln in r.stderr.splitlines() if "is unusable" in ln]
    assert len(said) == 1 and "ckpt-000002.npz" in said[0], r.stderr
