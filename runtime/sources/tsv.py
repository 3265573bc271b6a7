"""TSV records: tab-separated lines whose quotes are read as the lines around them say.

Plain TSV writers (PostgreSQL's COPY, MySQL, ``paste``, GLUE's files) never quote, so a text
may start with '"' or hold one; read by CSV's rules, such a quote took the lines after it into
one row that trained under the last line's label, and two rows vanished without a word (an
outside probe, session 34). pandas and Python's csv do quote a field that holds a tab, a quote
or a newline. The rules, for each record:

- a line that reads as CSV (its quoted fields open and close on it) is read so: a quoted
  field's doubled quotes are one quote of its text, as pandas wrote them;
- a line that does not (``"Great" movie``, a quote that opens and never closes on it) is read
  as it stands, quotes kept, split at tabs;
- except where its quote opens a field that the next lines close: a text of several lines, as
  pandas writes one. Where the first line is a full row by itself, that holds only when every
  line the quote takes is short of fields (at most ``SWALLOW_LIMIT`` lines).

A line that stands as a row of its own is never taken into another row's text.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator

from .common import MAX_RECORD_BYTES

OPEN = "unexpected end of data"  # csv's word for a quote still open where the lines end
# (session 49 probe: Python's csv writer's texts holding a tab and a newline trained as
# fragments, their halves' "labels" skipped as unknown, without a word of the quotes)
TWO_WAYS = ("a line starting with a quote that the next line closes, read as rows of its own (a "
            "quoting writer, pandas or Python's csv, would have written one text of several "
            "lines so: if one wrote this file, write it as CSV, comma-separated)")
SWALLOW_LIMIT = 10  # lines a quote of a full first line may take before it is read as it stands


def plain(line: str) -> list[str]:
    """A line as it stands, split at tabs (its line end dropped)."""
    return line.rstrip("\r\n").split("\t")


def quoted(lines: list[str]) -> list[str] | None:
    """The record ``lines`` hold read by CSV's rules (tab-separated), or None where a quote is
    still open at their end. Raises ``csv.Error`` where they are not CSV."""
    try:
        return next(csv.reader(lines, delimiter="\t", strict=True), [])
    except csv.Error as exc:
        if OPEN in str(exc):
            return None
        raise


def record_row(lines: list[str]) -> list[str]:
    """A record's fields from its lines, by the rule the index chose for it (``text()``)."""
    if len(lines) > 1:
        return quoted(lines) or []
    try:
        row = quoted(lines)
    except csv.Error:
        row = None
    return plain(lines[0]) if row is None else row


def _closes(line: str) -> bool:
    """Whether a line read inside a quoted field closes it and opens none after (``""`` is a
    quote in the text; a quote opens a field only at its start)."""
    inside, start, i, n = True, False, 0, len(line)
    while i < n:
        c = line[i]
        if inside:
            if c == '"':
                if i + 1 < n and line[i + 1] == '"':
                    i += 2
                    continue
                inside = False
        elif c == "\t":
            start = True
            i += 1
            continue
        elif c == '"' and start:
            inside = True
        start = False
        i += 1
    return not inside


class TsvReader:
    """Records of a TSV file as lists of fields, as ``csv.reader`` gives them.

    ``lines`` is the index pass's line generator, which advances ``state`` ("line", "pos",
    "bad_utf8", "long") a line at a time; a record is returned (or ``csv.Error`` raised for
    it) with ``state`` at its last line, lines looked at ahead given back. ``ncols`` is set
    by the caller once the header is read.
    """

    def __init__(self, lines: Iterator[str], state: dict, note=None) -> None:
        self.lines, self.state = lines, state
        self.note = note  # note(what, where): a full line read as it stands that a quoting
        # writer's reading would join with the next lines (TWO_WAYS)
        self.ahead: deque[tuple[str, tuple]] = deque()
        self.ncols: int | None = None
        self.read_to = (state["line"], state["pos"])  # the last line read from the file

    def __iter__(self) -> TsvReader:
        return self

    def _line(self) -> tuple[str, tuple]:
        if self.ahead:
            return self.ahead.popleft()
        st = self.state  # counted on from the file's last line, not from a line given back
        st["line"], st["pos"] = self.read_to  # (a review: rows after two given back had the
        st["bad_utf8"] = st["long"] = False  # byte ranges of others, or none)
        text = next(self.lines)  # StopIteration: the file's end
        self.read_to = (st["line"], st["pos"])
        return text, (st["line"], st["pos"], st["bad_utf8"], st["long"])

    def __next__(self) -> list[str]:
        first = self._line()
        taken = [first]
        try:
            return self._record(first[0], taken)
        finally:
            st, last = self.state, taken[-1][1]
            st["line"], st["pos"] = last[0], last[1]
            st["bad_utf8"] = any(t[1][2] for t in taken)
            st["long"] = any(t[1][3] for t in taken)

    def _record(self, line: str, taken: list) -> list[str]:
        if taken[0][1][3]:  # a line too long to read: a record of its own (refused)
            return [""]
        try:
            row = quoted([line])
        except csv.Error as exc:
            if "new-line character" in str(exc):  # lone CR line ends: said as such (text.py)
                raise
            return plain(line)
        if row is not None or self.ncols is None:
            return row if row is not None else plain(line)
        whole = len(plain(line)) == self.ncols
        size = len(line)
        while True:
            try:
                nxt = self._line()
            except StopIteration:
                if whole:
                    return self._as_it_stands(line, taken)
                raise csv.Error(OPEN) from None
            taken.append(nxt)
            size += len(nxt[0])
            if whole and (nxt[1][3] or len(plain(nxt[0])) >= self.ncols
                          or len(taken) > SWALLOW_LIMIT or size > MAX_RECORD_BYTES):
                if self.note is not None and not nxt[1][3] and '"' in nxt[0] and \
                        _closes(nxt[0]) and self._fields([t for t, _ in taken]) == self.ncols:
                    self.note(TWO_WAYS, f"lines {taken[0][1][0]}-{nxt[1][0]}")
                return self._as_it_stands(line, taken)
            if size > MAX_RECORD_BYTES:
                raise csv.Error("field larger than field limit")
            if '"' in nxt[0] and _closes(nxt[0]):
                try:
                    row = quoted([t for t, _ in taken])
                except csv.Error:
                    if not whole:
                        raise
                    return self._as_it_stands(line, taken)  # (a full row is never lost)
                if row is not None:
                    return row

    @staticmethod
    def _fields(lines: list[str]) -> int:
        """How many fields ``lines`` read as one quoted record hold (0: they do not)."""
        try:
            return len(quoted(lines) or [])
        except csv.Error:
            return 0

    def _as_it_stands(self, line: str, taken: list) -> list[str]:
        """The first line as a row of its own; the lines after it given back."""
        self.ahead.extendleft(reversed(taken[1:]))
        del taken[1:]
        return plain(line)
