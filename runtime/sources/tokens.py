"""Token ids of a text data set, computed once by a forked child that holds the tokenizer.

The training process never loads the tokenizer: ``tokenizers`` with BERT's ``tokenizer.json``
costs ~20 MB of resident memory (its library and vocabulary structures, measured), a tenth of a
256 MB budget. At open time a child process tokenises every row, truncated and padded to the
bundle's sequence length, into an unnamed temporary file (ids as uint32, then uint16 where the
vocabulary fits; masks and type ids as uint8); ``take`` reads the rows of a micro-batch with
``pread``. The file costs disk, not memory: up to 64 tokens x 5 bytes per row with a mask
(12,808 reviews: 4.1 MB), as long as its folder is on a disk: where the temporary folder is
memory-backed (tmpfs: /tmp on Debian 13, Fedora, Arch and many containers) the file is RAM
that no process's RSS shows, so a budget run measured within its budget used more (a session
41 probe: 72 MB more for a 20 MB CSV).
The file goes to the first of $TMPDIR (or /tmp) and /var/tmp on a disk; where neither is, a
note says how large it is and how to move it (:func:`_cache_folder`).
"""

from __future__ import annotations

import os
import re
import select
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from contract.errors import UserError

from ..memory import budget_given, child_limit, fork_held, forked_child, proc_status

__all__ = ["TokenCache", "check_tokenizer_room", "load_tokenizer"]

