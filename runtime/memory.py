"""Whole-process memory: resident set size and its high-water mark, read as an outside observer
reads them (Linux ``/proc/PID/status``: ``VmRSS``, ``VmHWM``).

The runtime never resets its own high-water mark (``/proc/self/clear_refs`` would also reset
what the kernel later reports to a parent, so ``/usr/bin/time -v`` would under-report): planning
probes run in forked children instead (``runtime/budget.py``), and the peak a run reports is the
kernel's ``VmHWM``, the number anyone polling the process sees.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

__all__ = ["PeakWatcher", "WouldPassLimit", "budget_from_profile", "budget_given", "child_limit",
           "current_rss", "device_given", "fork_held", "forked_child", "held_lock", "peak_rss", "physical_ram",
           "proc_status", "reserve", "run_measured", "set_budget", "set_limit", "tree_pss",
           "tune_malloc"]

_LIMIT: int | None = None  # a planning probe's own stop line (budget.py _fork), else None
_BUDGET: int | None = None  # the command's --budget (or its profile's), for helper children
_DEVICE: tuple[str, int] | None = None  # the command's device profile: (name, RAM bytes)
_FROM_PROFILE = False  # the budget is the profile's (no --budget given)


_LOCKS: set[int] = set()  # flock'ed descriptors (a run folder's): never a forked child's


def held_lock(fd: int, held: bool = True) -> None:
    """Register (``held``) or forget ``fd``, a descriptor holding a folder's ``flock``."""
    (_LOCKS.add if held else _LOCKS.discard)(fd)


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def fork_held() -> int:
    """``os.fork()`` with the Python handlers of SIGINT/SIGTERM/SIGHUP held off across it: a
    signal that comes meanwhile is only noted, and raised again in the parent once the fork
    has returned (the child gets its handlers back as they were).

    ``os.fork`` runs its at-fork hooks as Python code (logging takes its module lock before the
    fork and releases it after). A signal whose Python handler ran inside one of them, and
    raised to stop the run, was swallowed ("Exception ignored in: _releaseLock"): the run went
    on with logging's lock held and hung at exit (session 33, the SIGINT start-up test under
    load). The handlers are swapped, not the signal mask: a mask is one thread's, and
    onnxruntime's threads would take the signal. Where the signal raised again stops the
    parent, the child is killed and reaped first (it would run on unwatched)."""
    if threading.current_thread() is not threading.main_thread():
        return os.fork()
    noted: list[int] = []
    old = {s: h for s in _STOPS if callable(h := signal.getsignal(s))}
    for s in old:
        signal.signal(s, lambda signum, frame: noted.append(signum))
    pid = -1
    try:
        pid = os.fork()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pid != 0:  # the parent (or a fork that failed): the signals noted, now
            try:
                for s in dict.fromkeys(noted):
                    signal.raise_signal(s)
            except BaseException:
                if pid > 0:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                raise
    return pid


def forked_child(parent: int) -> None:
    """First thing in a forked helper (a planning probe, the tokenising child): it dies with
    ``parent`` (``PR_SET_PDEATHSIG``: a SIGKILLed trainer's probe ran on for 10 s, up to
    470 MB) and lets go of the run folder's lock (its copy of the descriptor kept the folder
    "in use by another training run" after the trainer was gone)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux, no ctypes: the parent's own checks remain
        pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)
    # a SIGTERM sent to the child alone (an OOM killer's helper) ends it as before, not as the
    # parent's "interrupted" exception reported as the probe's error (session 30 review)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # (nohup's stays; session 48
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # review: the parent's raised in a probe)
    for fd in list(_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCKS.clear()


def set_budget(budget: int | None, device: tuple[str, int] | None = None,
               from_profile: bool = False) -> None:
    """The command's memory budget in bytes (None: none given), read by :func:`child_limit`;
    ``device``: (profile name, its RAM in bytes) where a profile was named (a refusal's way out
    must fit it: :func:`device_given`); ``from_profile``: the budget is the profile's own (no
    --budget: a way out "without --budget" must drop --profile too)."""
    global _BUDGET, _DEVICE, _FROM_PROFILE
    _BUDGET, _DEVICE, _FROM_PROFILE = budget, device, from_profile


def budget_from_profile() -> bool:
    """Whether the command's budget came from its profile (:func:`set_budget`)."""
    return _FROM_PROFILE


def device_given() -> tuple[str, int] | None:
    """The command's device profile (name, RAM) from :func:`set_budget`, None without one."""
    return _DEVICE


def budget_given() -> int | None:
    """The command's budget (:func:`set_budget`), None where it has none."""
    return _BUDGET


def child_limit() -> int | None:
    """The RSS past which a helper child (the tokenising one, ``sources/tokens.py``) is stopped:
    the budget, or without one half of this machine's RAM (a child that needs more is a
    tampered tokenizer's expansion, not data)."""
    if _BUDGET is not None:
        return _BUDGET
    ram = physical_ram()
    return ram // 2 if ram else None


class WouldPassLimit(MemoryError):
    """A planning probe was about to allocate past the line where it is stopped."""


def set_limit(limit: int | None) -> None:
    """(In a planning probe.) The RSS at which the parent stops this process."""
    global _LIMIT
    _LIMIT = limit


def reserve(nbytes: int, what: str) -> None:
    """Before a large numpy allocation: in a planning probe, refuse one that would take the
    process past its stop line. The parent polls the probe's RSS every 2 ms, and pages written
    at memory speed (a 3500-wide layer's 98 MB Gram accumulator) passed the budget by up to
    19 MB before the probe was stopped (session 18 probe). Outside probes: nothing."""
    if _LIMIT is not None and current_rss() + int(nbytes) > _LIMIT:
        raise WouldPassLimit(f"{what} ({int(nbytes) / 1e6:.0f} MB) would pass the probe's limit")


