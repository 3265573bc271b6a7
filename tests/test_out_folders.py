"""Output folders lose nothing (session 22's probe of --out): what appears at ``export --out``
while an export runs, a set-aside that fails half way, ``export-model`` over its own sources or
into a bundle, a full disk under ``export-model``, fleet folders holding a user's files and two
fleet servers on one folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contract import UserError

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def _replace_refused(monkeypatch, refused):
    """``os.replace`` of a source that ``refused(src)`` fails with EACCES while in the block."""
    real = os.replace

    def failing(src, dst, *args, **kw):
        if refused(src):
            raise PermissionError(13, "Permission denied", str(src))
        return real(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", failing)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "replace", real)


@contextlib.contextmanager
def _small_disk(tmp_path: Path, size: str, options: str = ""):
    """A tmpfs of ``size`` mounted for the block: a disk that fills up (root only;
    ``options``: more mount options, e.g. "ro,")."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size={size}", "tmpfs",
                       str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield small
    finally:
        subprocess.run(["umount", str(small)], check=False)


def _one_line(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_what_appears_at_export_out_while_it_runs_is_never_replaced(cli, tmp_path):
    """The --out check ran only at start-up and the move deleted whatever was at --out: a
    folder the user made meanwhile (no --overwrite) and, with --overwrite, a run trained into
    BUNDLE/run meanwhile. The model factory below makes such a folder during the export."""
    out = tmp_path / "b"
    for overwrite, what in ((False, "thesis.txt"), (True, "run")):
        if overwrite:
            assert cli("export", "--model", "mlp", "--out", out).returncode == 0
        factory = tmp_path / f"model_{int(overwrite)}.py"
        factory.write_text(textwrap.dedent(f"""
            from pathlib import Path
            import torch

            def make():
                out = Path({str(out)!r})
                out.mkdir(exist_ok=True)
                if {overwrite!r}:
                    (out / "run").mkdir()
                    (out / "run" / "params.npz").write_bytes(b"a run trained meanwhile")
                else:
                    (out / "thesis.txt").write_text("mine")
                return torch.nn.Sequential(torch.nn.Linear(4, 2))
            """))
        args = ["export", "--model", f"{factory}:make", "--input-shape", "2,4", "--out", out]
        r = cli(*args, *(["--overwrite"] if overwrite else []))
        _one_line(r, str(out), "another --out")
        assert (out / what).exists(), sorted(os.listdir(out))
        assert not [p for p in tmp_path.iterdir() if ".export." in p.name or ".old." in p.name]
        shutil.rmtree(out)


def test_a_set_aside_that_fails_half_way_puts_the_run_back(mlp_bundle, tmp_path, monkeypatch):
    """--overwrite moved the old run's files aside one by one: a move that failed (a
    read-only checkpoints folder) left the run split in two, and the next resume deleted the
    half it took for the replacement's."""
    from test_checkpoint import _folder

    out = tmp_path / "run"
    first = _folder(mlp_bundle, out)
    first.prepare(resume=False, overwrite=False)
    first.finish(True)
    (out / "checkpoints" / "ckpt-000002.npz").write_bytes(b"the old run's checkpoint")
    (out / "params.npz").write_bytes(b"the old run's weights")
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 1.0}\n')
    before = _tree(out)
    with _replace_refused(monkeypatch, lambda src: Path(src).name == "checkpoints"), \
            pytest.raises(UserError, match=r"cannot set the old run in .* aside .*left as it was"):
        _folder(mlp_bundle, out).prepare(resume=False, overwrite=True)
    assert _tree(out) == before


