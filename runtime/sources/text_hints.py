"""Advice on text files that are not what they seem: UTF-16/32, Windows-1252, gzip, another
separator, NUL bytes (the index pass's error messages)."""

from __future__ import annotations

import os
from pathlib import Path

from contract.errors import UserError


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
        raise UserError(f"{path} is {enc} text; save it as UTF-8 (e.g. iconv -f {enc} -t utf-8 "
                        f"{path.name} > {path.stem}-utf8{path.suffix})")


def _to_utf8(path: Path) -> str:
    """How to convert a Windows-1252 (Excel on Windows; Latin-1 plus curly quotes) file."""
    return f"e.g. iconv -f cp1252 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}"


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
    if len(header) == 1 and (";" in first or "\t" in first):
        sep = "';'" if ";" in first else "a tab"
        return (f" (its columns look separated by {sep}: save it with commas, or as .tsv "
                "for tabs)")
    return ""