_CHUNK = 256  # rows tokenised per encode_batch call in the child (a "." to the parent each)
STALL_S = 120.0  # the child is stopped where no chunk of rows is done in this many seconds
# it is stopped this far below its limit, its RSS read every millisecond: a tokenizer that
# expands text writes fresh pages at a few GB/s (4 MB of headroom at 5 ms was passed by
# 0.4 MB once), so 24 MB would take over 20 GB/s to pass
_HEADROOM = 24 << 20
# a budget that leaves less above the process than this when tokenising starts is named as
# too small (a tokenizer that expands the text passes any budget: it is named at larger ones)
TOKENIZER_ROOM = 128 << 20
PROGRESS_S = 10.0  # a tokenisation that takes longer says how far it is this often


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _in_memory(folder: str) -> bool:
    """Whether ``folder`` is on a memory-backed file system (tmpfs, ramfs): the mount that
    holds it in /proc/self/mountinfo (Linux; elsewhere False)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return _memory_backed(f.read(), os.path.realpath(folder))
    except OSError:
        return False


def _memory_backed(mountinfo: str, where: str) -> bool:
    """``where``'s file system in ``mountinfo`` (/proc/self/mountinfo's text) is tmpfs or ramfs:
    the longest mount point that holds it, the last one listed where mounts are stacked (the
    one on top), its name unescaped (a space is written \\040)."""
    best, fstype = -1, ""
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest.split():
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), parts[4])
        if (where == point or where.startswith(point.rstrip("/") + "/")) \
                and len(point) >= best:
            best, fstype = len(point), rest.split()[0]
    return fstype in ("tmpfs", "ramfs")


def _cache_folder(size: int) -> str | None:
    """Where the token file goes: the first of the temporary folder and /var/tmp that is
    writable and on a disk; else the temporary folder, with a note where the file is large
    enough to matter (1 MB)."""
    first = tempfile.gettempdir()
    for folder in dict.fromkeys((first, "/var/tmp")):
        if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK) \
                and not _in_memory(folder):
            return folder
    if size >= 1 << 20:
        print(f"note: the tokenised text ({size / 1e6:.0f} MB) is kept in {first}, which is "
              "memory-backed (tmpfs): that is RAM outside the process's measured memory and "
              "its --budget; set TMPDIR to a folder on a disk", flush=True)
    return None


class TokenCache:
    """``fields``: model input -> (``tokenizers.Encoding`` attribute, dtype of the input)."""

    def __init__(self, n: int, seq_len: int, fields: dict[str, tuple[str, np.dtype]],
                 tokenizer_path, texts: Callable[[int], str], chars: int,
                 problems=None) -> None:
        """``problems``: the source's (``common.Problems``); the texts cut to ``seq_len`` are
        noted there (session 49 probe: 120-token reviews cut to 64 without a word)."""
        self.n, self.seq_len, self.fields = n, seq_len, dict(fields)
        self.store = {name: (np.dtype(np.uint8) if attr != "ids" else np.dtype(np.uint32))
                      for name, (attr, _) in self.fields.items()}
        size = n * seq_len * sum(dt.itemsize for dt in self.store.values())
        self._dir = _cache_folder(size)
        self._f = tempfile.TemporaryFile(prefix="instant-runtime-tokens-", dir=self._dir)
        self._fill(tokenizer_path, texts, chars)
        if self.cut and problems is not None:
            why = (f"{self.cut:,} of {n:,} texts are longer than the model's {seq_len} tokens: "
                   f"their {self.kept} {seq_len} are what it reads")
            problems.noted[why] = self.cut
            problems.examples[why] = [f"text {i + 1}" for i in self.first_cut]
        self.offset, off = {}, 0
        for name, dt in self.store.items():
            self.offset[name] = off
            off += n * seq_len * dt.itemsize

    def _fill(self, tokenizer_path, texts: Callable[[int], str], chars: int) -> None:
        """Tokenise every row in a forked child (the tokenizer never enters this process).

        The tokenizer comes from the bundle, which is untrusted: a normalizer that writes 10^5
        characters for each one took a child to 1.75 GB under --budget 300MB, and a pattern
        that backtracks can run for ever. This process reads the child's RSS every
        millisecond and stops it short of :func:`memory.child_limit` (the budget), and stops it
        where ``STALL_S`` pass without a chunk of rows done; either is one error line."""
        limit = child_limit()
        r, w = os.pipe()
        parent = os.getpid()
        pid = fork_held()
        if pid == 0:  # child
            os.close(r)
            msg = b"ok"
            try:
                forked_child(parent)
                # the tokenizer's Rust panics print to stderr before they surface as
                # exceptions; the parent reports the failure in one line, so the child's
                # stderr goes nowhere
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
                msg = self._child(tokenizer_path, texts, chars, w)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                msg = f"error: {type(exc).__name__}: {exc}".encode()[:2000]
            finally:
                try:
                    os.write(w, b"\n" + msg)
                finally:  # a parent gone (Ctrl-C) breaks the pipe: exit all the same
                    os._exit(0)
        os.close(w)
        chunks: list[bytes] = []
        stopped = ""
        ended = False  # the child closed its end: it is exiting
        start = proc_status(pid).get("VmRSS", 0)
        last = t0 = told = time.monotonic()
        done, in_msg = 0, False  # chunks of rows done (a "." each), then the child's message
        poller = select.poll()
        poller.register(r, select.POLLIN | select.POLLHUP)
        try:
            while True:
                ready = poller.poll(1)
                rss = proc_status(pid).get("VmRSS", 0)
                if limit is not None and rss > limit - _HEADROOM:
                    if limit - start < TOKENIZER_ROOM and limit == budget_given():
                        # (an outside probe: budgets up to 75 MB blamed the bundle)
                        raise UserError(_too_little(limit, start))
                    stopped = (f"it passed {limit / 1e6:.0f} MB"
                               + (" (the budget)" if limit == budget_given() else "")
                               + f", from {start / 1e6:.0f} MB when it started")
                    break
                if ready:
                    block = os.read(r, 4096)
                    if not block:
                        ended = True
                        break
                    chunks.append(block)
                    last = time.monotonic()
                    if not in_msg:
                        head, nl, _ = block.partition(b"\n")
                        done += head.count(b".")
                        in_msg = bool(nl)
                    if last - told >= PROGRESS_S and done:  # (also the last chunks' block)
                        # a large file (or a slow pattern of the bundle's tokenizer): say how
                        # far it is and how long it will take, so a user can judge and stop it
                        told = last
                        rows = min(self.n, done * _CHUNK)
                        rate = rows / (last - t0)
                        print(f"data: tokenised {rows:,} of {self.n:,} rows ({rate:,.0f} rows/s, "
                              f"about {_duration((self.n - rows) / rate)} left)", flush=True)
                elif time.monotonic() - last > STALL_S:
                    stopped = f"no rows were done in {STALL_S:.0f} s"
                    break
        finally:
            if not ended:  # stopped here, or this process interrupted (Ctrl-C): never left behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.close(r)
            os.waitpid(pid, 0)
        if stopped:
            raise UserError(f"tokenising the text data was stopped: {stopped}; the bundle's "
                            "tokenizer.json (its normalizer or pre-tokenizer) expands or "
                            "backtracks on this text: re-export the bundle from its model")
        msg = b"".join(chunks).decode("utf-8", "replace").partition("\n")[2]
        if msg.startswith("ids up to "):
            # "ids up to TOP, kept first|last, cut ROW ROW ..." (the rows cut to seq_len)
            words = msg.split()
            self.kept, self.cut, self.first_cut = (words[5].rstrip(","), int(words[7]),
                                                   [int(i) for i in words[8:]])
            # the ids written, not the vocabulary's size: a tampered tokenizer.json gives ids
            # past its own vocabulary (70000 in a 11-entry one wrapped to 4464 as uint16 and
            # trained silently); such an id is then refused against the embedding table
            if int(words[3].rstrip(",")) < 65536:  # they fit in uint16: rewritten smaller
                self._shrink_ids()
            return
        raise UserError(f"tokenising the text data failed ({msg or 'the child process died'}); "
                        "check the bundle's tokenizer.json")

    def _child(self, tokenizer_path, texts: Callable[[int], str], chars: int,
               progress: int) -> bytes:
        tok = load_tokenizer(tokenizer_path, self.seq_len)
        fd, L = self._f.fileno(), self.seq_len
        offset, off = {}, 0
        for name, dt in self.store.items():
            offset[name] = off
            off += self.n * L * dt.itemsize
        os.ftruncate(fd, off)
        top, cut, first = 0, 0, []  # (texts cut: how many, and the first three)
        for start in range(0, self.n, _CHUNK):
            stop = min(self.n, start + _CHUNK)
            batch, long = [], set()  # (each text cut as it is read: a review)
            for i in range(start, stop):
                t = texts(i)
                if len(t) > chars:
                    long.add(i - start)
                batch.append(t[:chars])
            encs = tok.encode_batch(batch)
            over = [start + i for i, e in enumerate(encs) if i in long or e.overflowing]
            cut += len(over)
            first += over[:3 - len(first)]
            for name, (attr, _) in self.fields.items():
                dt = self.store[name]
                # (a value past the stored dtype raises OverflowError: reported, never wrapped)
                block = np.asarray([getattr(e, attr) for e in encs], dtype=dt).reshape(-1, L)
                if attr == "ids" and block.size:
                    top = max(top, int(block.max()))
                os.pwrite(fd, block.tobytes(), offset[name] + start * L * dt.itemsize)
            os.write(progress, b".")  # a chunk done: the parent's stall clock starts again
        kept = "first" if (tok.truncation or {}).get("direction", "right") == "right" else "last"
        # how many were cut, and the first of them (the message stays small)
        return f"ids up to {top}, kept {kept}, cut {cut} {' '.join(map(str, first))}".encode()

    def _shrink_ids(self) -> None:
        """Rewrite uint32 ids as uint16 (half the file) once the vocabulary is known."""
        fd, L = self._f.fileno(), self.seq_len
        old = dict(self.store)
        new = {k: (np.dtype(np.uint16) if v == np.uint32 else v) for k, v in old.items()}
        src_off, dst_off, so, do = {}, {}, 0, 0
        for name in old:
            src_off[name], dst_off[name] = so, do
            so += self.n * L * old[name].itemsize
            do += self.n * L * new[name].itemsize
        tmp = tempfile.TemporaryFile(prefix="instant-runtime-tokens-", dir=self._dir)
        for name in old:
            for s in range(0, self.n, 4096):
                e = min(self.n, s + 4096)
                raw = os.pread(fd, (e - s) * L * old[name].itemsize,
                               src_off[name] + s * L * old[name].itemsize)
                arr = np.frombuffer(raw, old[name]).astype(new[name])
                os.pwrite(tmp.fileno(), arr.tobytes(), dst_off[name] + s * L * new[name].itemsize)
        self._f.close()
        self._f, self.store = tmp, new

    def rows(self, idx: Sequence[int]) -> dict[str, np.ndarray]:
        """The inputs of rows ``idx`` as the model's dtypes, [len(idx), seq_len] each."""
        idx = np.asarray(idx, np.int64)
        fd, L = self._f.fileno(), self.seq_len
        out = {}
        for name, (_, dt) in self.fields.items():
            st = self.store[name]
            buf = np.empty((idx.size, L), st)
            row = L * st.itemsize
            for k, i in enumerate(idx.tolist()):
                os.preadv(fd, [buf[k]], self.offset[name] + i * row)
            out[name] = buf.astype(dt)
        return out

    def bytes_per_row(self) -> int:
        return sum(self.seq_len * (st.itemsize + np.dtype(self.fields[n][1]).itemsize)
                   for n, st in self.store.items())

    def close(self) -> None:
        self._f.close()


