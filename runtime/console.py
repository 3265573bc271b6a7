"""What a run prints while it trains, written so that the output can never stop the training.

A session-24 probe piped a trainer's output into a reader that stopped reading (`train ... 2>&1
| sleep 60`): once the pipe was full the progress bar's next write blocked, the trainer sat in
it through two SIGTERMs and a SIGINT (their handlers run, then the write goes on blocking), and
when the reader exited the write's broken pipe ended the run without a checkpoint, 178 steps
after the last one. A closed stderr (`2>&-`) failed the progress bar at its first line.

:class:`Unblocking` wraps a text stream: a write the stream cannot take within ``wait``
seconds is dropped (a progress refresh at once, a log line after a second), and a stream that
is gone (closed, a broken pipe, a hung-up terminal) is left alone for the rest of the run. The
run's own files (``metrics.jsonl``, checkpoints, ``summary.json``) keep what the lines said.
"""

from __future__ import annotations

import select
import sys

from tqdm import tqdm

__all__ = ["Unblocking", "one_line", "progress_stream", "say", "say_err"]

# control characters (C0 but tab, DEL, C1) written as escapes: a name from an untrusted bundle
# or data folder (or a user's path) holding a newline split an error into lines, one that could
# forge an "error:" line, and an ESC sequence reached the terminal (session 28 probe)
_ESCAPES = {c: (f"\\x{c:02x}" if c not in (10, 13) else ("\\n" if c == 10 else "\\r"))
            for c in [*range(0, 9), *range(10, 32), *range(127, 160)]}


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): one line, nothing
    a terminal acts on."""
    return text.translate(_ESCAPES)


class Unblocking:
    """A text stream whose writes never block for more than ``wait`` seconds (see above)."""

    def __init__(self, stream, wait: float = 0.0) -> None:
        self.stream, self.wait = stream, wait
        self.gone = stream is None
        try:
            self.fd = stream.fileno() if stream is not None else None
        except (AttributeError, OSError, ValueError):  # a StringIO: it never blocks
            self.fd = None

    def _ready(self) -> bool:
        if self.fd is None:
            return True
        try:
            return bool(select.select([], [self.fd], [], self.wait)[1])
        except (OSError, ValueError):
            return True  # (select cannot tell: the write itself will)

    def write(self, text: str) -> int:
        if self.gone or not self._ready():
            return len(text)
        try:
            n = self.stream.write(text)
            self.stream.flush()
            return n
        except BlockingIOError:  # (a descriptor another process made non-blocking): this one
            return len(text)
        except (OSError, ValueError):  # broken pipe, hung-up terminal, closed file
            self.gone = True
            return len(text)

    # tqdm clears its bar before a line written to the bar's stream, or where both are the
    # standard streams; it compares the streams with ==
    def __eq__(self, other) -> bool:
        return self.stream is getattr(other, "stream", other)

    def __hash__(self) -> int:
        return id(self.stream)

    def flush(self) -> None:
        pass  # (each write flushes what it wrote)

    def isatty(self) -> bool:
        try:
            return not self.gone and self.stream.isatty()
        except (AttributeError, OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.fd is None:
            raise OSError("no file descriptor")
        return self.fd

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"


def progress_stream() -> Unblocking:
    """The progress bar's stream: stderr, refreshes dropped while it cannot take them."""
    return Unblocking(sys.stderr, 0.0)


def say(line: str) -> None:
    """Lines on stdout, above a progress bar; dropped after 1 s of a stalled stdout. Each line's
    control characters are escaped (:func:`one_line`): names from data and bundles reach it."""
    tqdm.write("\n".join(one_line(part) for part in line.split("\n")),
               file=Unblocking(sys.stdout, 1.0))


def say_err(line: str) -> None:
    """One line on stderr, as :func:`say` (control characters escaped: :func:`one_line`)."""
    tqdm.write(one_line(line), file=Unblocking(sys.stderr, 1.0))
