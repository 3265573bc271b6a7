"""What Pillow holds of an image besides its pixels (PNG text, EXIF and ICC chunks, JPEG APP
segments), measured without decoding: the image folder's index counts it (sources/images.py)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MAX_METADATA", "MAX_SCANS", "TEXT_CHUNK", "TEXT_MEMORY", "TOO_MANY_SCANS",
           "bound_pillow_text", "metadata", "png_pixels"]

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
# A progressive JPEG's decoder goes over every coefficient once a scan: a usual file has up to
# about 20 scans; a 2.5 MB file of 100,000 scans took minutes a decode (session 33 probe), and it
# is decoded at indexing and at every read. More is a bad row.
MAX_SCANS = 256
_SOS = b"\xff\xda"  # (in the entropy-coded data a 0xFF byte is always followed by 0x00)


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
            if marker[:1] == b"\xda":  # the first scan: count the others
                return total, (_TOO_MUCH if total > MAX_METADATA else _scans(f))
            if not marker or marker[0] == 0xD9:  # end of image
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
TOO_MANY_SCANS = f"over {MAX_SCANS} scans, each a pass of the decoder over the whole image"


def _scans(f) -> str | None:
    """Why the JPEG whose first scan ``f`` has just reached has too many scans, or None. The
    count ends at the end-of-image marker: what follows it (a phone's motion-photo video, an
    MPO's second picture) is not decoded (a review: 20 MB of appended data held 312 chance
    0xFFDA pairs)."""
    n, tail = 1, b""
    while block := f.read(1 << 20):
        data = tail + block
        end = data.find(b"\xff\xd9")
        n += (data if end < 0 else data[:end]).count(_SOS)
        if n > MAX_SCANS:
            return TOO_MANY_SCANS
        if end >= 0:
            return None
        tail = data[-1:] if data[-1:] == b"\xff" else b""
    return None


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


_BLOCK = 1 << 20
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


def png_pixels(path: Path) -> str | None:
    """What is wrong with the PNG ``path``'s chunks and pixel data, or None; read in 1 MiB
    blocks, never a whole chunk (Pillow's ``verify`` reads each chunk whole: one pixel-data
    chunk declared 1 GB took an index under --budget 150MB to 2 GB, session 33 probe).

    Each chunk's checksum (as ``verify``), and the pixel data inflated as a decode inflates
    it, the output dropped: a stream that fails, ends short of the image, or (not interlaced)
    starts a row with a filter other than 0-4 was found only when a step read the image, and
    that ended the run (session 33 probe: scrambled data under valid checksums)."""
    import zlib

    import numpy as np

    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return "not a PNG file"
        inflate, total, need, stride = zlib.decompressobj(), 0, None, 0
        while len(head := f.read(8)) == 8:
            n, kind = int.from_bytes(head[:4], "big"), head[4:]
            name = kind.decode("latin-1")
            crc, left, first = zlib.crc32(kind), n, b""
            while left:
                block = f.read(min(left, _BLOCK))
                if not block:
                    return f"cut short inside its {name!r} chunk"
                left -= len(block)
                crc = zlib.crc32(block, crc)
                first = first or (block if kind == b"IHDR" else b"")
                data = block if kind == b"IDAT" and need is not None else b""
                while data and total < need:
                    try:
                        out = inflate.decompress(data, _BLOCK)
                    except zlib.error as exc:
                        return f"its pixel data does not inflate: {str(exc).split(': ')[-1]}"
                    data = inflate.unconsumed_tail
                    if stride:  # the byte that starts each row names its filter: 0 to 4
                        starts = np.frombuffer(out, np.uint8, count=min(len(out), need - total))
                        starts = starts[(-total) % stride::stride]
                        if starts.size and int(starts.max()) > 4:
                            return f"its pixel data starts a row with filter {int(starts.max())}"
                    total += len(out)
                    if not out:
                        break
            if f.read(4) != crc.to_bytes(4, "big"):
                return f"its {name!r} chunk fails its checksum"
            if kind == b"IHDR" and len(first) >= 13:
                need, stride = _png_raw_bytes(first)
            if kind == b"IEND":
                break
        else:
            return "no IEND chunk (cut short)"
        if need is not None and total < need:
            return f"its pixel data ends after {total} of the {need} bytes the image needs"
        return None


def _png_raw_bytes(ihdr: bytes) -> tuple[int | None, int]:
    """(Inflated bytes of the image ``ihdr`` describes, its row stride where it is not
    interlaced, else 0); (None, 0) where the header is not one Pillow opens (it judges it)."""
    w, h = int.from_bytes(ihdr[:4], "big"), int.from_bytes(ihdr[4:8], "big")
    depth, colour, interlace = ihdr[8], ihdr[9], ihdr[12]
    if colour not in _PNG_CHANNELS or not w or not h:
        return None, 0
    bits = _PNG_CHANNELS[colour] * depth

    def size(pw: int, ph: int) -> int:
        return ph * (1 + (pw * bits + 7) // 8) if pw > 0 and ph > 0 else 0

    if not interlace:
        return size(w, h), 1 + (w * bits + 7) // 8
    return sum(size(-(-(w - x0) // dx), -(-(h - y0) // dy)) for x0, y0, dx, dy in _ADAM7), 0
