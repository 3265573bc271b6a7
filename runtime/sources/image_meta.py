"""What Pillow holds of an image besides its pixels (PNG text, EXIF and ICC chunks, JPEG APP
segments), measured without decoding: the image folder's index counts it (sources/images.py)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MAX_METADATA", "TEXT_CHUNK", "TEXT_MEMORY", "bound_pillow_text", "metadata"]

# Pillow keeps an image's metadata beside its pixels (PNG text, EXIF and ICC chunks, JPEG APP
# segments), read whole, and expands compressed PNG text to 1 MiB a chunk, 64 MiB an image: a
# probe's 20 KB PNGs of zTXt held 64 MB each while decoding, past a budget that counted pixels.
# Each image's metadata is measured when the folder is indexed (expanded as Pillow expands it,
# text after the pixels included, which Pillow reads only when it decodes them); more than
# MAX_METADATA bytes of it, or PNG text past TEXT_CHUNK / TEXT_MEMORY, is a bad row, and the
# budget counts the largest (``ImageSource.bytes_fixed``).
MAX_METADATA = 2 << 20
TEXT_CHUNK = 1 << 20  # Pillow's PngImagePlugin.MAX_TEXT_CHUNK (its default)
TEXT_MEMORY = 1 << 20  # Pillow's PngImagePlugin.MAX_TEXT_MEMORY (its default 64 MiB)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXELS = (b"IDAT", b"fdAT")
_PNG_COMPRESSED = {b"zTXt": 1, b"iCCP": 1, b"iTXt": 2}  # bytes after the key's NUL before zlib
_JPEG_BARE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length


def metadata(path: Path) -> tuple[int, str | None]:
    """(Bytes of ``path``'s metadata as Pillow holds it: its PNG chunks or JPEG segments before
    the first scan that are not pixel data, plus PNG text and ICC profiles expanded; the reason
    it is too much, or None). 0 for other files (Pillow judges them)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head == _PNG_SIGNATURE:
            return _png_metadata(f)
        if head[:2] != b"\xff\xd8":
            return 0, None
        f.seek(2)
        total, size = 0, os.fstat(f.fileno()).st_size
        while f.read(1) == b"\xff" and total <= MAX_METADATA:
            marker = f.read(1)
            while marker == b"\xff":  # fill bytes
                marker = f.read(1)
            if not marker or marker[0] in (0xDA, 0xD9):  # start of scan, end of image
                break
            if marker[0] in _JPEG_BARE:
                continue
            length = f.read(2)
            if len(length) < 2:
                break
            n = int.from_bytes(length, "big")
            if f.tell() + n - 2 > size:
                break  # cut short: Pillow's check names it
            total += n
            f.seek(n - 2, os.SEEK_CUR)
        return total, (_TOO_MUCH if total > MAX_METADATA else None)


_TOO_MUCH = f"over {MAX_METADATA >> 20} MiB besides the pixels"


def _png_metadata(f) -> tuple[int, str | None]:
    import zlib

    raw = expanded = text = 0
    size = os.fstat(f.fileno()).st_size
    while len(chunk := f.read(8)) == 8 and chunk[4:] != b"IEND":
        n, kind = int.from_bytes(chunk[:4], "big"), chunk[4:]
        if not kind.isalpha() or f.tell() + n + 4 > size:
            break  # not a chunk, or cut short: Pillow's check names it
        if kind in _PNG_PIXELS:
            f.seek(n + 4, os.SEEK_CUR)  # the data and its CRC
            continue
        raw += n
        if raw > MAX_METADATA:
            return raw, _TOO_MUCH
        if kind not in _PNG_COMPRESSED:
            text += n if kind == b"tEXt" else 0
            f.seek(n + 4, os.SEEK_CUR)
        else:
            data = f.read(n)
            f.seek(4, os.SEEK_CUR)
            key, _, rest = data.partition(b"\0")
            skip = _PNG_COMPRESSED[kind]
            if kind == b"iTXt" and rest[:1] != b"\x01":  # uncompressed: counted as it is
                text += len(rest)
            else:
                if kind == b"iTXt":  # flag, method, language NUL, translated key NUL, text
                    rest, skip = rest[skip:].split(b"\0", 2)[-1], 0
                try:
                    out = len(zlib.decompressobj().decompress(rest[skip:], TEXT_CHUNK + 1))
                except zlib.error:
                    out = 0  # (Pillow keeps nothing of a chunk it cannot expand)
                if out > TEXT_CHUNK:
                    return raw, f"a compressed PNG chunk expands past {TEXT_CHUNK >> 20} MiB"
                expanded += out
                text += out if kind != b"iCCP" else 0
        if text > TEXT_MEMORY:
            return raw, f"PNG text over {TEXT_MEMORY >> 20} MiB"
    return raw + expanded, None


def bound_pillow_text(png_plugin) -> None:
    """Pillow's PNG text limits at most ours (``metadata`` refuses what would pass them)."""
    png_plugin.MAX_TEXT_CHUNK = min(png_plugin.MAX_TEXT_CHUNK, TEXT_CHUNK)
    png_plugin.MAX_TEXT_MEMORY = min(png_plugin.MAX_TEXT_MEMORY, TEXT_MEMORY)