def _too_little(limit: int, start: int) -> str:
    return (f"--budget {limit / 1e6:.0f} MB leaves {max(0, limit - start) / 1e6:.0f} MB above the "
            f"{start / 1e6:.0f} MB this process held when the text data began tokenising, too "
            "little for the tokenizer: raise --budget (`plan --budget` says what this run needs)")


def check_tokenizer_room(nbytes: int, name: str) -> None:
    """Refuse, before reading it, a tokenizer file whose bytes would take this process past
    ``--budget`` (session 38 probe: a tampered bundle's 83 MB "tokenizer" was read first and
    the budget blamed after).

    Raises:
        UserError: naming the file's size and the ways out.
    """
    limit = budget_given()
    held = proc_status(os.getpid()).get("VmRSS", 0) if limit is not None else 0
    if limit is not None and held + nbytes > limit - _HEADROOM:
        if limit - held < TOKENIZER_ROOM:  # the budget is what is short, as when tokenising
            raise UserError(_too_little(limit, held))
        raise UserError(f"the bundle's tokenizer '{name}' is {nbytes / 1e6:.0f} MB; reading it "
                        f"would take this process ({held / 1e6:.0f} MB) past --budget "
                        f"{limit / 1e6:.0f} MB: raise --budget, or re-export the bundle if that "
                        "file is not its tokenizer")


