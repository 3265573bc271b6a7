"""Advice on text files that are not what they seem: UTF-16/32, Windows-1252, gzip, another
separator, NUL bytes (the index pass's error messages), and the index pass's budget check."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from contract.errors import UserError

from ..memory import budget_given, current_rss

# bytes a row of the index takes once it is read, beyond its offset and length (12 bytes) and
# label (4) that grow as it reads: the run's order (int32), a held-out split's ~5 and room for
# a relabelled copy of the labels; a session 45 probe's 2.62 M-row CSV took the process from
# 101.8 to 112.9 MB after its index pass, past --budget 110MB, before any refusal
AFTER_INDEX = 16


def _unicode(text: str) -> bool:
    """Whether ``text`` is Unicode text: no lone surrogate, which a JSON ``\\udXXX`` escape can
    write and no encoder or tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_index_room(path: Path, rows: int) -> None:
    """Refuse, as the index pass reads it, a text file whose index of ``rows`` rows so far
    (16 bytes each, its arrays growing by a sixteenth at a time), ``AFTER_INDEX`` bytes a row
    after it and 4 MB take the process past the budget.

    Raises:
        UserError: naming the rows, the memory and the ways out.
    """
    budget = budget_given()
    if budget is None:
        return
    rss = current_rss()
    if rss + rows * (1 + AFTER_INDEX) + (4 << 20) > budget:  # (1: the arrays' next growth)
        raise UserError(f"{path}: its index of over {rows:,} rows takes this process to "
                        f"{rss / 1e6:.0f} MB, too close to the budget of {budget / 1e6:.0f} MB "
                        f"to read the rest (each row keeps ~{16 + AFTER_INDEX} bytes); raise "
                        "--budget, or train on part of the file (e.g. split it)")


