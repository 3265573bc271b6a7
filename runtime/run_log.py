"""A run's log and step statistics: ``metrics.jsonl`` (one JSON object per event, cut back to
the checkpoint on resume) and :class:`StepStats`, the bounded figures the summary reports."""

from __future__ import annotations

import collections
import errno
import json
import math
import os
import stat
from pathlib import Path

import numpy as np

from contract import UserError, json_text

from .checkpoint import DamagedCheckpoint, meta_array, meta_float, meta_int

__all__ = ["FULL_LOG_STEPS", "Metrics", "StepStats", "last_logged_step", "step_logged"]

# Every step has its line up to here; past it, one step in 10, then in 100 past ten times as
# many, and so on: about 9,000 lines (~2 MB) a decade of steps. A line is ~210 bytes, and a small
# model at 270 steps/s for 8 hours would write 1.6 GB (session 22 long-run probe): an SD card.
FULL_LOG_STEPS = 10_000


def step_logged(step: int) -> int:
    """0 where ``step``'s line is left out of ``metrics.jsonl``, else the stride of the lines
    around it (1: every step)."""
    stride = 1
    while step >= FULL_LOG_STEPS * stride:
        stride *= 10
    return stride if step % stride == 0 else 0


class Metrics:
    """``metrics.jsonl``: one JSON object per event, appended and flushed as it happens.

    ``resumed_at``: the step of the checkpoint a resume continues from. What the file holds past
    it (events of steps that run again, after a kill or a full disk; a half-written last line)
    is cut off first, so every step is in the file once and every line is whole. ``fresh`` (a
    run from step 0): the file starts empty. Neither (a fleet client's next round): appended. A line that
    cannot be written (a full disk) ends the run with one error naming ``last_good()``, the
    last checkpoint written."""

    def __init__(self, path: Path | None, resumed_at: int | None = None,
                 last_good=lambda: None, fresh: bool = False, key: str = "step",
                 way_out=None, redo_end: bool = False) -> None:
        self._f = None
        self.path, self.last_good, self.way_out = path, last_good, way_out
        self.kept_last: dict | None = None  # the last event with a step the resume kept
        if path is not None and resumed_at is not None:
            self.kept_last = _cut_after(path, resumed_at, key, redo_end)
        elif path is not None and fresh:  # a run from step 0: what an attempt before it wrote
            _empty(path)  # goes (a --resume that found no checkpoint kept it: steps twice)
        if path is not None:
            # O_NONBLOCK: a FIFO in the file's place must not block the open (without a reader
            # it fails with ENXIO; with one, fstat tells)
            not_file = UserError(f"'{path}' is not a regular file; remove it or pass another "
                                 "--out")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK,
                             0o644)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    raise not_file from None
                raise UserError(f"cannot write '{path}': {exc.strerror or exc}; remove it or "
                                "pass another --out") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise not_file
            os.set_blocking(fd, True)
            self._f = fd  # written unbuffered: a failed line is never retried at close

    def write(self, kind: str, **fields) -> None:
        if self._f is not None:
            data = (json_text({"kind": kind, **fields}) + "\n").encode()
            try:
                while data:
                    data = data[os.write(self._f, data):]
            except OSError as exc:
                ckpt = self.last_good()
                if self.way_out is not None:  # (a fleet server's rounds.jsonl)
                    raise UserError(f"cannot write '{self.path}': {exc.strerror or exc}; "
                                    f"{self.way_out()}") from None
                raise UserError(f"cannot write '{self.path}': {exc.strerror or exc}; "
                                + (f"the last good checkpoint {ckpt} is intact: free space and "
                                   "--resume" if ckpt else "no checkpoint was written: free space "
                                   "and run again (--overwrite)")) from None

    def close(self) -> None:
        if self._f is not None:
            os.close(self._f)
            self._f = None


def _empty(path: Path) -> None:
    """Truncate ``path`` to nothing where it is a regular file."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.truncate(path, 0)
    except OSError:
        pass  # none yet (or unwritable: opening it for append says so)


def last_logged_step(path: Path) -> int:
    """The step of the last event in ``path`` that names one (0: none, no file, not a regular
    file), read from the end as :func:`_cut_after` reads it (steps only grow along the file)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return 0
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            while end > 0:
                start = _line_start(f, end)
                if end - start <= MAX_EVENT_BYTES:
                    f.seek(start)
                    try:
                        step = json.loads(f.read(end - start)).get("step")
                    except (ValueError, AttributeError):
                        step = None  # a half-written or cut line, or not an event
                    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
                        return step
                end = start
    except OSError:
        return 0
    return 0


def logged_first_loss(path: Path, window: int) -> float | None:
    """The mean loss of steps 1..``window`` as ``path`` logged them (the first record of each),
    None unless every one is there and finite: the first loss of a fleet client started again
    into its folder, whose earlier process's steps are only in its log (session 39 probe: its
    summary gave the restarted process's first loss, 0.31 where the run began at 2.31)."""
    found: dict[int, float] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line) if len(line) <= MAX_EVENT_BYTES else None
                except (ValueError, RecursionError):  # (a damaged or tampered line)
                    continue
                if not isinstance(rec, dict) or rec.get("kind") != "step":
                    continue
                step, loss = rec.get("step"), rec.get("loss")
                if isinstance(step, int) and 1 <= step <= window and isinstance(loss, float) \
                        and math.isfinite(loss):
                    found.setdefault(step, loss)
    except OSError:
        return None
    return sum(found.values()) / window if window and len(found) == window else None