def test_export_model_never_writes_over_its_sources_or_into_a_bundle(cli, mlp_bundle, tmp_path):
    """export-model --out R/params.npz replaced the run's weights and --out BUNDLE/infer.onnx a
    bundle file (every later command refused the bundle; without torch it cannot be
    re-exported)."""
    bundle = Path(shutil.copytree(mlp_bundle, tmp_path / "mlp"))
    run = tmp_path / "r"
    assert cli("train", bundle, "--data", "digits", "--steps", 2, "--out", run,
               "--no-progress").returncode == 0
    before = _tree(tmp_path)
    for out in (run / "params.npz", run / "summary.json", run / "checkpoints" / "m.onnx",
                bundle / "infer.onnx", bundle / "model.onnx"):
        r = cli("export-model", run, "--bundle", bundle, "--out", out, "--overwrite")
        _one_line(r, "pass")
        assert _tree(tmp_path) == before, out
    # an existing --out in the bundle folder: told it is the bundle's folder, not to pass
    # --overwrite (which was then refused for the folder: session 47 probe)
    r = cli("export-model", run, "--bundle", bundle, "--out", bundle / "infer.onnx")
    _one_line(r, "into the bundle folder")
    # a FIFO (or a device, or a link to one) is no file to write: --overwrite replaced it with
    # one (session 47 probe: a copy of /dev/null); report alike
    os.mkfifo(tmp_path / "pipe.onnx")
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(tmp_path / "pipe.png", tmp_path / "link.png")
    before = _tree(tmp_path)
    for args in (("export-model", run, "--bundle", bundle, "--out", tmp_path / "pipe.onnx"),
                 ("report", run, "--out", tmp_path / "pipe.png"),
                 ("report", run, "--out", tmp_path / "link.png")):
        _one_line(cli(*args, "--overwrite"), "is a FIFO, not a file")
        assert _tree(tmp_path) == before, args
    assert (tmp_path / "pipe.onnx").is_fifo() and (tmp_path / "pipe.png").is_fifo()
    assert cli("export-model", run, "--bundle", bundle, "--out", run / "model.onnx"
               ).returncode == 0  # beside the run's files: fine


def test_export_model_on_a_full_disk_leaves_nothing_half_written(cli, mlp_bundle, tmp_path):
    """A full disk while the .safetensors was written: a traceback, a .onnx without its
    companions, and a retry refused ("already exists"). A small tmpfs is the full disk."""
    with _small_disk(tmp_path, "300k") as small:
        (small / "filler").write_bytes(b"\0" * 200_000)
        r = cli("export-model", mlp_bundle, "--out", small / "m.onnx")
        _one_line(r, "nothing at --out was changed")
        assert sorted(os.listdir(small)) == ["filler"]
        (small / "filler").unlink()
        assert cli("export-model", mlp_bundle, "--out", small / "m.onnx").returncode == 0


def test_an_export_on_a_full_disk_names_its_out_and_keeps_the_old_bundle(cli, tmp_path):
    """A full disk while the bundle was written: the error named no path ("No space left on
    device; check the path ..."); it names --out, and the bundle already there stays."""
    with _small_disk(tmp_path, "400k") as small:
        assert cli("export", "--model", "mlp", "--out", small / "b").returncode == 0
        st = os.statvfs(small)
        (small / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 40_000))
        before = _tree(small)
        r = cli("export", "--model", "cnn", "--out", small / "b", "--overwrite")
        _one_line(r, f"cannot write the bundle to '{small / 'b'}': No space left on device")
        assert _tree(small) == before