def load_tokenizer(tokenizer: str | Path | bytes | object, seq_len: int):
    """A ``tokenizers.Tokenizer`` (from a tokenizer.json path or its bytes, or the object) that
    truncates and pads every text to ``seq_len`` (its own pad token and side when it has one)."""
    if isinstance(tokenizer, bytes):  # a tokenizer.json's verified bytes
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("text data needs the 'tokenizers' package; install it with "
                            "`pip install tokenizers`") from None
        try:
            tok = Tokenizer.from_str(tokenizer.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
            raise UserError(f"cannot read the bundle's tokenizer: {str(exc)[:120]}; re-export "
                            "the bundle") from None
    elif not isinstance(tokenizer, str | Path):
        tok = tokenizer
    else:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("text data needs the 'tokenizers' package; install it with "
                            "`pip install tokenizers`") from None
        try:
            tok = Tokenizer.from_file(str(tokenizer))
        except Exception as exc:  # tokenizers raises plain Exception for a bad file
            raise UserError(f"cannot read tokenizer {tokenizer}: {str(exc)[:120]}; re-export "
                            "the bundle") from None
    pad = tok.padding or {}
    pad_id, pad_token = pad.get("pad_id"), pad.get("pad_token")
    if pad_id is None:
        pad_id, pad_token = 0, "[PAD]"
        for t in ("[PAD]", "<pad>", "<|pad|>", "<PAD>"):
            i = tok.token_to_id(t)
            if i is not None:
                pad_id, pad_token = i, t
                break
    # its own side of truncation too (a causal model's tokenizer keeps the end of a long text:
    # enable_truncation alone resets it to the right, and a probe's run trained on the starts)
    cut = tok.truncation or {}
    tok.enable_truncation(max_length=seq_len, direction=cut.get("direction", "right"))
    tok.enable_padding(length=seq_len, pad_id=pad_id, pad_token=pad_token,
                       direction=pad.get("direction", "right"))
    return tok
