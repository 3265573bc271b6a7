"""Label maps of the text and image sources: ids by first sight during an index pass, the
stable order at the end, or ids from the class names a bundle or run gives; and the hints for
labels that are almost a class (another case, a typo, one number written two ways)."""

from __future__ import annotations

import array
import math
import re
import shlex

import numpy as np

from contract.errors import UserError

from .common import ABSURD, MAX_LABELS, SQUARE_SAFE, Problems
from .text_hints import shown_label

_INT = re.compile(r"^[+-]?\d{1,18}$")
_WHOLE_FLOAT = re.compile(r"[+-]?\d{1,18}\.0*", re.ASCII)  # 1.0, 2., -3.00


def _whole(raw: str) -> str:
    """'1.0' -> '1', '-3.00' -> '-3' (by the text: no float rounding of long numbers)."""
    return str(int(raw.split(".", 1)[0]))


def _one_spelling(names: list[str]) -> str:
    """Labels that differ only in case ('Pos' and 'pos'; outer spaces are dropped as a label
    is read), named: each is a class of its own, which is why there are too many (session 46
    probe: no word of it)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.casefold(), []).append(n)
    twins = [g for g in groups.values() if len(g) > 1]
    numbers = [n for n in names if _INT.match(n)]
    words = [n for n in names if not _INT.match(n)]
    said = []
    if numbers and words:  # (session 48 probe: 0/1 on some rows, neg/pos on others, was
        # told to name 4 classes at export)
        said.append(f"the labels mix numbers ({', '.join(map(shown_label, numbers[:3]))}) and "
                    f"names ({', '.join(map(shown_label, words[:3]))}), each a class of its "
                    "own")
    if twins:
        shown = "; ".join(" and ".join(shown_label(n) for n in g[:3]) for g in twins[:3])
        said.append(f"{shown} differ only in case, and labels are compared exactly")
    return f"; {'; '.join(said)}: write each class one way" if said else ""


class _Labels:
    """Builds the label map during an index pass: provisional ids by first sight, remapped to
    the stable order in :meth:`finish`; or ids from a given ``class_names`` list."""

    def __init__(self, where: str, column: str, class_names: list[str] | None,
                 num_classes: int | None, regression: bool, unit: bool = False,
                 problems: Problems | None = None) -> None:
        self.where, self.column, self.problems = where, column, problems
        self.unit = unit  # targets of a binary cross-entropy: in [0, 1]
        self.num_classes, self.regression = num_classes, regression
        self.given: dict[str, int] | None = None
        if class_names is not None and not regression:
            if num_classes is not None and len(class_names) != num_classes:
                raise UserError(f"{len(class_names)} class names were given for a "
                                f"{num_classes}-class model; the label map must have exactly "
                                f"{num_classes} names")
            self.given = {str(c): i for i, c in enumerate(class_names)}
            self.given_whole = {_whole(c): i for c, i in self.given.items()
                                if _WHOLE_FLOAT.fullmatch(c)}
            self.given_names = [str(c) for c in class_names]
        self.seen: dict[str, int] = {}
        self.skipped: list[str] = []  # class folders left out (no images): named in errors
        self.forms: dict[str, set[str]] = {}  # '1' -> {'1.0', '1.00'}: whole floats read as 1
        self._wholes: dict[str, str] = {}  # '1.0' -> '1', once parsed
        self.plain: set[str] = set()  # labels seen as written (beside forms: '1' and '1.0')
        self.unknown: dict[str, int] = {}  # labels not among the given names (a few hundred)
        self.ids = array.array("f" if regression else "i")

    def add(self, raw: str) -> str | None:
        """Append the id of label ``raw`` (already stripped); returns a bad-row reason or None."""
        if self.regression:
            if self.unit and raw.lower() in ("true", "false"):  # (JSON's true/false: yes / no)
                raw = "1" if raw.lower() == "true" else "0"
            if not _PLAIN_NUMBER.fullmatch(raw):  # float() also takes 1_000 and full-width digits
                return "label is not a number"
            v = float(raw)
            if not math.isfinite(v) or abs(v) > ABSURD:
                return "label is not finite"
            if self.unit and not 0.0 <= v <= 1.0:
                return "label is outside [0, 1] (binary cross-entropy)"
            if abs(v) > SQUARE_SAFE:
                return "label is above 1e18 (its square passes float32 in the loss: scale down)"
            self.ids.append(v)
            return None
        if self.given is not None:
            i = self.given.get(raw)
            if i is None and _WHOLE_FLOAT.fullmatch(raw):
                i = self.given.get(_whole(raw))
            if i is None and _INT.match(raw):
                i = self.given.get(str(int(raw)))
                if i is None:  # class names written 0.0, 1.0 (a float column) and data 0, 1
                    i = self.given_whole.get(str(int(raw)))
            if i is None:
                if raw in self.unknown or len(self.unknown) < 256:
                    self.unknown[raw] = self.unknown.get(raw, 0) + 1
                return "unknown label"
            self.ids.append(i)
            return None
        whole = self._wholes.get(raw)  # 1.0 is the label 1 (as in JSON), not a class of its own
        if whole is None and _WHOLE_FLOAT.fullmatch(raw):
            whole = _whole(raw)
            if len(self._wholes) < 4096:  # (a label's spellings are few; rows are many)
                self._wholes[raw] = whole
            forms = self.forms.setdefault(whole, set())
            if len(forms) < 4:  # (named in the note: a few suffice)
                forms.add(raw)
        if whole is not None:
            raw = whole
        elif self.forms:
            self.plain.add(raw)
        i = self.seen.get(raw)
        if i is None:
            if raw not in self.forms:  # (a first sight before any whole float was)
                self.plain.add(raw)
            if len(self.seen) >= max(MAX_LABELS, self.num_classes or 0):
                if self.num_classes is not None and self.num_classes >= MAX_LABELS:
                    raise UserError(f"{self.where}: {self.column} has more than "
                                    f"{self.num_classes:,} distinct labels but the model has "
                                    f"{self.num_classes:,} classes; pass the right column with "
                                    "--label-column or use data of those classes")
                raise UserError(f"{self.where}: {self.column} has more than {MAX_LABELS:,} "
                                "distinct values, so it does not hold class labels; pass the "
                                "right column with --label-column")
            i = self.seen[raw] = len(self.seen)
        self.ids.append(i)
        return None

    def declare(self, raw: str) -> None:
        """A class that exists even without rows (an empty class folder), read as ``add``
        reads it (a folder '1.0' beside '1' had made an empty class '1.0' of its own)."""
        if _WHOLE_FLOAT.fullmatch(raw):
            raw = _whole(raw)
        if self.given is None and not self.regression and raw not in self.seen:
            self.seen[raw] = len(self.seen)

    def finish(self) -> tuple[np.ndarray, list[str] | None]:
        """(label per row, class names): int32 ids, or float32 targets for regression."""
        if self.regression:
            return np.frombuffer(self.ids, np.float32), None
        ids = np.frombuffer(self.ids, np.int32)
        if self.given is not None:
            self._hint_misspelt(ids)
            return ids, list(self.given_names)
        keys = list(self.seen)
        k = self.num_classes
        if keys and all(_INT.match(s) for s in keys):
            values = [int(s) for s in keys]
            self._note_spellings(keys, values)
            if k is not None and all(0 <= v < k for v in values):
                names = [str(i) for i in range(k)]  # an integer label is its own class id
                remap = np.asarray(values, np.int32)
            else:
                uniq = sorted(set(values))
                pos = {v: i for i, v in enumerate(uniq)}
                names = [str(v) for v in uniq]
                remap = np.asarray([pos[v] for v in values], np.int32)
        else:
            names = sorted(keys)
            pos = {s: i for i, s in enumerate(names)}
            remap = np.asarray([pos[s] for s in keys], np.int32)
        if k is not None and len(names) != k:
            shown = ", ".join(shown_label(n) for n in names[:6]) + (", ..." if len(names) > 6
                                                                else "")
            if self.skipped:  # (session 43 probe: an empty class folder went unnamed here)
                shown += ("; left out, holding no PNG/JPEG files: "
                          + ", ".join(shown_label(n) for n in self.skipped[:6]))
            has = "have" if self.column.endswith("folders") else "has"
            spelt = _one_spelling(names) if len(names) > k else ""
            shown += spelt
            if len(names) > k and ids.size >= 20 and 2 * len(names) > ids.size and has == "has":
                raise UserError(f"{self.where}: {self.column} has {len(names)} distinct values "
                                f"in {ids.size} rows ({shown}), not labels of {k} classes; is "
                                "it the label column? pass the right one with --label-column")
            every = shlex.quote(",".join(names)) if len(names) <= 12 and all(
                "," not in n and n.isprintable() for n in names) else "A,B,..."
            raise UserError(f"{self.where}: {self.column} {has} {len(names)} distinct labels "
                            f"({shown}) but the model has {k} classes; use data with {k} "
                            + ("classes" if spelt else  # (one class written two ways: no
                               f"classes, or name all {k} at export (export --classes "  # list
                               "A,B,...) so that data holding some of them fits"  # helps)
                               if len(names) < k else  # (session 49 probe: "name all 2" of 3)
                               f"classes, or export the model again with all {len(names)} "
                               f"(export --classes {every}; a model of your own needs "
                               f"{len(names)} outputs, or --head {len(names)} on its features)"))
        return (remap[ids] if ids.size else ids), names


    def _hint_misspelt(self, ids: np.ndarray) -> None:
        """Unknown labels that look like a class no row holds (another case, a typo: a class
        folder `dgo` of the class `dog`) are named with it (session 39: half the data was
        skipped with only "unknown label 'dgo'" and the run trained one class)."""
        if not self.unknown or self.problems is None:
            return
        import difflib

        held = set(np.unique(ids).tolist()) if ids.size else set()
        missing = {n.lower(): n for i, n in enumerate(self.given_names) if i not in held}
        cased = {n.lower(): n for n in self.given_names}  # (another case of any class: 'RED'
        pairs = []  # on every other row of a --classes red run, a probe in session 43)
        for raw in sorted(self.unknown, key=lambda r: -self.unknown[r]):
            if raw.lower() in cased:
                pairs.append(f"{raw!r} may be {cased[raw.lower()]!r}")
                missing.pop(raw.lower(), None)
                continue
            near = [] if (len(raw) < 3 or raw.lstrip("+-").isdigit()) else (  # ('-1' is no
                difflib.get_close_matches(raw.lower(), list(missing), n=1, cutoff=0.6))  # typo
            if near:  # of '1': a review)
                pairs.append(f"{raw!r} may be {missing.pop(near[0])!r}")
        if pairs:
            shown = ", ".join(pairs[:4]) + (", ..." if len(pairs) > 4 else "")
            self.problems.hints.append(f"{shown}: labels must match the class names exactly; "
                                       "rename them to keep those rows")

    def _note_spellings(self, keys: list[str], values: list[int]) -> None:
        """Labels that are one number written in different ways (01 and 1, 007 and 7) are one
        class, the number (an integer label is its own class id): said, naming them (session
        31 probe: class folders 0 1 01 2 trained as 3 classes without a word)."""
        spellings: dict[int, list[str]] = {}
        for s, v in zip(keys, values, strict=True):  # (1.0 beside 1: a probe, session 43)
            forms = sorted(self.forms.get(s, ()))
            spellings.setdefault(v, []).extend(([s] if s in self.plain or not forms else [])
                                               + forms)
        for v, written in sorted(spellings.items()):
            if len(written) > 1 and self.problems is not None:
                self.problems.note("number(s) written in different ways and read as one class, "
                                   "the number: name them as text (e.g. c01) to keep them apart",
                                   " and ".join(sorted(written)) + f" as {v}")


def _label_text(value: object) -> str | None:
    """A JSON label as the string it names, or None when it is not a usable scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return value.strip()
    return None


# a decimal number as written in data files: 12, -0.5, 1e-3, .5, inf/nan (refused as not finite)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                           r"|[+-]?(?:inf|infinity|nan)", re.IGNORECASE | re.ASCII)
