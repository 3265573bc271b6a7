"""A fleet run's ``--out`` folder: what a server or a client may write there, and which of the
two left the files it holds (checked before anything runs)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import UserError

__all__ = ["FLEET_FILES", "check_out", "check_server_out", "earlier_steps", "fleet_role"]


def check_out(out: Path) -> None:
    """Refuse an ``--out`` a fleet run must not write into: a bundle folder (its params.npz would
    be replaced and the bundle fail its checksum), a ``train`` run's folder (its weights and
    metrics replaced), a path that is or lies under a file. Checked before anything runs.

    Raises:
        UserError: any of those.
    """
    from ..run_folder import check_out_path, not_run_files

    check_out_path(out, "a fleet run")
    if (out / "run.json").exists():
        raise UserError(f"--out '{out}' holds a `train` run (run.json): a fleet run there would "
                        "replace its weights and metrics; pass another --out")
    for parent in Path(os.path.abspath(out)).parents:  # (session 42 probe: a server's --out inside another fleet
        # run's folder was accepted, and the outer run could then be neither resumed nor
        # overwritten: its folder held "other files")
        if (parent / ".fleet-lock").is_file() or fleet_role(parent) == "server" or all(
                (parent / f).is_file() for f in ("run.json", "metrics.jsonl")):  # (a fleet
            # run's lock or aggregate, a train run's files: not any folder with a checkpoints/
            # or a summary.json, a review)
            raise UserError(f"--out '{out}' lies inside the run in '{parent}', whose folder "
                            "holds that run's files only; pass an --out outside it")
    others = not_run_files(out, FLEET_FILES)
    if others:  # a fleet run writes among its own files only (the user's are never replaced)
        listed = f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
        if fleet_role(out) is not None:
            raise UserError(f"--out '{out}' holds a fleet run and other files ({listed}); a "
                            "fleet run writes among its own files only: move those out to go "
                            "on with it, or pass another --out")
        raise UserError(f"--out '{out}' is a folder holding other files ({listed}) and no "
                        "fleet run; pass a new or empty folder as --out")


# what a fleet server or client writes in its --out (a client: a training run's files), and
# `report`'s default PNG of it (was refused as "other files" by the next start into the folder)
FLEET_FILES = ("params.npz", "summary.json", "metrics.jsonl", "checkpoints", ".fleet-lock",
               "rounds.jsonl", "report.png")


def fleet_role(out: Path) -> str | None:
    """Which fleet run left its files in ``out``: "server" (an aggregate: summary.json naming
    the clients it waited for), "client" (checkpoints or a client's summary), "other" (a
    summary.json that neither writes), or None."""
    summary = out / "summary.json"
    if summary.is_file() and not summary.is_symlink():
        try:
            meta = json.loads(summary.read_text()[:1 << 20])
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and "min_clients" in meta:
            return "server"
        if isinstance(meta, dict) and "median_step_s" in meta:  # a training run's summary
            return "client"
        return "other"
    if (out / "checkpoints").is_dir():
        return "client"
    if (out / "params.npz").is_file() and (out / ".fleet-lock").is_file() \
            and not (out / "metrics.jsonl").exists():
        return "server"  # stopped after a round: the round's aggregate, its summary not yet
    return None


def check_server_out(out: Path, resume: bool, overwrite: bool, init_from: bool = False) -> bool:
    """Whether the server starts from the aggregate in ``out`` (``--resume``).

    Raises:
        UserError: ``out`` holds a client's files, or an earlier aggregate without ``--resume``
            or ``--overwrite`` (running the same command again replaced it without a word), or
            ``--resume`` with no aggregate to resume.
    """
    role = fleet_role(out)
    has = (out / "params.npz").is_file() or (out / "params.npz").is_symlink()
    if role == "other" or (has and role != "server"):
        raise UserError(f"--out '{out}' holds a params.npz or summary.json that no fleet server "
                        "wrote (no aggregate's summary beside it); nothing there is replaced: "
                        "pass a new or empty folder as --out")
    if role == "client":
        raise UserError(f"--out '{out}' holds a fleet client's files; the server would replace "
                        "its weights: pass another --out")
    if resume:
        if not (role == "server" and has):
            raise UserError(f"--resume: '{out}' holds no aggregate of an earlier fleet run; "
                            "drop --resume to start from "
                            + ("the --init-from weights" if init_from else "the bundle's weights"))
        return True
    if has and not overwrite:
        raise UserError(f"--out '{out}' holds the aggregate of an earlier fleet run "
                        "(params.npz); pass --resume to continue from it, --overwrite to start "
                        "afresh, or another --out")
    return False


def earlier_steps(out: Path) -> int:
    """The steps a client's earlier run in ``out`` trained (its newest checkpoint's or its
    log's last step, whichever is later; 0 for none): a client started again into its folder
    counts on from there (session 29 probe: it counted from 1 again, its metrics.jsonl held
    steps 1..527 then 1..600 and its checkpoint of step 527 was pruned as the oldest)."""
    from ..checkpoint import newest_checkpoint
    from ..run_log import last_logged_step

    newest = newest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    return max(newest[0] if newest else 0, last_logged_step(out / "metrics.jsonl"))


def unsent_steps(out: Path) -> str:
    """Where a client's log runs past its last round's weights (it was stopped in a round): the
    steps of that round, which its server never received (a session 44 probe: counted without
    a word)."""
    import json

    from ..run_log import last_logged_step

    try:
        done = json.loads((out / "summary.json").read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return ""
    logged = last_logged_step(out / "metrics.jsonl")
    if not isinstance(done, int) or logged <= done:
        return ""
    return (f" (steps {done + 1}-{logged} were of a round it did not finish: the fleet never "
            "received them)")


def drop_lock_only(out: Path, fresh: bool) -> None:
    """Remove ``out`` where this process made it (``fresh``) and it holds only the lock: a
    fleet process that ended before doing anything leaves no folder behind (probes of sessions
    26 and 27: a client that never trained, a server whose clients never came)."""
    with contextlib.suppress(OSError):
        if fresh and [p.name for p in out.iterdir()] == [".fleet-lock"]:
            (out / ".fleet-lock").unlink()
            out.rmdir()
