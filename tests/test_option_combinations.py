"""Option combinations and less-travelled flags (a session 43 probe of about 230 commands):
each does what it says, or is one error line naming the way out."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from test_checkpoint import _trainer
from test_cli import ok, user_error

from runtime import run_log
from runtime.bundle import open_bundle
from runtime.checkpoint import TrainingInterrupted
from runtime.config import RunConfig
from runtime.data import Dataset, load_data
from runtime.run import train

QUIET = ("--no-progress", "--threads", 1)


def test_a_run_that_ends_inside_a_non_finite_streak_fails(cli, mlp_bundle, tmp_path):
    """--lr 1e30: step 1's update made every weight 1e30, steps 2-5 were skipped as NaN, and
    the run exited 0 saving those weights as "trained weights" (6 steps ended in the error)."""
    r = cli("train", mlp_bundle, "--steps", 5, "--lr", 1e30, "--out", tmp_path / "r", *QUIET)
    last = r.stderr.strip().splitlines()[-1]  # (after a warning a skipped step)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("error: the run ended inside 4 consecutive steps with a non-finite "
                           "loss or gradient") and "lower --lr" in last, r.stderr
    assert not (tmp_path / "r" / "params.npz").exists()


def test_export_model_takes_a_run_folder_as_weights(cli, mlp_bundle, tmp_path):
    """`export-model BUNDLE --weights RUN` was refused: "'RUN' is not a regular file; pass a
    .npz file or a run folder"."""
    ok(cli("train", mlp_bundle, "--steps", 3, "--out", tmp_path / "r", *QUIET))
    ok(cli("export-model", mlp_bundle, "--weights", tmp_path / "r", "--out", tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").is_file()


def test_contradicting_or_empty_export_options_are_refused(cli, tmp_path):
    np.savez(tmp_path / "ex.npz", x=np.zeros((4, 2, 64), np.float32))
    user_error(cli("export", "--model", "mlp", "--input-shape", "8,64", "--npz",
                   tmp_path / "ex.npz", "--out", tmp_path / "b"),
               "--input-shape 8,64 and --npz", "give other example inputs (a row of x: [2, 64])",
               "pass one of them")  # (where they agree both are taken: test_training's)
    for flag in ("--classes", "--lengths"):
        user_error(cli("export", "--model", "mlp", f"{flag}=", "--out", tmp_path / "b"),
                   f"{flag} '' is empty")
    # (session 45 probe: said as "export options: field 'calib_every'", not as the option)
    for flag, value, said in (("--calib-every", -1, "expected a number >= 0"),
                              ("--energy", "nan", "expected a finite number")):
        user_error(cli("export", "--model", "mlp", flag, value, "--out", tmp_path / "b"),
                   f"error: {flag} {value} is invalid: {said}")
    # (session 45 probe: "out of memory (Unable to allocate 7.28 TiB ...); give a --budget")
    user_error(cli("export", "--model", "mlp", "--pool", "none", "--head", 99999999999, "--out",
                   tmp_path / "b"), "--head 99999999999: a head of 99,999,999,999 outputs over "
               "10 features", "more than 2 GB, which no classifier's head needs; pass the number of classes")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("cmd, extra", [
    ("train", ("--val-split", 0.2, "--steps", 2)),
    ("eval", ("--val", "VAL")),
    ("train", ("--text-column", "review", "--steps", 2)),
], ids=["train-val-split", "eval-val", "train-text-column"])
def test_data_options_without_data_are_named(cli, mlp_bundle, tmp_path, cmd, extra):
    """--val / --val-split without --data blamed the built-in digits ("has its own fixed
    held-out split"); --text-column said digits did not fit the bundle."""
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    extra = [tmp_path / "val.npz" if e == "VAL" else e for e in extra]
    r = cli(cmd, mlp_bundle, *extra, "--out" if cmd == "train" else "--threads",
            tmp_path / "r" if cmd == "train" else 1)
    user_error(r, f"{extra[0]} was given without --data, which it applies to",
               "pass --data with a file or folder of the model's data")


def test_plan_in_vanilla_mode_does_not_rank_by_unused_options(cli, cnn_bundle):
    """`plan --mode vanilla --energy 0.9` said --energy was not used, then printed ranks from
    it (Rx 1)."""
    out = ok(cli("plan", cnn_bundle, "--data", "digits", "--mode", "vanilla", "--energy", 0.9,
                 "--threads", 1))
    assert "--energy is not used" in out and "(--mode vanilla: trained exactly" in out, out
    assert "ranks from calibration" not in out, out


class StopAt(Dataset):
    """Digits whose ``take`` call ``at`` (= step) sends this process SIGINT."""

    def __init__(self, base: Dataset, at: int) -> None:
        super().__init__("stop-digits", base.x, base.y)
        self.at, self.calls = at, 0

    def take(self, idx):
        if len(idx) <= 3:  # the run's data fingerprint, not a step
            return super().take(idx)
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().take(idx)


def test_a_stopped_run_logs_its_last_step(mlp_bundle, tmp_path, monkeypatch):
    """Past 10,000 steps metrics.jsonl keeps one step in 10, and a run stopped after step
    16494 had 16490 as its last line (`report` said 16490 steps). The stop's step is logged."""
    monkeypatch.setattr(run_log, "FULL_LOG_STEPS", 5)
    b = open_bundle(mlp_bundle)
    tr = _trainer(mlp_bundle)
    with pytest.raises(TrainingInterrupted) as exc:
        train(tr, StopAt(load_data("digits", b), 17),
              RunConfig(steps=100, checkpoint_every=50, progress=False), tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [e["step"] for e in map(json.loads, lines) if e.get("kind") == "step"]
    assert exc.value.step == 17 and steps[-1] == 17 and 16 not in steps, steps


def test_fleet_counts_are_named_one_at_a_time(cli, mlp_bundle, tmp_path):
    user_error(cli("fleet", "server", mlp_bundle, "--rounds", 0, "--out", tmp_path / "f"),
               "--rounds 0 is invalid: must be at least 1")
    user_error(cli("fleet", "client", mlp_bundle, "--data", "digits", "--server",
                   "127.0.0.1:9", "--batch", 0, "--out", tmp_path / "c"),
               "--batch 0 is invalid: must be at least 1")
    r = user_error(cli("fleet", "client", mlp_bundle, "--data", "digits", "--server=",
                       "--out", tmp_path / "c"), "--server is empty ('' was given); pass a value")
    assert "default" not in r, r


def test_export_options_it_does_not_read_are_noted(cli, tmp_path):
    """--pool mean (the default) without --head, --seed on a built-in and --saved-int8 on a
    bundle without an INSTANT layer were taken without a word (a session 43 probe)."""
    user_error(cli("export", "--model", "mlp", "--pool", "mean", "--out", tmp_path / "b"),
               "--pool mean applies to a new classifier: pass --head CLASSES too, or leave "
               "--pool out")
    out = ok(cli("export", "--model", "mlp", "--seed", 3, "--saved-int8",
                 "--instant-exclude", "*", "--out", tmp_path / "b"))
    assert "0 INSTANT layers" in out, out
    assert "note: --seed seeds a model factory (path/file.py:factory) before it draws its " \
        "weights; 'mlp' is not one, so it is not used" in out, out
    assert "note: --saved-int8 stores INSTANT layers' saved activations as int8; this bundle " \
        "has no INSTANT layer, so it is not used" in out, out
    plain = ok(cli("export", "--model", "mlp", "--out", tmp_path / "c"))
    assert "note: --" not in plain, plain


def test_options_a_fleet_or_eval_does_not_read_are_named(cli, mlp_bundle, mlp_head_bundle,
                                                        tmp_path):
    """`fleet server --text-column` without --data, `fleet client` INSTANT options on a bundle
    without INSTANT layers and `eval --seed` without --val-split were taken silently (a session
    43 probe)."""
    user_error(cli("fleet", "server", mlp_bundle, "--text-column", "review", "--out",
                   tmp_path / "f"), "--text-column was given without --data",
               "pass --data, or leave --text-column out")
    r = cli("fleet", "client", mlp_head_bundle, "--data", "digits", "--server", "127.0.0.1:9",
            "--max-rank", 3, "--connect-timeout", 1, "--out", tmp_path / "c")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "note: the bundle has no INSTANT layer, so it trains exactly; --max-rank is not " \
        "used" in r.stdout, r.stdout
    out = ok(cli("eval", mlp_bundle, "--seed", 3, "--threads", 1))
    assert "note: --seed draws --val-split's held-out rows; without --val-split it is not " \
        "used" in out, out


def test_a_resume_without_data_names_the_data_the_run_trained_on(cli, tmp_path):
    """`train --resume` without --data blamed the built-in digits ("does not fit this bundle")
    where the run had trained on the user's file (a session 44 probe)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 16)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(64, 16)).astype(np.float32),
             y=rng.integers(0, 4, 64))
    ok(cli("export", "--model", tmp_path / "m.onnx", "--out", tmp_path / "b"))
    ok(cli("train", tmp_path / "b", "--data", tmp_path / "d.npz", "--steps", 2, "--out",
           tmp_path / "r", *QUIET))
    user_error(cli("train", tmp_path / "b", "--resume", "--steps", 4, "--out", tmp_path / "r",
                   *QUIET), "no --data given, and --resume reads the data from --data as the "
               f"run did: it trained on '{tmp_path / 'd.npz'}'; pass --data")


def test_a_resume_without_data_names_the_runs_data_where_the_default_fits(cli, mlp_bundle,
                                                                          tmp_path):
    """Session 47 probe: a run of an .npz that the built-in digits also fit, resumed without
    --data, was told "checkpoint was written with training rows 1438 (this run: 1437)"."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(80, 64)).astype(np.float32),
             y=rng.integers(0, 10, 80))
    ok(cli("train", mlp_bundle, "--data", tmp_path / "d.npz", "--val-split", 0.2, "--steps", 2,
           "--out", tmp_path / "r", *QUIET))
    user_error(cli("train", mlp_bundle, "--resume", "--steps", 4, "--out", tmp_path / "r",
                   *QUIET), f"it trained on '{tmp_path / 'd.npz'}'; pass --data",
               "with the run's --val-split or --val")


def test_a_budget_below_what_the_runtime_takes_at_start_is_refused_at_once(cli, mlp_bundle,
                                                                          tmp_path):
    """A session 45 probe: --budget 40MB (below the ~60 MB Python and the runtime's libraries
    take before a bundle is read) went on to load sessions and planning probes, 76 MB before
    the plan's refusal, which blamed "a planning probe alone"."""
    for cmd in ("train", "plan"):
        extra = ("--out", tmp_path / "r", "--no-progress") if cmd == "train" else ()
        user_error(cli(cmd, mlp_bundle, "--budget", "30MB", *extra),
                   "--budget 30 MB is below what the runtime already takes before it reads the "
                   "bundle", "MB: Python and its libraries); raise --budget well above it")
    assert not (tmp_path / "r").exists()


def test_the_help_states_the_limits_the_options_are_checked_against():
    """Session 47 probe: --threads and --flop-ratio were refused above a maximum the help did
    not state. The help's figures are the validators' own."""
    from contract.errors import UserError
    from runtime.cli import _parser as build_parser
    from runtime.config import InstantConfig, SessionConfig, max_threads

    helps = {}
    for name in ("train", "plan", "eval"):
        sub = [a for a in build_parser()._actions if hasattr(a, "choices") and a.choices
               and name in a.choices][0].choices[name]
        helps[name] = " ".join(sub.format_help().split())
    assert all("at most 4 per core" in h for h in helps.values())
    assert "no cap; at most 4)" in helps["train"]
    assert max_threads() == 4 * (os.cpu_count() or 1)
    SessionConfig(threads=max_threads())
    with pytest.raises(UserError, match="--threads"):
        SessionConfig(threads=max_threads() + 1)
    InstantConfig(flop_ratio=4.0)
    with pytest.raises(UserError, match="--flop-ratio"):
        InstantConfig(flop_ratio=4.000001)
