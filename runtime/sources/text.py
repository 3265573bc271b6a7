"""Text files (CSV, TSV, JSONL) as a data source, tokenised per micro-batch."""

from __future__ import annotations

import array
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from contract.errors import UserError
from contract.manifest import LossSpec, TensorSpec, TextSpec

from .common import (
    CHARS_PER_TOKEN,
    MAX_RECORD_BYTES,
    TEXT_SUFFIXES,
    Arrays,
    Problems,
    Source,
    _File,
    _nothing_usable,
    _pread_exact,
)
from .labels import _label_text, _Labels
from .text_hints import (
    _format_hint,
    _is_gzip,
    _refuse_utf16,
    _unicode,
    check_index_room,
    label_misfit,
    misfit_way,
    swallows,
    utf8_way,
)
from .tsv import TsvReader, record_row


# ---------------------------------------------------------------------------- text
def _split_lines(raw: bytes, state: dict) -> Iterator[str]:
    """Lines of ``raw`` split at b"\\n" only (the index pass and ``take`` split identically)."""
    for line in io.BytesIO(raw):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            state["bad_utf8"] = True
            yield line.decode("utf-8", "replace")


QUOTE_SWALLOWS = 10  # lines an unclosed quote may take with it to the end as one bad row


def _lines_at(first: int, last: int) -> str:
    """Where a record is: its line, or the lines it spans (quoted newlines, or a stray quote
    that took the lines after it into one record: each was counted as one bad row at its
    first line, the rest unsaid)."""
    return f"line {first}" if last <= first else f"lines {first}-{last}"

class _CsvLimit:
    """csv's field size limit raised to the record limit while we parse (restored after)."""

    def __enter__(self) -> None:
        self.old = csv.field_size_limit(MAX_RECORD_BYTES + 1)

    def __exit__(self, *exc: object) -> None:
        csv.field_size_limit(self.old)