def test_fleet_folders_holding_a_users_files_are_refused(cli, mlp_bundle, tmp_path):
    """A fleet client replaced a user's summary.json and wrote beside their notes with no flag;
    a server wrote into a folder of theirs, and called their params.npz an earlier aggregate
    that --overwrite would replace."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "params.npz").write_bytes(b"my own weights")
    before = _tree(tmp_path)
    runs = [("server", mlp_bundle, "--out", mine), ("client", mlp_bundle, "--data", "digits",
                                                    "--server", "127.0.0.1:9", "--out", mine),
            ("server", mlp_bundle, "--out", theirs, "--overwrite"),
            ("client", mlp_bundle, "--data", "digits", "--server", "127.0.0.1:9", "--out",
             theirs)]
    for role, *args in runs:
        r = subprocess.run([sys.executable, "-m", "runtime.fleet", role, *map(str, args)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        _one_line(r, "new or empty folder")
        assert _tree(tmp_path) == before, (role, args)


def test_a_second_fleet_server_on_one_folder_is_refused(mlp_bundle, tmp_path):
    """Two servers into one --out both reported success and one aggregate was lost."""
    import socket

    out = tmp_path / "fleet"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
    first = subprocess.Popen([sys.executable, "-m", "runtime.fleet", "server", str(mlp_bundle),
                              "--out", str(out), "--address", f"127.0.0.1:{ports[0]}",
                              "--min-clients",
                              "1", "--wait", "30"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = first.stdout.readline()  # "fleet server on ..." once it holds the folder
        assert "fleet server on" in line, (line, first.stderr.read() if first.poll() else "")
        r = subprocess.run([sys.executable, "-m", "runtime.fleet", "server", str(mlp_bundle),
                            "--out", str(out), "--address", f"127.0.0.1:{ports[1]}",
                            "--overwrite"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        _one_line(r, "in use by another fleet process of this machine")
    finally:
        first.kill()
        first.wait()


def test_an_export_overwrite_of_a_bundle_a_run_trains_is_refused(cli, tmp_path):
    """Session 46 probe: `export --overwrite` replaced the bundle a running `train` read; the
    run ended "trained weights: ..." and could then be neither evaluated nor resumed (its bundle
    was gone). The run holds its bundle (a shared lock); the export is refused while it runs."""
    import time

    bundle, run = tmp_path / "b", tmp_path / "run"
    assert cli("export", "--model", "mlp", "--out", bundle).returncode == 0
    before = _tree(bundle)
    train = subprocess.Popen([sys.executable, "-m", "runtime", "train", str(bundle), "--data",
                              "digits", "--steps", str(10 ** 7), "--checkpoint-every", "20",
                              "--threads", "1", "--no-progress", "--out", str(run)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints").is_dir() and time.monotonic() < deadline:
            assert train.poll() is None
            time.sleep(0.2)
        r = cli("export", "--model", "mlp", "--out", bundle, "--overwrite")
        _one_line(r, str(bundle), "a running train", "another --out")
        assert _tree(bundle) == before
    finally:
        train.kill()
        train.wait()
    assert cli("export", "--model", "mlp", "--out", bundle, "--overwrite").returncode == 0
    # a command's hold ends with the command, not with its process (a review: a notebook that
    # ran `main(["train", ...])` could never export over the bundle again)
    from contract import bundle_in_use, hold_bundle, release_bundles

    hold_bundle(bundle)
    assert bundle_in_use(bundle)
    release_bundles()
    assert not bundle_in_use(bundle)


def test_a_run_set_aside_by_an_interrupted_overwrite_is_named_not_called_empty(
        cli, mlp_bundle, tmp_path):
    """An --overwrite killed before its first checkpoint leaves the old run in .replaced.PID
    (the next train puts it back); eval and export-model called the folder empty."""
    run = tmp_path / "r"
    assert cli("train", mlp_bundle, "--data", "digits", "--steps", 2, "--out", run,
               "--no-progress").returncode == 0
    aside = run / ".replaced.4242"
    aside.mkdir()
    for f in ("params.npz", "summary.json", "metrics.jsonl", "checkpoints"):
        (run / f).rename(aside / f)
    (run / "checkpoints").mkdir()  # the killed replacement's empty one
    r = cli("eval", mlp_bundle, "--data", "digits", "--weights", run)
    _one_line(r, ".replaced.4242", "puts it back")
    r = cli("export-model", run, "--out", tmp_path / "m.onnx")
    _one_line(r, ".replaced.4242", "puts it back")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_an_export_stopped_by_sigterm_leaves_no_half_written_bundle(tmp_path, sig):
    """SIGTERM killed export without its clean-up: a probe's four stopped exports left four
    hidden half-written bundles (.B.export.*) beside --out; SIGHUP (a closed ssh session) did
    until session 48."""
    import time

    p = subprocess.Popen([sys.executable, "-m", "runtime", "export", "--model", "token-mlp",
                          "--out", str(tmp_path / "B")], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,  # (the tests may run under nohup)
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    end = time.monotonic() + 120
    while not list(tmp_path.glob(".B.export.*")) and p.poll() is None:
        assert time.monotonic() < end
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    # (a fresh clone's run: the signal came inside an import's lock callback, where Python
    # drops the exception; the export went on and exited 0)
    assert p.returncode == 128 + sig and err.strip().splitlines() == ["interrupted"], err
    assert sorted(os.listdir(tmp_path)) == []


def test_a_train_stopped_while_it_reads_its_data_says_so(mlp_bundle, tmp_path):
    """Session 30 probe: SIGTERM while `train` read and tokenised its data (before its run
    folder takes the signals over) ended the process without a word. It now says
    "interrupted" in one line and exits 143, and --out was never made."""
    import time

    code = textwrap.dedent("""
        import sys, time
        from runtime import cli

        def slow(*args, **kw):
            print("reading", flush=True)
            time.sleep(60)

        cli._load_data = slow
        sys.exit(cli.main(sys.argv[1:]))
    """)
    p = subprocess.Popen([sys.executable, "-c", code, "train", str(mlp_bundle), "--data",
                          "digits", "--steps", "2", "--out", str(tmp_path / "run")], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "reading"
        time.sleep(0.2)
        p.terminate()
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143 and err.strip().splitlines() == ["interrupted"], err
    assert not (tmp_path / "run").exists()


def test_a_symbolic_link_loop_as_a_path_is_one_error_line(cli, mlp_bundle, tmp_path):
    """Session 30 probe: `export-model --out` (and `eval` of a run whose recorded data path had
    become one) through a symbolic link loop ended in Python 3.11's RuntimeError traceback
    from Path.resolve(); now one line naming it (exit 2)."""
    r = cli("train", mlp_bundle, "--data", "digits", "--steps", "2", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    r = cli("export-model", tmp_path / "r", "--out", tmp_path / "loopA" / "q.onnx")
    _one_line(r, "a symbolic link that leads back to itself", "loopA")


def test_a_read_only_out_names_another_out_as_the_way(cli, mlp_bundle, tmp_path):
    """Session 30 probe: on a read-only mount, `export`, `export-model` and `report` named the
    problem but no way out (`report` through the generic "check the path" line: its clean-up
    of the temporary file failed too)."""
    r = cli("train", mlp_bundle, "--data", "digits", "--steps", "2", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    with _small_disk(tmp_path, "1m", "ro,") as ro:
        for argv in (("export", "--model", "mlp", "--out", ro / "b"),
                     ("export-model", tmp_path / "r", "--out", ro / "m.onnx"),
                     ("report", tmp_path / "r", "--out", ro / "r.png")):
            _one_line(cli(*argv), "Read-only file system", "pass another --out")


def test_the_next_export_drops_what_a_killed_one_left(tmp_path):
    """SIGKILL (the OOM killer) leaves no clean-up at all: a concurrency probe's killed exports
    left their hidden half-written bundles beside --out for good. The next export to that
    --out removes those whose process is gone, and no other hidden folder."""
    import time

    p = subprocess.Popen([sys.executable, "-m", "runtime", "export", "--model", "token-mlp",
                          "--out", str(tmp_path / "B")], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while not list(tmp_path.glob(".B.export.*")) and p.poll() is None:
        assert time.monotonic() < end
        time.sleep(0.02)
    p.kill()
    p.wait()
    assert list(tmp_path.glob(".B.export.*")), "the export had finished before the kill"
    (tmp_path / ".B.export.keep").mkdir()  # no process id in its name: not an export's
    r = subprocess.run([sys.executable, "-m", "runtime", "export", "--model", "mlp", "--out",
                        str(tmp_path / "B")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == [".B.export.keep", "B"]


def test_export_model_and_report_drop_what_killed_ones_left(tmp_path, cli, mlp_bundle):
    """A SIGKILLed export-model left its hidden staging folder (a whole model) beside --out,
    and a SIGKILLed report its temporary PNG in the run folder, for good (session 36 probe: 10
    kills, 10 model copies). The next one removes those whose process is gone, not a live
    process's, not another name's."""
    r = cli("train", mlp_bundle, "--data", "digits", "--steps", 2, "--batch", 8, "--threads", 1,
            "--no-progress", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    dead, alive = 999_999_999, os.getpid()  # (above any pid_max: gone; this test's: running)
    left = [tmp_path / f".m.onnx.export-model.{dead}.ab_1", tmp_path / f".r.png.tmp{dead}.png"]
    kept = [tmp_path / f".m.onnx.export-model.{alive}.cd_2", tmp_path / f".r.png.tmp{alive}.png",
            tmp_path / f".n.onnx.export-model.{dead}.ef_3"]
    for p in left + kept:
        p.mkdir() if p.name.endswith(("_1", "_2", "_3")) else p.write_bytes(b"x")
    assert cli("export-model", tmp_path / "r", "--out", tmp_path / "m.onnx").returncode == 0
    assert cli("report", tmp_path / "r", "--out", tmp_path / "r.png").returncode == 0
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


_INTERRUPTED_MOVE = """
import os, signal, sys
from runtime.export_model import export_model
real, moved = os.replace, []
def replace(src, dst):  # Ctrl-C as the second file moves in place
    if ".export-model." in str(src) and os.path.dirname(dst) == os.path.dirname(sys.argv[2]):
        moved.append(dst)
        if len(moved) == 2:
            os.kill(os.getpid(), signal.SIGINT)
    return real(src, dst)
