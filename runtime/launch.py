"""The ``instant-runtime`` command's entry point, and ``python -m runtime``'s.

:func:`run` first installs a SIGINT handler that only remembers the signal, then loads the
command's modules: a Ctrl-C in the first tenth of a second (while ``runtime.cli`` was importing)
printed a KeyboardInterrupt traceback (session 23 probe). Once ``runtime.cli`` is loaded its own
handler takes over, and a Ctrl-C that came meanwhile ends the command as interrupted (130).
Importing this module changes nothing.
"""

import atexit
import os
import signal
import sys

_SEEN: list[int] = []
_RETURNED: list[int] = []  # the command's exit status, once it returned
_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _remember(signum, frame) -> None:
    _SEEN.append(signum)


def main() -> int:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _remember)
    from .cli import _on_sigint
    from .cli import main as cli_main

    if signal.getsignal(signal.SIGINT) is _remember:
        signal.signal(signal.SIGINT, _on_sigint)
    if _SEEN:
        print("interrupted", file=sys.stderr)
        return 130
    code = cli_main()
    _RETURNED.append(code)
    return code


def _ignore_stops() -> None:
    """Registered first, so run last at exit: the interpreter's clean-up after it puts every
    signal a Python handler took back to its default, which kills (a session 44 probe: a
    SIGTERM as a finished run exited ended it killed, status 143, without a word). The cost:
    a destructor that hung in that last clean-up would need SIGKILL (none is known to)."""
    for s in _STOPS:
        signal.signal(s, signal.SIG_IGN)


def _fill_closed_std_fds() -> None:
    """A command started with stdin, stdout or stderr closed (``>&-``, a supervisor's daemon):
    /dev/null in its place, so that no file the run opens takes descriptor 1 or 2, where a
    library's message would land in it. Python has made ``sys.stdout`` / ``sys.stderr`` None
    for a closed one: lines to it are dropped (session 46 probe: the final flush raised, so a
    finished run exited 1 with a traceback)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)  # the lowest free: this


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


def run() -> None:
    """Run the command and exit with its status; 130 when interrupted, even if the
    interpreter saw the KeyboardInterrupt on its way out."""
    _fill_closed_std_fds()
    atexit.register(_ignore_stops)
    code = None
    while True:
        try:
            if code is None:
                code = main()
            # the command's outcome stands: a stop signal from here on ends the process with
            # it at once (session 39 probe: a Ctrl-C during the interpreter's clean-up printed
            # a KeyboardInterrupt traceback from a destructor, and the exit status stayed 0)
            for s in _STOPS:  # (before the flushes, which a paused pipe can hold: a reviewer)
                signal.signal(s, lambda *_, code=code: os._exit(code))
            break
        except KeyboardInterrupt as exc:  # a signal as the command returned, at its handler
            if code is None:  # (a session 44 probe: a traceback of runtime.cli.Terminated)
                code = _RETURNED[-1] if _RETURNED else \
                    128 + int(getattr(exc, "signum", signal.SIGINT))
                for s in _STOPS:  # (first: another signal now ends the process at once)
                    signal.signal(s, lambda *_, code=code: os._exit(code))
                if not _RETURNED:
                    print("interrupted", file=sys.stderr)
    _flush()
    if code == 130:
        _flush()
        os._exit(130)
    sys.exit(code)