def all_finite(a, block: int = 1 << 18) -> bool:
    """``np.isfinite(a).all()`` a piece of about ``block`` values at a time: its mask of one
    byte a value was a transient past the budget (session 30 probe: a 134 MB weight's 34 MB
    mask took `eval --budget 230MB` to 236 MB while the weights were read)."""
    import numpy as np

    a = np.asarray(a)
    if a.ndim == 0 or a.size <= block:
        return bool(np.isfinite(a).all())
    rows = max(1, block // max(1, a[0].size))
    return all(bool(np.isfinite(a[i:i + rows]).all()) for i in range(0, a.shape[0], rows))


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process in bytes ({} when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":", 1)[0]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def tree_pss(pid: int) -> int:
    """The memory ``pid`` and its descendants hold together, in bytes: their proportional set
    sizes (``/proc/PID/smaps_rollup``) summed, which counts a page shared by a fork once (what
    a container's memory limit charges). 0 when the process is gone."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue  # ended between two reads
    return total


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    v = proc_status().get("VmRSS")
    if v is not None:
        return v
    import psutil

    try:
        return int(psutil.Process(os.getpid()).memory_info().rss)
    except (psutil.Error, OSError):  # no /proc (a probe's masked mount): psutil reads it too
        from contract import UserError

        raise UserError("cannot read this process's memory: /proc is not mounted here; run "
                        "where it is (the runtime measures its memory there)") from None


def peak_rss() -> int:
    """Peak resident set size of this process since it started, in bytes (never reset)."""
    v = proc_status().get("VmHWM")
    if v is not None:
        return v
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def physical_ram() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def tune_malloc(mmap_threshold: int = 1 << 16) -> bool:
    """Make glibc return large freed blocks to the OS at once (Linux/glibc only). A process-wide
    setting, made once at the CLI edge.

    glibc raises its mmap threshold after each large free (up to 32 MB), after which tensors of
    a few MB come from the heap and stay resident after they are freed; transient numpy buffers
    then pile up as RSS. Fixing the threshold keeps every block of ``mmap_threshold`` bytes or
    more in its own mapping, released on free. (onnxruntime's tensors come from its own arena,
    see ``runtime/sessions.py``, and are not affected.) Returns True if set.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
        libc.mallopt(m_trim_threshold, int(mmap_threshold))
        libc.mallopt(m_arena_max, 2)  # per-thread arenas otherwise keep freed memory each
        return ok
    except (OSError, AttributeError):
        return False


class PeakWatcher:
    """Polls another process's ``VmHWM``/``VmRSS`` every ``interval`` seconds (a thread), as a
    user or a fleet manager would; ``peak`` is the highest mark seen. With ``tree``, also the
    summed PSS of the process and its children (``tree_pss``, read every 4th poll: it costs a
    walk of their page tables), ``tree_peak`` the highest seen (a sample, not a sticky mark)."""

    def __init__(self, pid: int, interval: float = 0.005, tree: bool = False) -> None:
        self.pid, self.interval, self.tree = pid, interval, tree
        self.peak = self.tree_peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self._stop.is_set():
            st = proc_status(self.pid)
            if not st:
                break
            self.peak = max(self.peak, st.get("VmHWM", 0))
            if self.tree and n % 4 == 0:
                self.tree_peak = max(self.tree_peak, tree_pss(self.pid))
            n += 1
            self.samples.append((time.monotonic() - t0, st.get("VmRSS", 0)))
            time.sleep(self.interval)

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measured:
    """A finished process's exit status, output and memory, measured from outside.

    ``peak_polled`` is the highest ``VmHWM`` read from ``/proc/PID/status`` while it ran (the
    mark is sticky, so only a rise in the last poll interval before exit could be missed).
    ``peak_wait4`` is ``wait4``'s maximum RSS, which Linux carries over ``exec`` from the process
    that spawned it: from a large parent (a test runner with torch loaded) it reports the
    parent's size, so it is kept for information only."""

    returncode: int
    stdout: str
    stderr: str
    peak_polled: int
    peak_wait4: int
    seconds: float
    user_s: float = 0.0  # CPU time in user mode and in the kernel (wait4's rusage)
    sys_s: float = 0.0
    peak_tree: int = 0  # run_measured(tree=True): the highest summed PSS of its process tree

    @property
    def peak(self) -> int:
        return self.peak_polled


def run_measured(argv: list[str], timeout: float | None = None, cwd=None, env=None,
                 interval: float = 0.005, tree: bool = False) -> Measured:
    """Run ``argv`` and measure its memory from outside: poll ``VmHWM`` while it runs and take
    the kernel's ``ru_maxrss`` from ``wait4`` when it ends; with ``tree``, also the summed PSS
    of it and its children (the planning probes: ``PeakWatcher``).

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout`` (it is killed first).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out: dict[str, str] = {}

    def drain(name: str, stream) -> None:
        out[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(k, s), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    watcher = PeakWatcher(proc.pid, interval, tree)
    with watcher:
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout or 0)
            time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    return Measured(proc.returncode, out.get("stdout", ""), out.get("stderr", ""),
                    watcher.peak, usage.ru_maxrss * 1024, time.monotonic() - t0,
                    usage.ru_utime, usage.ru_stime, watcher.tree_peak)
