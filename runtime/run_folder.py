"""The ``--out`` folder of one training run (``runtime/run.py`` runs it): what it may hold, how
``--resume`` / ``--overwrite`` treat an earlier run in it, and how a signal before training
begins puts it back as it was.

Why one module (556 lines): :class:`RunFolder`'s prepare, finish and signal handler share one
state (what the folder held, the run set aside, a signal waiting while files move); split, each
part would reach into the others' fields."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path

from contract import UserError, atomic_write, bundle_in_use, write_text

from .checkpoint import (
    StartupInterrupted,
    TrainingInterrupted,
    has_checkpoints,
    newest_checkpoint,
)
from .memory import held_lock
from .run_files import (
    MAX_RUN_JSON_BYTES,
    RUN_FILES,
    _first_link,
    check_run_links,
    json_object,
    link_kind,
    run_class_names,
    with_bundle_from_run,
)

__all__ = ["RUN_FILES", "RunFolder", "bundle_run", "check_out_path", "check_run_links",
           "check_same_bundle", "hold_folder", "json_object", "not_run_files", "run_class_names",
           "set_aside_hint"]

# what a run leaves besides RUN_FILES: an old run set aside (--overwrite), a write probe, a
# temporary file of an atomic write (``.NAME.tmpPID``)
_RUN_LEFTOVER = re.compile(r"^\.(replaced\.\d+|write-test\.\d+|[\w.-]+\.tmp\d+)$")
_CKPT = re.compile(r"^(ckpt-\d+\.npz|latest)$")  # what a checkpoints folder holds


def bundle_run(bundle_dir: Path, name: str = "run") -> Path:
    """``BUNDLE/run``: train's default ``--out``, and where eval and export-model look for
    trained weights when none are named (``fleet``, ``fleet-client``: the fleet's defaults). A
    bundle is untrusted and may ship that folder: as a link to another place (session 23 probe:
    ``train --overwrite`` replaced a run outside the bundle, eval read its weights), or holding
    links. Any link there is refused, in one line."""
    run = Path(bundle_dir) / name
    found = run if run.is_symlink() else _first_link(run) if run.is_dir() else None
    if found is not None:
        raise UserError(f"{found} is {link_kind(found)}: a run inside the bundle is never "
                        "read or written through a link (it may lead outside the bundle); "
                        "delete the link, or name the run with --out / --weights")
    return run


def not_run_files(folder: Path, allowed: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Names in ``folder`` that no run writes (sorted; [] when it is new, empty or unlistable):
    neither ``allowed`` nor a run's leftovers (``_RUN_LEFTOVER``)."""
    try:
        names = sorted(f.name for f in Path(folder).iterdir())
    except OSError:  # not a folder yet, or not listable: the write probe will tell
        return []
    return [n for n in names if n not in allowed and not _RUN_LEFTOVER.match(n)]


def set_aside_hint(folder: Path) -> str:
    """Empty, or a sentence naming the run that an interrupted ``--overwrite`` set aside in
    ``folder`` (``.replaced.PID``: its replacement was killed before it wrote a checkpoint):
    eval and export-model called such a folder empty, and a user might delete it; or saying
    that a run is training there and has no checkpoint yet (a session 48 probe)."""
    try:
        old = sorted(p.name for p in Path(folder).glob(".replaced.*") if p.is_dir())
    except OSError:
        return ""
    if not old:
        if (Path(folder) / "manifest.json").exists():  # (a bundle)
            return ""
        if bundle_in_use(folder):
            return ("; a training run is writing it and has written no checkpoint yet: wait for "
                    "its first (--checkpoint-every) or its end")
        return ("; it is a run's folder whose weights are gone (deleted, or the run ended "
                "before its first checkpoint): train it again with --overwrite"
                if (Path(folder) / "run.json").is_file() else "")  # (session 49 probe: no way)
    return (f"; it holds the earlier run that an interrupted --overwrite set aside ({old[0]}): "
            "the next `train` with this --out puts it back (or move its files out yourself)")


def check_out_path(p: Path, what: str, default: str = "") -> None:
    """Refuse an ``--out`` that is a bundle folder (``what`` there would replace the bundle's own
    files) or that is, or lies under, a file.

    Raises:
        UserError: either.
    """
    if (p / "manifest.json").exists():
        raise UserError(f"--out '{p}' is a bundle folder: {what} there would replace the "
                        f"bundle's own files; pass another --out{default}")
    if p.is_symlink() and not p.exists():  # (session 43 probe: "File exists")
        try:
            os.stat(p)
        except OSError as exc:  # (session 45 probe: a link to itself was told "create that
            if exc.errno == errno.ELOOP:  # folder")
                raise UserError(f"--out '{p}' is a symbolic link that leads back to itself; "
                                "remove it, or pass another --out") from None
        raise UserError(f"--out '{p}' is a symbolic link to '{os.readlink(p)}', which does not "
                        "exist; create that folder, or pass another --out")
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out '{p}' cannot be created: '{parent}' is a file; pass "
                            "another --out")