def _cut_after(path: Path, step: int, key: str = "step", redo_end: bool = False) -> dict | None:
    """Truncate ``path`` after its last whole event of ``step`` or before (its ``key`` field: a
    fleet server's rounds.jsonl counts rounds), read from the end: what follows it (events of
    later steps and the events of no step after them, a half line, a tail of NULs a crash left)
    was written after the checkpoint. Steps only grow along the file, so the scan stops at the
    first event of ``step`` or before from the end; a 10^7-step log is not parsed line by
    line."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # none yet (or unreadable: opening it for append says so)
    if not stat.S_ISREG(st.st_mode):
        return None
    keep = end = st.st_size
    last = None  # the last event kept that has a step: returned
    with open(path, "rb") as f:
        while end > 0:
            start = _line_start(f, end)
            event = None
            if end - start <= MAX_EVENT_BYTES:
                f.seek(start)
                line = f.read(end - start)
                try:
                    event = json.loads(line) if line.endswith(b"\n") else None
                except ValueError:
                    pass
            s = event.get(key) if isinstance(event, dict) else None
            if not isinstance(event, dict) or (isinstance(s, int) and s > step) or (redo_end and (
                    (s == step and event.get("final") is True) or event.get("kind") == "summary")):
                keep = start  # a later step's event, or not an event (a half line, NULs), or
                # with ``redo_end`` (a resume at the run's last step, which ends it again) the
                # final evaluation after the checkpoint and the run's summary (a session 43
                # probe: a kill before summary.json, then two eval lines of step 300; a run
                # resumed for more steps keeps them: that run did end there)
            elif isinstance(s, int):
                last = event
                break
            # else an event of no step (a run's summary, its plan): it goes with the events
            # after it (session 33 probe: a finished run resumed from an older checkpoint kept
            # its later steps twice, the scan stopping at its summary line)
            end = start
    if keep < st.st_size:
        os.truncate(path, keep)
    return last


MAX_EVENT_BYTES = 1 << 20  # a longer "line" is not an event (the ranks of 10^4 layers: ~1 MB)


def _line_start(f, end: int) -> int:
    """Where the line that ends at ``end`` (its newline at ``end - 1``, or none) begins: after
    the newline before it, found in 64 KB blocks read backwards."""
    pos = end - 1
    while pos > 0:
        n = min(1 << 16, pos)
        f.seek(pos - n)
        i = f.read(n).rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    return 0


class StepStats:
    """What the summary reports of the steps that had a finite loss, in bounded memory: the
    first and last ``KEEP`` losses, the last ``WINDOW`` step times (the median step is theirs),
    the count and the sum of all times. A list of every loss and time grew by ~80 bytes a step
    outside any plan (a run resumed at step 10^7 held 160 MB of them: 1.1 GB under a 200 MB
    budget)."""

    KEEP, WINDOW = 10, 4096

    def __init__(self) -> None:
        self.n, self.time_sum = 0, 0.0
        self.first: list[float] = []
        self.last: collections.deque = collections.deque(maxlen=self.KEEP)
        self.times: collections.deque = collections.deque(maxlen=self.WINDOW)

    def add(self, loss: float, seconds: float) -> None:
        self.n += 1
        self.time_sum += seconds
        if len(self.first) < self.KEEP:
            self.first.append(loss)
        self.last.append(loss)
        self.times.append(seconds)

    def window(self) -> int:
        """Steps averaged for the first and last loss."""
        return max(1, min(self.KEEP, self.n // 5))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"run/loss_first": np.asarray(self.first, np.float64),
                "run/loss_last": np.asarray(self.last, np.float64),
                "run/times": np.asarray(self.times, np.float64)}

    @classmethod
    def restore(cls, arrays, run: dict, steps: int) -> StepStats:
        """From a checkpoint (one written before these existed holds every loss and time: read
        a chunk at a time).

        Raises:
            DamagedCheckpoint: values that do not fit the counts, times that are not seconds.
        """
        st = cls()
        if "run/losses" in arrays:  # the old layout: every loss and time
            st._restore_old(arrays, steps)
        else:
            n = meta_int(run, "finite_steps", "run", hi=steps)
            first = meta_array(arrays, "run/loss_first", (min(n, cls.KEEP),), np.float64)
            last = meta_array(arrays, "run/loss_last", (min(n, cls.KEEP),), np.float64)
            times = meta_array(arrays, "run/times", (min(n, cls.WINDOW),), np.float64)
            _check_times(times)
            st.n = n
            st.time_sum = meta_float(run, "time_sum", "run", hi=1e7 * max(n, 1))
            st.first = first.tolist()
            st.last.extend(last.tolist())
            st.times.extend(times.tolist())
        return st

    def _restore_old(self, arrays, steps: int) -> None:
        """``arrays``: a checkpoint's members (checkpoint._Members), read a chunk at a time."""
        for a in arrays.chunks("run/losses", np.float64):
            if not np.isfinite(a).all():
                raise DamagedCheckpoint("array 'run/losses' holds NaN or inf values")
            self.n += len(a)
            if self.n > steps:
                raise DamagedCheckpoint(f"array 'run/losses' holds more losses than its "
                                        f"{steps} steps")
            if len(self.first) < self.KEEP:
                self.first.extend(a[:self.KEEP - len(self.first)].tolist())
            self.last.extend(a[-self.KEEP:].tolist())
        count = 0
        for a in arrays.chunks("run/times", np.float64):
            _check_times(a)
            count += len(a)
            self.time_sum += float(a.sum())
            self.times.extend(a[-self.WINDOW:].tolist())
        if count != self.n:
            raise DamagedCheckpoint(f"array 'run/times' holds {count} times for {self.n} "
                                    "losses")


def _check_times(times: np.ndarray) -> None:
    if len(times) and not (np.isfinite(times).all() and times.min() >= 0
                           and times.max() < 1e7):
        raise DamagedCheckpoint("array 'run/times' holds step times that are not seconds "
                                "(negative, huge or not finite)")