os.replace = replace
try:
    export_model(sys.argv[1], sys.argv[2], overwrite=True)
except KeyboardInterrupt:
    print("interrupted after", len(moved))
"""


def test_an_interrupted_export_model_never_mixes_two_models(tmp_path, cli, mlp_bundle):
    """Ctrl-C between the moves of an ``export-model --overwrite`` left the old model's .onnx
    beside the new one's .safetensors (session 36 probe, up to 0.35 apart): a stop signal now
    waits until every file is in place."""
    for run, steps in (("a", 1), ("b", 3)):
        r = cli("train", mlp_bundle, "--data", "digits", "--steps", steps, "--batch", 8,
                "--threads", 1, "--no-progress", "--out", tmp_path / run)
        assert r.returncode == 0, r.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "clean").mkdir()
    assert cli("export-model", tmp_path / "a", "--out", tmp_path / "m" / "m.onnx").returncode == 0
    assert cli("export-model", tmp_path / "b", "--out", tmp_path / "clean" / "m.onnx"
               ).returncode == 0
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_MOVE, str(tmp_path / "b"),
                        str(tmp_path / "m" / "m.onnx")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert "interrupted after" in r.stdout, r.stdout + r.stderr
    for f in os.listdir(tmp_path / "clean"):
        assert (tmp_path / "m" / f).read_bytes() == (tmp_path / "clean" / f).read_bytes(), f


def test_a_fleet_server_stopped_after_a_round_can_use_its_folder_again(tmp_path):
    """A server stopped after round 1 leaves the round's params.npz (and its lock), no summary:
    it was refused as "no fleet server wrote" even with --overwrite or --resume (review)."""
    import numpy as np

    from runtime.fleet.folders import check_server_out
    from runtime.fleet.local import save_run

    out = tmp_path / "fleet"
    save_run(out, {"w": np.zeros(2, np.float32)})
    (out / ".fleet-lock").touch()
    assert check_server_out(out, resume=True, overwrite=False) is True
    assert check_server_out(out, resume=False, overwrite=True) is False
    with pytest.raises(UserError, match="aggregate of an earlier fleet run"):
        check_server_out(out, resume=False, overwrite=False)


def test_a_signal_between_the_two_renames_of_an_export_keeps_the_old_bundle(
        cli, tmp_path, monkeypatch):
    """The swap's put-back ran on OSError only: a SIGTERM (Terminated) between setting the old
    bundle aside and moving the new one in deleted both (review)."""
    from runtime import cli as cli_module

    out = tmp_path / "b"
    assert cli("export", "--model", "mlp", "--out", out).returncode == 0
    before = _tree(out)
    real = os.replace

    def signal_on_move_in(src, dst, *args, **kw):
        if ".export." in Path(src).name:
            raise cli_module.Terminated
        return real(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", signal_on_move_in)
    assert cli_module.main(["export", "--model", "mlp", "--out", str(out), "--overwrite"]) == 143
    monkeypatch.setattr(os, "replace", real)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_set_aside_whose_roll_back_fails_too_deletes_nothing(mlp_bundle, tmp_path,
                                                               monkeypatch):
    """The roll-back of a failed set-aside failing as well: finish() then took the old run for
    set aside and deleted what was still in the folder (review)."""
    from test_checkpoint import _folder

    out = tmp_path / "run"
    first = _folder(mlp_bundle, out)
    first.prepare(resume=False, overwrite=False)
    first.finish(True)
    (out / "checkpoints" / "ckpt-000002.npz").write_bytes(b"the old run's checkpoint")
    (out / "params.npz").write_bytes(b"the old run's weights")
    files = {k: v for k, v in _tree(out).items() if v != "dir"}
    def refused(src):
        return Path(src).name == "checkpoints" or (Path(src).name == "run.json"
                                                   and ".replaced." in str(src))

    with _replace_refused(monkeypatch, refused), \
            pytest.raises(UserError, match=r"run\.json could not be moved back and wait in"):
        _folder(mlp_bundle, out).prepare(resume=False, overwrite=True)
    after = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out)
            parts = rel.parts[1:] if rel.parts[0].startswith(".replaced.") else rel.parts
            after[str(Path(*parts))] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert after == files  # every file kept, run.json in the set-aside folder
    _folder(mlp_bundle, out).prepare(resume=True, overwrite=False)  # the next run puts it back
    assert (out / "run.json").is_file() and not list(out.glob(".replaced.*"))


def test_a_hard_link_in_a_run_is_never_written_through(cli, mlp_bundle, tmp_path):
    """Session 28 probe: a bundle's run folder shipping metrics.jsonl as a hard link to a file
    outside made ``train --resume`` truncate that file and write the run's lines into it (a
    resume cuts metrics.jsonl back and appends in place). A file with other names is refused
    as a symbolic link is: in the bundle's run and in a run the user names, before anything is
    written."""
    bundle = tmp_path / "bundle"
    shutil.copytree(mlp_bundle, bundle)
    outside = tmp_path / "precious.txt"
    for out in (bundle / "run", tmp_path / "own"):
        assert cli("train", bundle, "--data", "digits", "--steps", 2, "--no-progress",
                   "--checkpoint-every", 2, "--out", out).returncode == 0
        outside.write_text("precious\n")
        (out / "metrics.jsonl").unlink()
        os.link(outside, out / "metrics.jsonl")
        _one_line(cli("train", bundle, "--data", "digits", "--steps", 4, "--no-progress",
                      "--resume", "--out", out), "metrics.jsonl is a hard link")
        assert outside.read_text() == "precious\n"
        (out / "metrics.jsonl").unlink()


def test_a_bundle_cannot_lead_its_default_run_folders_elsewhere_by_a_link(cli, mlp_bundle,
                                                                          tmp_path):
    """Session 23 probe: a bundle shipping ``run`` as a link to someone's run made ``train
    --overwrite`` (default --out BUNDLE/run) replace that run, a link to an empty folder got the
    run written there, and eval read the weights through it. Every default folder inside the
    bundle (run, fleet, fleet-client) is refused when it, or a file in it, is a link."""
    bundle = tmp_path / "bundle"
    shutil.copytree(mlp_bundle, bundle)
    elsewhere = tmp_path / "someones_run"
    assert cli("train", mlp_bundle, "--data", "digits", "--steps", 2, "--no-progress",
               "--out", elsewhere).returncode == 0
    before = _tree(tmp_path / "someones_run")
    (bundle / "run").symlink_to(elsewhere)
    for args in (("train", bundle, "--data", "digits", "--steps", 2, "--no-progress",
                  "--overwrite"),
                 ("eval", bundle, "--data", "digits"),
                 ("export-model", bundle, "--out", tmp_path / "m.onnx")):
        _one_line(cli(*args), "bundle/run is a symbolic link", "--out")
    assert _tree(elsewhere) == before and not (tmp_path / "m.onnx").exists()
    # a real folder holding a link (its weights, its checkpoints)
    (bundle / "run").unlink()
    (bundle / "run" / "checkpoints").mkdir(parents=True)
    (bundle / "run" / "params.npz").symlink_to(elsewhere / "params.npz")
    _one_line(cli("eval", bundle, "--data", "digits"), "run/params.npz is a symbolic link")
    (bundle / "run" / "params.npz").unlink()
    ckpt = next((elsewhere / "checkpoints").glob("ckpt-*.npz"))
    (bundle / "run" / "checkpoints" / ckpt.name).symlink_to(ckpt)
    _one_line(cli("eval", bundle, "--data", "digits"), f"{ckpt.name} is a symbolic link")
    # the fleet's defaults
    for role, name, extra in (("server", "fleet", ()),
                              ("client", "fleet-client", ("--data", "digits", "--server",
                                                          "127.0.0.1:9"))):
        (bundle / name).symlink_to(elsewhere)
        r = subprocess.run([sys.executable, "-m", "runtime.fleet", role, str(bundle), *extra],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        _one_line(r, f"bundle/{name} is a symbolic link")
    assert _tree(elsewhere) == before


SAVE_FAILS = """
import errno, sys
from runtime.trainer import Trainer
def full(self, path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
Trainer.save_params = full
from runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_overwrite_whose_last_files_fail_keeps_the_new_run_it_names(cli, run_python,
                                                                      mlp_bundle, tmp_path):
    """Session 35 probe: an --overwrite run whose params.npz met a full disk after its last
    checkpoint put the old run back, while its line named that (removed) checkpoint and a
    --resume, which then found the old run. The new run stands now, and the resume finishes
    it; a run whose checkpoints folder holds a user's files (or a run written into it) is not
    replaced with them, and a full disk leaves no write probe behind."""
    run = tmp_path / "r"
    common = ["train", mlp_bundle, "--data", "digits", "--no-progress", "--out", run]
    assert cli(*common, "--steps", 4).returncode == 0
    r = run_python(SAVE_FAILS, *common, "--steps", 6, "--checkpoint-every", 0, "--overwrite")
    _one_line(r, "cannot write", "params.npz' (No space left on device); the last checkpoint",
              "ckpt-000006.npz is intact", "--resume")
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-000006.npz", "latest"], r.stderr
    assert not [n for n in os.listdir(run) if n.startswith(".")], os.listdir(run)
    r = cli(*common, "--steps", 6, "--checkpoint-every", 0, "--resume")
    assert r.returncode == 0 and (run / "params.npz").is_file(), r.stderr

    (run / "checkpoints" / "NOTES.txt").write_text("mine")
    before = _tree(run)
    _one_line(cli(*common, "--steps", 2, "--overwrite"), "its checkpoints folder also holds "
              "files that are not checkpoints (NOTES.txt)", "move them out of it")
    _one_line(cli(*common[:-1], run / "checkpoints" / "sub", "--steps", 2),
              "is inside the checkpoints folder of the run in")
    assert _tree(run) == before
    with _small_disk(tmp_path, "200k") as small:
        st = os.statvfs(small)
        (small / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize))
        r = cli(*common[:-1], small / "r2", "--steps", 2)
        assert r.returncode == 2 and "No space left on device" in r.stderr, r.stderr
        left = [str(p) for p in small.rglob(".write-test*")]
        assert not left, left


