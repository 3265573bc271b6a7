"""A fleet server's round history in bounded memory and a bounded ``summary.json``.

Every round's evaluation (and its training figures) is appended to ``OUT/rounds.jsonl`` as it
happens; ``summary.json`` lists the last ``KEPT`` of them and, per evaluation data, what the
run's last line compares (the first and last accuracy). Until session 30 the summary held the
whole history, rewritten after every round: past ~3,500 rounds it outgrew the 1 MiB a resume
reads (the resume was then refused as "a summary.json that no fleet server wrote"), and the
server's memory and each round's write grew with every round up to ``--rounds``' 10^6.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

__all__ = ["KEPT", "ROUNDS_FILE", "RoundHistory", "earlier_evaluations", "earlier_rounds"]

ROUNDS_FILE = "rounds.jsonl"
KEPT = 100  # the rounds summary.json lists (all of them are in rounds.jsonl)


def _number(v) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def earlier_evaluations(earlier: dict | None) -> dict[str, dict]:
    """Per evaluation data (a path, or the clients' own data), what the earlier rounds of a
    resumed run measured: ``first`` and ``last`` accuracy, ``accuracies`` (how many rounds had
    one), ``own_data`` (some were clients' training rows). A summary written before session 30
    has none of it: it is counted from its history, which then held every round."""
    earlier = earlier or {}
    kept = earlier.get("evaluations")
    out: dict[str, dict] = {}
    if isinstance(kept, dict):
        for on, e in kept.items():
            if isinstance(on, str) and isinstance(e, dict):
                n = e.get("accuracies")
                first, last = _number(e.get("first")), _number(e.get("last"))
                ok = isinstance(n, int) and not isinstance(n, bool) and n >= 0 and \
                    first is not None and last is not None  # (a damaged one: none counted)
                out[on] = {"first": first, "last": last, "accuracies": n if ok else 0,
                           "own_data": e.get("own_data") is True}
        return out
    for h in earlier.get("history", []):
        _count(out, h)
    return out


def _count(out: dict[str, dict], h: dict) -> None:
    if h.get("accuracy") is None and h.get("loss") is None:
        return
    on = str(h.get("evaluated_on") or "unrecorded data")
    e = out.setdefault(on, {"first": None, "last": None, "accuracies": 0, "own_data": False})
    acc = _number(h.get("accuracy"))
    if acc is not None:
        e["first"] = acc if e["first"] is None else e["first"]
        e["last"] = acc
        e["accuracies"] += 1
    e["own_data"] = e["own_data"] or "training rows" in str(h.get("where", ""))


class RoundHistory:
    """The rounds' entries of one server run (``add``), kept in ``out / ROUNDS_FILE`` and, the
    last ``KEPT``, in memory for ``summary.json`` (``fields``). ``earlier``: the summary of the
    run this one resumes (None: a fresh run, whose file starts empty); the file is cut back to
    its ``rounds_done`` (a round logged before a kill, and trained again, is in it once)."""

    def __init__(self, out: Path, earlier: dict | None, way_out=None,
                 resumed: bool = False) -> None:
        self.path = Path(out) / ROUNDS_FILE
        self.way_out = way_out
        self.earlier, self.resumed = earlier, resumed or earlier is not None
        hist = list((earlier or {}).get("history", []))
        self.recent: collections.deque = collections.deque(hist, maxlen=KEPT)
        self.evaluations = earlier_evaluations(earlier)
        self._log = None
        # a run of an earlier version kept every round in its summary only: they open the file
        legacy = earlier is not None and "history_file" not in earlier
        self._pending = hist if legacy and not self.path.exists() else []

    def add(self, entry: dict) -> None:
        self.recent.append(entry)
        _count(self.evaluations, entry)
        if self._log is None and not entry.get("round"):
            self._pending.append(entry)  # round 0: written with round 1 (a server that ends
            return  # before it, no client having come, leaves no folder: session 27 probe)
        if self._log is None:
            from ..run_log import Metrics

            done = (self.earlier or {}).get("rounds_done")
            self._log = Metrics(self.path, resumed_at=done if self.earlier is not None else None,
                                fresh=not self.resumed, key="round", way_out=self.way_out)
            for h in self._pending:
                self._log.write("round", **h)
            self._pending = []
        self._log.write("round", **entry)

    def fields(self) -> dict:
        return {"history": list(self.recent), "history_file": ROUNDS_FILE,
                "evaluations": self.evaluations}

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def earlier_rounds(out: Path) -> dict | None:
    """The summary a resumed server left after its last round (None: none, or one that says
    nothing of its rounds: a run of an earlier version, stopped before its end). An earlier
    version's finished run recorded no ``rounds_done``: its history's last round is it (session
    50 probe: such a run of 2 rounds was resumed as "not recorded", ran 2 more numbered 1-2
    and its history was rewritten)."""
    from ..run_folder import json_object

    earlier = json_object(out / "summary.json")
    hist = earlier.get("history")
    earlier["history"] = [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []
    done = earlier.get("rounds_done")
    if "rounds_done" not in earlier:
        done = max((h["round"] for h in earlier["history"] if isinstance(h.get("round"), int)
                    and not isinstance(h.get("round"), bool)), default=None)
        earlier["rounds_done"] = done
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        return None
    for key in ("trained_rounds", "seconds"):
        v = earlier.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e12:
            earlier[key] = 0
    return earlier