class TextSource(Source):
    """CSV / TSV / JSONL rows, tokenised to the bundle's ``TextSpec``.

    Held per row: the record's byte offset (int64), its length (int32) and its label (int32,
    float32 for regression). At open time a forked child reads every record, cuts its text to
    ``CHARS_PER_TOKEN * seq_len`` characters and tokenises it (truncated and padded to
    ``seq_len``) into a temporary file (``tokens.py``); ``take`` reads the token rows with
    ``os.pread``. The tokenizer never loads in the training process.
    """

    def __init__(self, path: str | Path, text: TextSpec, inputs: list[TensorSpec], loss: LossSpec,
                 tokenizer: str | Path | object, *, text_column: str = "text",
                 label_column: str = "label", class_names: list[str] | None = None) -> None:
        self.path = Path(path)
        self.name = self.path.name
        suffix = self.path.suffix.lower()
        if suffix not in TEXT_SUFFIXES:
            raise UserError(f"{self.path}: text data must be .csv, .tsv or .jsonl (by suffix)")
        self.kind = "jsonl" if TEXT_SUFFIXES[suffix] is None else suffix[1:]
        self.delimiter = TEXT_SUFFIXES[suffix]
        if text_column == label_column:
            raise UserError(f"--text-column and --label-column are both '{text_column}': the "
                            "model would read its answer; name the column with the text and "
                            "the one with the label")
        self.text_column, self.label_column = text_column, label_column
        self.spec = text
        self.seq_len = int(text.seq_len)
        self.outputs = _text_outputs(text, inputs)
        self.label_dtype = np.dtype(loss.labels.dtype)
        regression = loss.kind != "cross_entropy"
        if regression and [d for d in loss.labels.shape[1:]] not in ([], [1]):
            raise UserError(f"{self.path}: a text file gives one target per row; the model's "
                            f"labels have shape {loss.labels.shape}")
        self.label_shape = list(loss.labels.shape[1:])
        self.problems = Problems(self.name)
        if isinstance(tokenizer, str | Path) and not Path(tokenizer).is_file():
            raise UserError(f"tokenizer file '{tokenizer}' not found; re-export the bundle")
        self._file = _File(self.path)
        _refuse_utf16(self._file.fd, self.path)
        self._col = 0  # text column index (csv/tsv)
        self._first_keys: list[str] | None = None  # (jsonl) the first object's fields: advice
        labels = _Labels(str(self.path), f"{'column' if self.kind != 'jsonl' else 'field'} "
                         f"'{label_column}'", class_names, loss.num_classes, regression,
                         unit=loss.kind == "bce", problems=self.problems)
        starts, lengths, rows = self._index(labels)
        # views of the arrays the index pass filled (no copy: that would double the peak)
        self.offsets = np.frombuffer(starts, np.int64)
        self.lengths = np.frombuffer(lengths, np.int32)
        if not self.offsets.size:
            cols = (f"--text-column '{text_column}' / --label-column '{label_column}'")
            hint = (f"save the file as UTF-8 ({utf8_way(self.path, self._wide)})"
                    if "not valid UTF-8" in self.problems.counts else f"check the file and {cols}")
            if self._first_keys is not None and ("missing text" in self.problems.counts
                                                 or "missing label" in self.problems.counts):
                hint += f" (its first object's fields: {', '.join(self._first_keys)}"
                dotted = [c for c in (text_column, label_column) if "." in c]
                hint += (f"; a field inside another, as '{dotted[0]}' names, is not read: "
                         "flatten the file first, e.g. with jq)" if dotted else ")")
            elif label_misfit(self.problems.counts, 0, loss.kind, label_column) is not None:
                hint = misfit_way(loss.kind, label_column)
            elif "unknown label" in self.problems.counts and labels.given is not None:
                shown = ", ".join(labels.given_names[:8])
                hint = (f"its labels must be the model's classes ({shown}"
                        f"{', ...' if len(labels.given_names) > 8 else ''}), written as the "
                        f"bundle's --classes or the run's training data name them; check the "
                        f"file and {cols}")
            elif self.kind == "jsonl" and 2 * sum(self.problems.counts.get(k, 0) for k in (
                    "not valid JSON", "not a JSON object")) >= sum(self.problems.counts.values()):
                # (most lines: an array or pretty-printed JSON; session 46 probe: 1 line of 101
                # was enough, and the hint for a wrong --text-column was lost)
                hint = (f"a .jsonl file holds one JSON object per line; a JSON array or "
                        f"pretty-printed JSON is not one (e.g. jq -c '.[]' {self.path.name} > "
                        f"{self.path.stem}-lines.jsonl)")
            raise _nothing_usable(str(self.path), self.problems, rows, hint)
        ids = np.frombuffer(labels.ids, np.float32) if loss.kind == "bce" else None
        misfit = label_misfit(self.problems.counts, int(self.offsets.size), loss.kind,
                              label_column, ids is not None and bool(ids.size)
                              and float(ids.min()) == float(ids.max()))
        if misfit is not None:
            raise UserError(f"{self.path}: {misfit}")
        if "not valid UTF-8" in self.problems.counts:  # part of the file: its rows are lost
            self.problems.hints.append(f"to keep the rows that are not UTF-8, save the file "
                                       f"as UTF-8 ({utf8_way(self.path, self._wide)})")
        try:
            self.labels, self.class_names = labels.finish()
        except UserError as exc:  # rows left out as not UTF-8 may hold the missing classes
            if "not valid UTF-8" not in self.problems.counts:
                raise
            raise UserError(f"{exc} ({self.problems.counts['not valid UTF-8']:,} rows that are "
                            f"not valid UTF-8 were left out: save the file as UTF-8, "
                            f"{utf8_way(self.path, self._wide)})") from None
        self.max_record = int(self.lengths.max())
        from .tokens import TokenCache

        self.tokens = TokenCache(len(self), self.seq_len, self.outputs, tokenizer, self.text,
                                 CHARS_PER_TOKEN * self.seq_len, self.problems)

    # ------------------------------------------------------------------ index pass
    def _index(self, labels: _Labels) -> tuple[array.array, array.array, int]:
        starts, lengths = array.array("q"), array.array("i")
        self._wide = False  # a row read as UTF-8 holds more than ASCII (utf8_way)
        try:
            f = open(self._file.path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"cannot read data file {self.path}: {exc.strerror}") from None
        with f:
            if self.kind == "jsonl":
                rows = self._index_jsonl(f, labels, starts, lengths)
            else:
                with _CsvLimit():
                    rows = self._index_csv(f, labels, starts, lengths)
        return starts, lengths, rows


    def _lines(self, f) -> Iterator[tuple[bytes | None, int]]:
        """The file's lines as (bytes, size), a line longer than ``MAX_RECORD_BYTES`` as
        (None, size): read in bounded pieces and skipped, never held whole (one 300 MB line
        was read into memory and passed the budget); ``self._odd_quotes`` then says whether it
        held an odd number of '"' (it opened or closed a quoted CSV field). A first line that
        long holding a CR is a file with old-Mac line ends: one error line, as the CSV reader
        gives for it."""
        first = True
        while True:
            raw = f.readline(MAX_RECORD_BYTES + 2)
            if not raw:
                return
            if len(raw) <= MAX_RECORD_BYTES or raw.endswith(b"\n"):
                first = False
                yield raw, len(raw)
                continue
            if first and b"\r" in raw:
                raise UserError(f"{self.path}: its lines end in a lone CR (old Mac line ends); "
                                "save it with LF or CRLF line ends")
            first, size, quotes = False, len(raw), raw.count(b'"')
            while True:
                piece = f.readline(1 << 20)
                size += len(piece)
                quotes += piece.count(b'"')
                if not piece or piece.endswith(b"\n"):
                    break
            self._odd_quotes = quotes % 2 == 1
            yield None, size

    def _keep(self, labels: _Labels, label: str, where: str, start: int, length: int,
              starts: array.array, lengths: array.array) -> None:
        reason = labels.add(label)
        if reason is not None:
            self.problems.bad(reason, f"{where}: {label[:40]!r}" if reason == "unknown label"
                              else where)
            return
        starts.append(start)
        lengths.append(length)
        if not len(starts) & 0xFFFF:  # (every 65,536 rows: the index grows with the file)
            check_index_room(self.path, len(starts))

    def _index_jsonl(self, f, labels: _Labels, starts: array.array,
                     lengths: array.array) -> int:
        pos, rows, tcol, lcol = 0, 0, self.text_column, self.label_column
        for lineno, (raw, size) in enumerate(self._lines(f), 1):
            start, pos = pos, pos + size
            if raw is None or size > MAX_RECORD_BYTES:
                rows += 1
                self.problems.bad(f"record longer than {MAX_RECORD_BYTES >> 20} MiB",
                                  f"line {lineno}")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                start += 3
                raw = raw[3:]
            if not raw.strip():
                self.problems.ignore("blank line", f"line {lineno}")
                continue
            rows += 1
            where = f"line {lineno}"
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                self.problems.bad("not valid UTF-8", where)
                continue
            except (json.JSONDecodeError, RecursionError, ValueError):
                self.problems.bad("not valid JSON", where)
                continue
            self._wide = self._wide or not raw.isascii()
            if not isinstance(obj, dict):
                self.problems.bad("not a JSON object", where)
                continue
            if self._first_keys is None:
                self._first_keys = list(obj)[:12]
            text = obj.get(tcol)
            if text is None:
                self.problems.bad("missing text", where)
                continue
            if not isinstance(text, str):
                self.problems.bad("text is not a string", where)
                continue
            if not text.strip():
                self.problems.bad("empty text", where)
                continue
            label = _label_text(obj.get(lcol))
            if obj.get(lcol) is None or label == "":
                self.problems.bad("missing label", where)
                continue
            if label is None:
                self.problems.bad("label is not a string or number", where)
                continue
            if not (_unicode(text) and _unicode(label)):  # "\udc80": JSON allows it; the
                self.problems.bad("a lone surrogate escape (not Unicode text)", where)
                continue  # tokenizer refuses it and failed the whole run
            self._keep(labels, label, where, start, len(raw), starts, lengths)
        return rows

    def _index_csv(self, f, labels: _Labels, starts: array.array, lengths: array.array) -> int:
        state = {"pos": 0, "line": 0, "bad_utf8": False, "long": False}

        def lines() -> Iterator[str]:
            for raw, size in self._lines(f):
                state["line"] += 1
                state["pos"] += size
                if raw is None:  # skipped unread: the record it is part of is refused below;
                    state["long"] = True  # a quote it opened or closed still does so
                    yield '"\n' if self._odd_quotes else "\n"
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    state["bad_utf8"] = True
                    line = raw.decode("utf-8", "replace")
                else:
                    if not self._wide and not raw.removeprefix(b"\xef\xbb\xbf").isascii():
                        self._wide = True
                # a byte order mark goes before the parser reads the header: seen by it, a
                # quoted first name ('\ufeff"text"', as PowerShell writes) was not one
                yield line[1:] if state["line"] == 1 and line.startswith("\ufeff") else line

        tsv = TsvReader(lines(), state, self.problems.note) if self.kind == "tsv" else None
        reader = tsv or csv.reader(lines(), delimiter=self.delimiter, strict=True)
        what = "CSV" if self.kind == "csv" else "TSV"
        if _is_gzip(self.path):  # first: its binary header may read as a broken row instead
            raise UserError(f"{self.path} is gzip-compressed: decompress it first (gunzip), "
                            "then pass the text file")  # (a lone CR in a gzip's header time)
        try:
            header = next(reader)
            while not any(h.strip() for h in header) or (  # blank lines before the header,
                    len(header) <= 2 and header[0].strip().lower().startswith("sep=")):
                header = next(reader)  # or Excel's "sep=," line
        except StopIteration:
            if state["long"]:  # skipped unread: not empty (a 13 MB header was called so)
                raise UserError(f"{self.path}: its header row is longer than "
                                f"{MAX_RECORD_BYTES >> 20} MiB, which no {what} header of "
                                f"columns '{self.text_column}' and '{self.label_column}' needs; "
                                "check that it is the right file") from None
            raise UserError(f"{self.path} is empty; a {what} file needs a header row naming its "
                            f"columns ('{self.text_column}', '{self.label_column}') and then "
                            "one row per example") from None
        except csv.Error as exc:
            cr = " (its lines end in a lone CR: save it with LF or CRLF line ends)" \
                if "new-line character" in str(exc) else ""
            raise UserError(f"{self.path}: the header row is not valid {what} ({exc}); the "
                            f"first row must name the columns{cr}") from None
        header = [h.strip() for h in header]
        cols = {}
        for i, h in enumerate(header):
            cols.setdefault(h, i)
        for flag, col in (("--text-column", self.text_column),
                          ("--label-column", self.label_column)):
            if col not in cols:
                shown = ", ".join(repr(h) if len(h) <= 40 else repr(h[:40]) + "..."
                                  for h in header[:12]) + (", ..." if len(header) > 12 else "")
                near = [h for h in header if h.lower() == col.lower()]
                mean = f" (did you mean {flag} '{near[0]}'?)" if near else ""
                hint = _format_hint(self.path, header)
                way = (f"pass the right name with {flag}{mean}{hint}" if set(header) - {
                    self.text_column, ""} else "it has no column besides the text, and a "
                    "labelled row per example is what is trained on and scored: add a column of "
                    "labels")  # (session 49 probe: sent to --label-column, refused again)
                raise MissingColumn(f"{self.path} has no column '{col}' (its header: {shown}); "
                                    f"{way}",
                                    f"{self.path} has no column '{col}' (its header: {shown})",
                                    bool(hint) or not way.startswith("pass"))
            if header.count(col) > 1:
                raise UserError(f"{self.path} has {header.count(col)} columns named '{col}'; "
                                "rename all but one in the header")
        self._col = ti = cols[self.text_column]
        li = cols[self.label_column]
        ncols = len(header)
        named = ncols  # a header ending in a comma (`text,label,`) names no last column: rows
        while named > 1 and not header[named - 1]:  # without that empty cell are whole (a
            named -= 1  # session 43 probe: 300 of 300 rows "wrong number of columns")
        if tsv is not None:
            tsv.ncols = ncols
        rows = 0
        start, line = state["pos"], state["line"] + 1
        while True:
            state["bad_utf8"] = state["long"] = False
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                rows += 1
                msg, span = str(exc), state["line"] - line + 1
                if (span > 1 and "field larger" in msg) or span > QUOTE_SWALLOWS:
                    # a quote that never closes swallows every line after it (an outside probe:
                    # 979 of 1,000 rows went as "1 bad row"), and past the field limit the
                    # reader goes on inside the quote (a 1 MiB cell: 5,616 "bad rows", a
                    # class made of a cell's leftovers): never trained on
                    raise UserError(
                        f"{self.path}: line {line} opens a quoted field that " + (
                            f"runs past {MAX_RECORD_BYTES >> 20} MiB ({span:,} lines), longer "
                            "than any training text: shorten that text, or close its quote"
                            if "field larger" in msg else
                            f"{'never closes' if 'end of data' in msg else 'ends in a stray quote'}"
                            f": the {span:,} lines from there would be one row's text; close or "
                            "remove that quote")
                        + f' (a {what} field that starts with " is quoted; a literal one is '
                        'written "")') from None
                reason = ("unterminated quoted field" if "end of data" in msg
                          else f"record longer than {MAX_RECORD_BYTES >> 20} MiB"
                          if "field larger than field limit" in msg
                          else f"unparsable {what} record")
                self.problems.bad(reason, _lines_at(line, state["line"]))
                start, line = state["pos"], state["line"] + 1
                continue
            end = state["pos"]
            where = _lines_at(line, state["line"])
            if state["line"] > line and tsv is None and swallows(
                    row, ncols, li, labels.seen if labels.given is None else labels.given,
                    self.delimiter):
                self.problems.note("a quoted field holds lines that read as whole rows (a stray "
                                   "quote? a field that starts with \" is quoted)", where)
            rec_start, start, line = start, end, state["line"] + 1
            if state["long"] or end - rec_start > MAX_RECORD_BYTES:
                rows += 1
                self.problems.bad(f"record longer than {MAX_RECORD_BYTES >> 20} MiB", where)
                continue
            if not row or (len(row) == 1 and not row[0].strip() and ncols > 1):
                self.problems.ignore("blank line", where)
                continue
            rows += 1
            if state["bad_utf8"]:
                self.problems.bad("not valid UTF-8", where)
                continue
            if len(row) != ncols and not named <= len(row) < ncols:
                self.problems.bad("wrong number of columns", f"{where}: {len(row)} of {ncols}")
                continue
            if [c.strip().lstrip("\ufeff") for c in row] == header[:len(row)]:  # `cat a.csv b.csv`
                self.problems.bad("the header row repeated (files joined?)", where)
                continue
            if not row[ti].strip():
                self.problems.bad("empty text", where)
                continue
            label = row[li].strip()
            if not label:
                self.problems.bad("missing label", where)
                continue
            self._keep(labels, label, where, rec_start, end - rec_start, starts, lengths)
        return rows

    # ------------------------------------------------------------------ reading rows
    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def text(self, i: int) -> str:
        """The text of row ``i`` (read from the file)."""
        raw = _pread_exact(self._file.fd, int(self.lengths[i]), int(self.offsets[i]),
                           str(self.path))
        if self.kind == "jsonl":
            obj = json.loads(raw)
            return obj[self.text_column]
        with _CsvLimit():
            if self.kind == "tsv":
                row = record_row(list(_split_lines(raw, {})))
            else:
                row = next(csv.reader(_split_lines(raw, {}), delimiter=self.delimiter))
        return row[self._col]

    def take(self, idx: np.ndarray) -> tuple[Arrays, np.ndarray]:
        idx = self._rows(idx)
        n = idx.shape[0]
        out = self.tokens.rows(idx)  # tokenised once, at open time, by a child process
        y = self.labels[idx].astype(self.label_dtype)
        if self.label_shape == [1]:
            y = y.reshape(n, 1)
        return out, y

    def take_labels(self, idx: np.ndarray) -> np.ndarray:
        idx = self._rows(idx)
        y = self.labels[idx].astype(self.label_dtype)
        return y.reshape(idx.shape[0], 1) if self.label_shape == [1] else y

    def bytes_per_sample(self) -> int:
        # the stored row and its cast to the input dtype, labels (+ cast), index
        return self.tokens.bytes_per_row() + 2 * self.label_dtype.itemsize + 8

    def bytes_fixed(self) -> int:
        return 4096

    def close(self) -> None:
        self._file.close()
        self.tokens.close()