def test_an_export_through_a_link_writes_where_it_leads_readable_by_all(cli, tmp_path):
    """Session 35 probe: ``export --out LINK`` replaced the link by a folder of its own (the
    bundle meant for the folder it leads to, say an SD card, stayed on the local disk), and a
    bundle folder was 0700 whatever the umask (mkdtemp's), so another account could not train
    it; ``export-model`` of a bundle without a run called its initial weights "trained"."""
    (tmp_path / "sd").mkdir()
    (tmp_path / "bundle").symlink_to("sd")
    r = cli("export", "--model", "mlp", "--out", tmp_path / "bundle")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bundle").is_symlink() and (tmp_path / "sd" / "manifest.json").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "sd").stat().st_mode & 0o777 == 0o777 & ~mask
    r = cli("export-model", tmp_path / "sd", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0 and "untrained tensors: the bundle's initial weights" in r.stdout \
        and " trained tensors" not in r.stdout, r.stdout
    # a path's control characters are escaped in success lines too (they reached the terminal)
    r = cli("export-model", tmp_path / "sd", "--out", tmp_path / "red\x1b[31m.onnx")
    assert r.returncode == 0 and "\x1b" not in r.stdout and "red\\x1b[31m.onnx" in r.stdout, \
        r.stdout


def test_eval_shows_a_run_folders_control_characters_escaped(cli, mlp_bundle, tmp_path):
    """Session 47 probe: `eval RUN` of a run folder named with a newline and an ESC printed them
    raw (its note and result lines split, the terminal turned red), as train does not."""
    run = tmp_path / "r\nnl\x1b[31m"
    assert cli("train", mlp_bundle, "--steps", 1, "--out", run, "--no-progress").returncode == 0
    for args in ((run,), (mlp_bundle, "--weights", run)):
        r = cli("eval", *args)
        assert r.returncode == 0 and "\x1b" not in r.stdout, r.stdout
        assert "r\\nnl\\x1b[31m" in r.stdout and "\nnl" not in r.stdout, r.stdout


def test_a_run_folder_still_without_a_checkpoint_is_said_to_be_training(tmp_path):
    """Session 48 probe: `eval --weights RUN` while that run was still planning said "is a
    folder without params.npz or a checkpoint", as of a folder holding nothing; a run holds its
    folder (flock) and the message now says it trains there."""
    from contract import UserError
    from runtime.export_model import trained_weights
    from runtime.run_folder import held_lock, hold_folder

    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        trained_weights(run.parent, "--weights")
    assert "training run" not in str(e.value)
    fd = hold_folder(run, "busy")
    try:
        with pytest.raises(UserError, match=r"without params.npz or a checkpoint; .*a training "
                                            r"run is writing it and has written no checkpoint"):
            trained_weights(run, "--weights")
    finally:
        held_lock(fd, False)
        os.close(fd)
    with pytest.raises(UserError) as e:
        trained_weights(run, "--weights")
    assert "training run" not in str(e.value) and "weights are gone" not in str(e.value)
    # a run's folder left with its run.json alone (session 49 probe: no way out named)
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match=r"it is a run's folder whose weights are gone \(deleted, "
                                        r"or the run ended before its first checkpoint\): train "
                                        r"it again with --overwrite$"):
        trained_weights(run, "--weights")