def _refuse_utf16(fd: int, path: Path) -> None:
    """A UTF-16/32 file (Windows "Unicode" text, PowerShell's ``>``) read as UTF-8 lost rows or
    parsed by accident (session 23 probe) and was advised as Windows-1252: said as what it is."""
    head = os.pread(fd, 4, 0)
    enc = ("UTF-32" if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") else
           "UTF-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else None)
    if enc is None and len(head) == 4 and head != b"\0\0\0\0":  # no byte order mark: ASCII
        # text with NUL bytes beside every character, its byte order from where they are
        if head[1:] == b"\0\0\0":
            enc = "UTF-32LE"
        elif head[:3] == b"\0\0\0":
            enc = "UTF-32BE"
        elif head[1] == head[3] == 0:
            enc = "UTF-16LE"
        elif head[0] == head[2] == 0:
            enc = "UTF-16BE"
    if enc is not None:
        raise UserError(f"{path} is {enc} text; save it as UTF-8 ({_iconv(enc, path)})")


def _to_utf8(path: Path) -> str:
    """How to convert a Windows-1252 (Excel on Windows; Latin-1 plus curly quotes) file."""
    return _iconv("cp1252", path)


def _iconv(enc: str, path: Path) -> str:
    """The iconv command for ``path`` as given (session 49 probe: its bare name, run where the
    user stands, found no file), its output beside it."""
    import shlex

    out = Path(path).with_name(f"{Path(path).stem}-utf8{Path(path).suffix}")
    return f"e.g. iconv -f {enc} -t utf-8 {shlex.quote(str(path))} > {shlex.quote(str(out))}"


def utf8_way(path: Path, wide: bool) -> str:
    """How to keep rows that are not UTF-8: convert the file, where its other rows are ASCII;
    where they are UTF-8 beyond ASCII (``wide``) the file mixes encodings, and converting it all
    would garble them (session 43 probe: the advised iconv turned 294 'café' rows into 'cafÃ©'
    and the next run trained on them without a word)."""
    if not wide:
        return _to_utf8(path)
    return ("the file mixes encodings: its other rows are UTF-8 beyond ASCII, which converting "
            "the whole file would garble; convert only the lines that are not UTF-8 (each line "
            "read as UTF-8, else as cp1252)")


def swallows(row: list[str], ncols: int, li: int, known, delimiter: str) -> bool:
    """Whether a CSV record that spans lines holds, inside a quoted field, a line that reads as
    a row of its own with a ``known`` label (session 43 probe: a stray quote on line 21 and
    another on line 25 made five rows one, trained as one label, without a word; the TSV reader
    keeps such lines apart, RFC CSV cannot)."""
    for cell in row:
        if "\n" not in cell:
            continue
        for inner in cell.split("\n")[:-1]:  # (the first too: a quote opened before a row)
            if inner.count(delimiter) < ncols - 1:  # (cheap: most text lines are not rows)
                continue
            try:
                parts = next(csv.reader([inner], delimiter=delimiter))
            except (csv.Error, StopIteration):
                continue
            if len(parts) == ncols and _known(parts[li].strip(), known):
                return True
    return False


def _known(label: str, known) -> bool:
    """``label`` is in ``known`` as written, or as the whole number it spells (``1.0``: the
    label 1, as the label map reads it; a session 43 review: such labels were missed)."""
    from .labels import _WHOLE_FLOAT, _whole

    return label in known or bool(_WHOLE_FLOAT.fullmatch(label)) and _whole(label) in known


def shown_label(name: str) -> str:
    """A label as an error names it: as written where it reads as what it is, else quoted and
    escaped (session 43 probe: ' 1' beside '1', NFC and NFD 'café', 'red' and 'red' with a
    zero-width space read as one name listed twice)."""
    import unicodedata

    plain = name and name.isprintable() and name == name.strip() and \
        unicodedata.is_normalized("NFC", name) and "," not in name
    return name if plain else ascii(name)


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _format_hint(path: Path, header: list[str]) -> str:
    """What a file whose header names no expected column looks like, as advice."""
    first = header[0] if header else ""
    if first[1::2].count("\x00") > len(first) // 4:  # NUL beside every other character (a
        return " (the file looks like UTF-16: save it as UTF-8)"  # BOM is refused before)
    if "\x00" in "".join(header):
        return " (its header holds a NUL byte: check that it is a text file, and remove it)"
    seps = {";": "';'", "\t": "a tab", "|": "'|'"}  # ('|': a session 43 probe)
    if len(header) == 1 and any(c in first for c in seps):
        sep = next(name for c, name in seps.items() if c in first)
        return (f" (its columns look separated by {sep}: save it with commas, or as .tsv "
                "for tabs)")
    return ""


# bad-row reasons that say the label column is of another kind than the model's loss takes
_MISFIT = ("label is not a number", "label is not a string or number",
           "label is outside [0, 1] (binary cross-entropy)")


def label_misfit(counts: dict[str, int], usable: int, kind: str, column: str,
                 one_value: bool = False) -> str | None:
    """Where no row has a label a --loss bce / mse model can take, or (bce) more rows have
    labels outside [0, 1] than rows it can, or those it can all hold one value (a session 35
    probe: 1-5 star ratings into a bce model trained on the 1-star rows alone, all targets 1,
    and scored 1.000 held out; -1/+1 labels alike), what to say; None otherwise. A regression's
    rows without a number ("NA") stay bad rows while some have one."""
    bad = {r: n for r, n in counts.items() if r in _MISFIT}
    outside = counts.get(_MISFIT[2], 0)
    if kind == "cross_entropy" or not bad or (usable and not (
            kind == "bce" and outside and (outside > usable or one_value))):
        return None
    top = max(bad, key=lambda r: bad[r])
    return (f"{sum(bad.values()):,} rows have a label this model cannot take ({top}: "
            f"{bad[top]:,}), {usable:,} one it can; {misfit_way(kind, column)}")


def misfit_way(kind: str, column: str) -> str:
    """The way out of :func:`label_misfit` (also the hint where no row is usable)."""
    way = ("binary cross-entropy (--loss bce) takes labels 0/1, true/false or probabilities"
           if kind == "bce" else "a regression (--loss mse) takes a number a row")
    return (f"{way}: for labels that name classes, export the model with a head of one output "
            f"per class and --loss cross_entropy, or check --label-column '{column}'")