def check_same_bundle(p: Path, ours: tuple[str, ...], here) -> None:
    """``UserError`` where the run in ``p`` is another bundle's (``--resume``, before its data is
    read: session 39 probe, such a resume was told its run.json's class names were wrong)."""
    theirs = json_object(p / "run.json")
    if theirs.get("bundle_sha256") in (None, *ours):
        return
    was = theirs.get("bundle")
    same = isinstance(was, str) and os.path.realpath(was) == os.path.realpath(str(here))
    raise UserError(f"--out '{p}' holds a run of another bundle" + (
        " (this bundle folder was exported again since, with other graphs, weights or settings)"
        if same else f" ('{was[:200]}')" if isinstance(was, str) else "")
        + "; resume it with that bundle, or pass another --out")


class RunFolder:
    """The ``--out`` folder of one run: refuses to mix two runs, checked before training.

    From :meth:`prepare` to :meth:`finish`, SIGINT/SIGTERM/SIGHUP (not where the process
    ignores SIGHUP: ``nohup``) before the run's first checkpoint (the
    planning probes, loading, the first evaluation) put the folder back as it was (the run that
    ``--overwrite`` set aside, no stub of the new one), say so in one line and exit 128 + signal
    (:class:`StartupInterrupted`); once a checkpoint exists they end like an interrupted training
    (:class:`TrainingInterrupted`). Inside the training loop ``StopSignals`` takes them over.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # (HUP: a closed ssh session)

    def __init__(self, path: Path, identity: dict) -> None:
        self.path = Path(path)
        self.identity = identity
        self._replaced: Path | None = None  # the old run's files while the new one runs
        self._stale: list[Path] = []  # set aside by an interrupted --overwrite whose
        # replacement checkpointed: dropped once this run stands (finish(ok)), kept otherwise
        self.kept_aside: Path | None = None  # finish(keep_aside=True) left the old run there
        self._before: set[str] = set()  # the RUN_FILES the folder held before (kept on a stop)
        self._made_folder = False  # prepare created the folder itself
        self._handlers: dict[int, object] = {}  # the handlers replaced while start-up runs
        self._identity_due = False  # run.json is written by finish(ok=True) (a resumed run)
        self._pid = os.getpid()
        self._busy = False  # moving files: a signal waits (``_pending``) until they are moved
        self._pending: int | None = None
        self._lock: int | None = None  # an fd of the folder, flock'ed while the run holds it
        self.restored = False  # finish put back the run that --overwrite set aside
        self._finished = False
        self._checked = False  # _before is known: what the folder held before this run

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create or check the folder and write ``run.json``.

        Raises:
            UserError: the path is a file or lies under one, is not writable, holds another
                run (without --resume/--overwrite) or other files, --resume names another
                bundle's run or a run file that is not a regular file (a FIFO would hang).
        """
        p = self.path
        check_out_path(p, "a run", " (the default is BUNDLE/run)")
        self._made_folder = not p.exists()
        self._take_lock()
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self.finish(False)  # the caller's finish never runs when prepare fails
            raise

    def _take_lock(self) -> None:
        """Hold the folder for this run (``flock`` on the folder itself): a second run into it
        is refused."""
        self._lock = hold_folder(self.path, f"--out '{self.path}' is in use by another training "
                                 "run of this machine; wait for it to end, or pass another --out")

    def _recover_set_aside(self) -> None:
        """A run that ``--overwrite`` set aside (``.replaced.PID``) whose replacement was killed
        (SIGKILL, a power cut): put back where the replacement never wrote a checkpoint (its
        stub is replaced; nothing else is deleted, so a recovery cut short can run again),
        else dropped, as a finished replacement would have (one note either way)."""
        p = self.path
        for old in sorted(p.glob(".replaced.*")):
            if old.is_symlink() or not old.is_dir() or not _RUN_LEFTOVER.match(old.name):
                continue
            # the replacement wrote its run.json before anything else: without one, the
            # checkpoints there are the old run's own (a set-aside cut short)
            if (newest_checkpoint(p / "checkpoints") is not None
                    and (p / "run.json").exists()):
                self._stale.append(old)  # (dropped by finish once this run stands: a session
                continue  # 43 probe's resume refused for its --lr had deleted it first)
            try:
                for q in sorted(old.iterdir(), key=lambda q: q.name == "checkpoints"):
                    target = p / q.name
                    if q.is_dir() and target.is_dir() and not target.is_symlink():
                        target.rmdir()  # the replacement's empty checkpoints folder
                    os.replace(q, target)
                old.rmdir()
            except OSError as exc:
                raise UserError(f"--out '{p}': cannot put back the run that an interrupted "
                                f"--overwrite set aside in '{old}' ({exc.strerror or exc}); "
                                "move its files back by hand, or pass another --out") from None
            print(f"note: '{p}': put back the run that an interrupted --overwrite had set "
                  f"aside ({old.name})", file=sys.stderr)

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        p = self.path
        if p.parent.name == "checkpoints" and (p.parent.parent / "run.json").is_file():
            raise UserError(f"--out '{p}' is inside the checkpoints folder of the run in "
                            f"'{p.parent.parent}', which that run prunes and --overwrite "
                            "replaces; pass a folder outside it")
        self._recover_set_aside()
        existing = [f for f in RUN_FILES if (p / f).exists()
                    and not (f == "checkpoints" and not _nonempty_dir(p / f))]
        if existing and not self._is_run():  # files named like a run's are not one: a user's
            raise UserError(  # summary.json or checkpoints/ are never replaced or appended to
                f"--out '{p}' holds {', '.join(existing)} but no training run (no run.json of "
                "one and no checkpoint); nothing there is replaced: pass a new or empty folder "
                "as --out")
        stub = set(existing) <= {"run.json", "metrics.jsonl"} and (
            "metrics.jsonl" not in existing or self._no_steps(p / "metrics.jsonl"))
        if existing and stub and not (resume or overwrite) and not not_run_files(p) \
                and self._is_run():
            # the stub of a run killed before its first step (SIGKILL while the plan's probes
            # or the first evaluation ran): no weights, checkpoint or step to lose; the same
            # command starts afresh
            print(f"note: '{p}' held only the start of a run that never trained a step (its "
                  "process was killed); starting afresh", file=sys.stderr)
            for f in existing:
                (p / f).unlink()
            existing = []
        if overwrite and "checkpoints" in existing:  # (session 35 probe: a user's files there,
            # a run written into it, went with the old run without a word)
            others = [n for n in not_run_files(p / "checkpoints", ()) if not _CKPT.match(n)]
            if others:
                raise UserError(f"--out '{p}': its checkpoints folder also holds files that "
                                f"are not checkpoints ({', '.join(others[:3])}"
                                f"{', ...' if len(others) > 3 else ''}), which would go with the "
                                "old run; move them out of it, or pass another --out")
        if existing and not (resume or overwrite):
            raise UserError(f"--out '{p}' already holds a training run ({', '.join(existing)}); "
                            "pass --resume to continue it, --overwrite to replace it, or "
                            "another --out")
        if not existing:  # a run is written among its own files only (never into `/` or ~)
            others = not_run_files(p)
            if others:
                raise UserError(f"--out '{p}' is a folder holding other files ("
                                f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                                "and no training run; pass a new or empty folder as --out")
        if resume and existing:
            check_run_links(p)  # (stat() below follows links: metrics.jsonl is appended to)
            for f in existing:
                kind = (p / f).stat().st_mode
                if not (stat.S_ISDIR(kind) if f == "checkpoints" else stat.S_ISREG(kind)):
                    raise UserError(f"--out '{p}': '{p / f}' is not a regular file; remove it, "
                                    "or pass --overwrite instead of --resume to start afresh")
            if not has_checkpoints(p / "checkpoints") and (p / "params.npz").exists():
                # starting afresh would replace a finished run's weights with no --overwrite
                raise UserError(f"--out '{p}' holds a run's trained weights (params.npz) but "
                                "no checkpoint to resume from; pass --overwrite instead of "
                                "--resume to train it again from the start (the old run is "
                                "put back if the new one fails), or another --out")
            check_same_bundle(p, self._bundle_ids(), self.identity.get("bundle"))
        self._before = set(existing)
        self._checked = True
        self._catch_signals()  # (after _before: a stop removes only what this run made)
        if overwrite and existing:
            # set aside, not deleted: a run that fails (bad data found late, an impossible
            # budget, a signal before its first checkpoint) puts the old one back (finish)
            self._busy = True
            self._replaced = p / f".replaced.{os.getpid()}"
            n = 0  # (one kept aside by an earlier run of the same PID, a container's 1: a
            while self._replaced.exists() or self._replaced.is_symlink():  # review's)
                n += 1
                self._replaced = p / f".replaced.{os.getpid()}{n:03d}"
            moved: list[str] = []
            try:
                self._replaced.mkdir()
                for f in existing:
                    os.replace(p / f, self._replaced / f)
                    moved.append(f)
            except OSError as exc:  # all or nothing: a run split in two would lose half
                aside, self._replaced = self._replaced, None  # (finish must not restore it)
                stranded = []
                for f in moved:
                    try:
                        os.replace(aside / f, p / f)
                    except OSError:
                        stranded.append(f)
                if not stranded:
                    shutil.rmtree(aside, ignore_errors=True)
                self._busy = False
                left = (f"; {', '.join(stranded)} could not be moved back and wait in "
                        f"'{aside}' (the next run with this --out puts them back)"
                        if stranded else "; it is left as it was")
                raise UserError(f"--overwrite: cannot set the old run in '{p}' aside ("
                                f"{exc.filename or p}: {exc.strerror or exc}){left}: fix the "
                                "permissions, or pass another --out") from None
            self._before = set()
            self._busy = False
            if self._pending is not None:
                self._stop(self._pending)
        self._busy = True  # a signal waits: one between write and unlink left the probe
        try:
            for folder in (p, p / "checkpoints"):
                _check_writable(folder, p, resume and bool(existing))
        finally:
            self._busy = False
            if self._pending is not None:  # the signal first, whether the probe failed
                self._stop(self._pending)
        # a resumed run without one gets it only once it ran (finish): a resume that fails
        # (a damaged checkpoint) leaves the folder as it was
        # so does a resume that finds no checkpoint (it starts afresh, with these options)
        self._identity_due = (not (p / "run.json").exists()
                              or (resume and not has_checkpoints(p / "checkpoints")))
        # (has_checkpoints: ckpt-*.npz without their pointer are resumed too, and the run's own
        # run.json stays: session 47 probe, it was written again from the command line)
        if resume and existing and not self._identity_due and not json_object(p / "run.json"):
            print(f"warning: '{p / 'run.json'}' is unreadable or empty; this resume "
                  "writes it again from its options once it has run", file=sys.stderr)
            self._identity_due = True  # (session 43 probe: it stayed damaged, and export-model
            # then called the run "not inside a bundle")
        if self._identity_due and not (resume and existing):
            self._write_identity()

    def _write_identity(self) -> None:
        identity = with_bundle_from_run(dict(self.identity), self.path)
        text = json.dumps(identity, indent=1)
        if len(text.encode()) > MAX_RUN_JSON_BYTES:  # (what eval and --resume would refuse)
            raise UserError(f"the run's class names take {len(text.encode()):,} bytes in "
                            f"run.json, more than it may hold ({MAX_RUN_JSON_BYTES:,}): use "
                            "shorter labels (or name the classes with --classes at export)")
        atomic_write(self.path / "run.json", lambda f: write_text(f, text))
        self._identity_due = False

    def _is_run(self) -> bool:
        """Whether the folder holds a run of this runtime: its run.json (an object naming the
        bundle's checksum) or a checkpoint a resume would try."""
        try:
            identity = json_object(self.path / "run.json")
        except UserError:  # a run.json too large (or a link) is a run's file all the same
            return True
        return ("bundle_sha256" in identity or identity.get("format") == "instant-runtime-run"
                or has_checkpoints(self.path / "checkpoints"))

    def finish(self, ok: bool, keep_aside: bool = False) -> None:
        """After the run: drop the replaced run's files (``ok``), or remove what the failed run
        wrote and put them back; ``keep_aside`` (a run interrupted after its first checkpoint:
        it stands, to be resumed) leaves them set aside (``kept_aside``) for the run that
        resumes it to drop, or the user to move back. Signals taken by :meth:`prepare` are
        given back. Once: a second call does nothing."""
        if self._finished:
            return
        self._finished = True
        old, self._replaced = self._replaced, None
        if ok and not keep_aside:
            for stale in self._stale:  # this run stands: the older run's replacement went on
                shutil.rmtree(stale, ignore_errors=True)
                print(f"note: '{self.path}': removed the run that an interrupted --overwrite "
                      f"had set aside ({stale.name}); its replacement went on", file=sys.stderr)
        if ok and keep_aside and old is not None:
            self.kept_aside, old = old, None
        self._busy = True  # a signal now waits: a restore cut half way would lose files
        try:
            if ok and self._identity_due and self.path.is_dir():
                self._write_identity()
            if not ok and old is None:
                self._remove_stub()
            if old is not None:
                if not ok:
                    self._remove_new(set())
                    for q in old.iterdir():
                        os.replace(q, self.path / q.name)
                    self.restored = True
                shutil.rmtree(old, ignore_errors=True)
        finally:
            self._busy = False
            self._release_signals()
            if self._lock is not None:
                held_lock(self._lock, False)
                os.close(self._lock)  # the folder is free for the next run
                self._lock = None
        pending, self._pending = self._pending, None
        if pending is not None:  # deliver it now, to the handler it was meant for
            signal.raise_signal(pending)

    def _remove_stub(self) -> None:
        """A run that failed before it wrote anything but its stub (run.json, an empty
        checkpoints folder, a metrics.jsonl without a step: e.g. refused by its budget, or
        failed at its first step) leaves the folder as it was, so that
        the command its error suggests can run."""
        new = {f for f in RUN_FILES if f not in self._before and self._checked
               and ((self.path / f).exists() or (self.path / f).is_symlink())}
        ckpts = self.path / "checkpoints"
        if not new <= {"run.json", "checkpoints", "metrics.jsonl"}:
            return
        if "metrics.jsonl" in new and not self._no_steps(self.path / "metrics.jsonl"):
            return
        if "checkpoints" in new and (ckpts.is_symlink() or not ckpts.is_dir()
                                     or any(ckpts.iterdir())):
            return
        if new:
            self._remove_new(self._before)
        self._remove_made_folder()

    @staticmethod
    def _no_steps(path: Path) -> bool:
        """Whether a new metrics.jsonl holds no training step (the plan, a first calibration:
        the run failed at its first step, e.g. its data did not fit the model)."""
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 16:
            return False
        try:
            kinds = [json.loads(line).get("kind") for line in path.read_text().splitlines()
                     if line.strip()]
        except (OSError, ValueError, AttributeError):
            return False
        return all(k in ("plan", "calibration") for k in kinds)

    def _bundle_ids(self) -> tuple[str, ...]:
        """The hashes a run of this bundle may have recorded (``checkpoint.bundle_ids``)."""
        from .checkpoint import bundle_ids

        where = self.identity.get("bundle")
        return (self.identity["bundle_sha256"],
                *(bundle_ids(Path(where)) if isinstance(where, str) else ()))

    def _remove_made_folder(self) -> None:
        if self._made_folder:
            try:
                self.path.rmdir()
            except OSError:
                pass  # someone put a file there meanwhile: leave the folder

    def _remove_new(self, keep: set[str]) -> None:
        """Remove the run files in the folder except ``keep``."""
        for f in RUN_FILES:
            q = self.path / f
            if f in keep:
                continue
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q)
            elif q.exists() or q.is_symlink():
                q.unlink()

    # ---------------------------------------------------------------------------- signals
    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._handlers:
            return
        for s in self.SIGNALS:
            if s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN:
                continue  # nohup: the user asked the run to outlive the terminal
            self._handlers[s] = signal.signal(s, self._on_signal)

    def _release_signals(self) -> None:
        for s, h in self._handlers.items():
            signal.signal(s, h)
        self._handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (a planning probe): end as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self._busy:  # files are being moved: prepare or finish acts on it when done
            self._pending = signum
            return
        newest = newest_checkpoint(self.path / "checkpoints")
        if newest is not None:  # a resumed run before its first step, or after the loop
            raise TrainingInterrupted(signum, *newest)
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        """Start-up interrupted: put the folder back as it was, say so, exit 128 + signal."""
        self._pending = None
        replaced = self._replaced is not None
        if not replaced:  # the stub of the new run (run.json, an empty checkpoints folder)
            self._busy = True
            try:
                self._remove_new(self._before)
                self._remove_made_folder()
            finally:
                self._busy = False
        self.finish(False)
        self._pending = None
        kept = (f"the previous run in '{self.path}' is back in place" if replaced else
                f"'{self.path}' is as it was")
        print(f"interrupted by {signal.Signals(signum).name} before training began; {kept}",
              file=sys.stderr)
        raise StartupInterrupted(signum)