def _text_outputs(text: TextSpec, inputs: list[TensorSpec]) -> dict[str, tuple[str, np.dtype]]:
    """Model input name -> (Encoding attribute, dtype), checked against the input specs."""
    by_name = {s.name: s for s in inputs}
    want = {text.ids_input: "ids"}
    if text.mask_input is not None:
        want[text.mask_input] = "attention_mask"
    if text.type_ids_input is not None:
        want[text.type_ids_input] = "type_ids"
    extra = [s.name for s in inputs if s.name not in want]
    if extra:
        raise UserError(f"the model also needs input(s) {', '.join(extra)}, which text data does "
                        "not give; use an .npz with one array per input")
    out = {}
    for name, attr in want.items():
        spec = by_name.get(name)
        if spec is None:
            raise UserError(f"the bundle's text spec names input '{name}', which the model does "
                            "not have; re-export the bundle")
        dt = np.dtype(spec.dtype)
        if len(spec.shape) != 2 or dt.kind not in "iu" or (
                isinstance(spec.shape[1], int) and spec.shape[1] != text.seq_len):
            raise UserError(f"model input '{name}' is {spec.dtype} {spec.shape}; text data gives "
                            f"integer tokens [N, {text.seq_len}]; re-export the bundle")
        out[name] = (attr, dt)
    return out


def open_text(path: str | Path, text: TextSpec, inputs: list[TensorSpec], loss: LossSpec,
              tokenizer: str | Path | object, *, text_column: str = "text",
              label_column: str = "label", class_names: list[str] | None = None) -> TextSource:
    """A CSV/TSV/JSONL source (see :class:`TextSource`).

    Raises:
        UserError: missing file or column, nothing usable, a label count that does not fit.
    """
    return TextSource(path, text, inputs, loss, tokenizer, text_column=text_column,
                      label_column=label_column, class_names=class_names)


class MissingColumn(UserError):
    """A CSV/TSV header without the asked-for column: ``what`` says so without the way out
    (which ``--val`` words otherwise), ``hinted`` where the file's format is the likely fix."""

    def __init__(self, message: str, what: str, hinted: bool) -> None:
        super().__init__(message)
        self.what, self.hinted = what, hinted