def hold_folder(folder: Path, busy: str, lock_file: str | None = None) -> int:
    """Create ``folder`` and take an exclusive ``flock`` on it (or on its file ``lock_file``);
    returns the fd, held while it is open. The kernel drops the lock when the process ends,
    however it ends.

    Raises:
        UserError: the folder cannot be created or opened, or another process holds it
            (``busy``, the message).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = (os.open(folder / lock_file, os.O_RDWR | os.O_CREAT, 0o644) if lock_file
              else os.open(folder, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        raise UserError(f"cannot write --out '{folder}': {exc.strerror or exc}; pass another "
                        "--out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(busy) from None
    held_lock(fd)  # a forked helper closes its copy (memory.forked_child)
    return fd


def _check_writable(folder: Path, out: Path, resuming: bool = False) -> None:
    """Make ``folder`` and write and remove a probe file in it (UserError where that fails;
    ``resuming`` a run there, the way out is to make room, not another --out, which would
    start from step 0: a session 43 probe)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write checkpoints to '{folder}': it is a file; remove it or "
                        "pass another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        try:
            probe.write_bytes(b"x")
        finally:  # (a full disk left it behind: a session 35 probe)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"--out '{out}' is not writable ({exc.strerror or exc}); " + (
            "free space or make it writable, then --resume again (another --out would start "
            "from step 0)" if resuming else "pass another --out")) from None


def _nonempty_dir(path: Path) -> bool:
    """A folder with something in it (an empty ``checkpoints`` folder, left by a run that
    failed before its first checkpoint, blocked the same command run again: a probe's)."""
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return True  # (unreadable: let the checks that name it say so)
