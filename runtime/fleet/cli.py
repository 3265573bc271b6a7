"""``instant-runtime fleet server|client``: the argument parser and the handler.

Wired into ``runtime/cli.py`` with ``add_fleet_parser(sub)`` and ``handlers["fleet"] = cmd_fleet``;
``python -m runtime.fleet server|client ...`` runs the same without it. The handler prints user
errors itself (one ``error:`` line, exit 2), so it behaves the same under either entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from pathlib import Path

from contract import hold_bundle
from devices.planner import budget_mb

__all__ = ["FLWR_SUPPORTED", "MAX_SECONDS", "add_fleet_parser", "check_seconds", "cmd_fleet",
           "main", "parse_address"]

FLWR_SUPPORTED = ("1.42",)  # Flower minor versions whose server and client internals we use


def add_fleet_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``fleet`` (with ``server`` and ``client``) to an ``add_subparsers()`` object."""
    f = subparsers.add_parser(
        "fleet", help="federated training over Flower: `fleet server` and `fleet client` "
                      "(needs instant-runtime[fleet])")
    _fill(f)
    return f


def _fill(f: argparse.ArgumentParser) -> None:
    fs = f.add_subparsers(dest="fleet_cmd", required=True, metavar="{server,client}")

    s = fs.add_parser("server", help="run FedAvg rounds over Flower's gRPC server")
    s.add_argument("bundle")
    s.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    s.add_argument("--address", default="127.0.0.1:8080",
                   help="HOST:PORT to listen on (default 127.0.0.1:8080; 0.0.0.0:PORT: a fleet)")
    s.add_argument("--min-clients", type=int, default=2,
                   help="clients each round waits for and trains (Flower's min_fit_clients and "
                        "min_available_clients; default 2)")
    s.add_argument("--data", default=None,
                   help="held-out data to evaluate each aggregate on (as a client's --data; "
                        "its test split if it has one). Without it the clients evaluate on their "
                        "own held-out splits")
    s.add_argument("--text-column", default="text",
                   help="text files: the text column/field (default text)")
    s.add_argument("--label-column", default="label",
                   help="text files: the label column/field (default label)")
    s.add_argument("--out", default=None,
                   help="run folder for the aggregated weights (default BUNDLE/fleet)")
    s.add_argument("--resume", action="store_true",
                   help="start from the aggregate an earlier run left in --out")
    s.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start round 1 from trained weights of this bundle: a `train` run's or "
                        "a fleet's folder, its params.npz or a checkpoint (default: the "
                        "bundle's initial weights; a --resume goes on from its aggregate)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the aggregate an earlier run left in --out")
    s.add_argument("--wait", type=float, default=300.0,
                   help="seconds a round waits for --min-clients clients before giving up "
                        "(default 300)")
    s.add_argument("--round-timeout", type=float, default=3600.0,
                   help="seconds a client may take per round; later replies count as failures "
                        "(default 3600)")
    s.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads (evaluation; at most 4 per core)")
    s.add_argument("--verbose", action="store_true", help="show Flower's own log")

    c = fs.add_parser("client", help="train this device's data in the fleet (no torch)")
    c.add_argument("bundle")
    c.add_argument("--data", required=True,
                   help="this device's data: a built-in name, an .npz, a .csv/.tsv/.jsonl text "
                        "file or an image folder (as `train`)")
    c.add_argument("--text-column", default="text",
                   help="text files: the text column/field (default text)")
    c.add_argument("--label-column", default="label",
                   help="text files: the label column/field (default label)")
    c.add_argument("--val", default=None,
                   help="held-out data each round's evaluation reads (like --data, same labels)")
    c.add_argument("--val-split", type=float, default=None,
                   help="hold out this fraction of --data for the evaluation (seeded by --seed)")
    c.add_argument("--server", required=True, help="HOST:PORT of the fleet server")
    c.add_argument("--steps", type=int, default=10,
                   help="local optimizer steps per round (default 10)")
    c.add_argument("--batch", type=int, default=32, help="examples per local step (default 32)")
    c.add_argument("--micro-batch", type=int, default=None,
                   help="split each batch (gradient accumulation); --budget plans its own")
    c.add_argument("--budget", default=None,
                   help="whole-process memory budget (Flower and gRPC included), e.g. 256MB")
    c.add_argument("--profile", default=None, help="device profile (as in `train`)")
    c.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    c.add_argument("--weight-decay", type=float, default=None,
                   help="as train's (default 0.01 for adamw, 0 for sgd)")
    c.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="default adamw (its state starts from zero each round)")
    from ..cli import add_instant_args

    add_instant_args(c)  # --mode and the INSTANT options, as `train` has them
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--partition", default=None,
                   help="I/N: keep every N-th training example from the I-th (a shard per device)")
    c.add_argument("--out", default=None,
                   help="folder for checkpoints and the local weights (default "
                        "BUNDLE/fleet-client; one per client)")
    c.add_argument("--checkpoint-every", type=int, default=50,
                   help="write checkpoints to --out every N local steps, counted across rounds "
                        "(default 50; 0: only at the end of each round)")
    c.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop after this many consecutive non-finite losses (each is skipped; "
                        "default 5)")
    c.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to wait for the server (at start and after a lost connection; "
                        "default 60)")
    c.add_argument("--keepalive", type=float, default=30.0,
                   help="seconds between pings of a silent server: one that answers none within "
                        "20 s (its host stopped, the network dropped) is a lost connection "
                        "(default 30)")
    c.add_argument("--threads", type=int, default=0, help="intra-op threads (at most 4 per core)")
    c.add_argument("--progress", action="store_true", help="progress bar for local training")
    c.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (the default; as train takes it)")
    c.add_argument("--verbose", action="store_true", help="show Flower's own log")


def parse_address(text: str, option: str) -> str:
    """``HOST:PORT`` or ``[IPv6]:PORT``, checked before anything is loaded.

    Raises:
        UserError: anything else.
    """
    from .local import UserError

    host, sep, port = text.rpartition(":")
    bad = (f"bad {option} '{text}': expected HOST:PORT with a port from 1 to 65535, "
           "e.g. 127.0.0.1:8080")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(bad)
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise UserError(bad)
    elif ":" in host or any(ch.isspace() or ch in "/?#@" for ch in host):
        raise UserError(bad)
    return text


MAX_SECONDS = 7 * 24 * 3600  # the longest wait or timeout an option takes: a week


def check_seconds(option: str, value: float) -> float:
    """A time option (``--wait``, ``--round-timeout``, ``--connect-timeout``): a finite number
    of seconds from 1 to ``MAX_SECONDS`` (gRPC and Flower turn it into deadlines and ints: NaN
    waited for ever, inf and 1e300 overflowed).

    Raises:
        UserError: anything else, naming the option and the range.
    """
    from .local import UserError

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 1 <= value <= MAX_SECONDS:
        raise UserError(f"{option} {value!r} is invalid: expected seconds from 1 to "
                        f"{MAX_SECONDS} (a week)")
    return float(value)


def _flower(verbose: bool):
    """Import Flower (quietly, no telemetry) after checking it is installed and supported."""
    from importlib import metadata

    from .local import UserError

    try:
        version = metadata.version("flwr")
    except metadata.PackageNotFoundError:
        raise UserError("fleet training needs Flower; install it with "
                        "pip install 'instant-runtime[fleet]'") from None
    if ".".join(version.split(".")[:2]) not in FLWR_SUPPORTED:
        raise UserError(f"fleet training needs Flower {' or '.join(FLWR_SUPPORTED)}.x, found "
                        f"{version}; install it with pip install 'instant-runtime[fleet]'")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if not verbose:  # gRPC's own C-core lines ("chttp2_transport.cc:1403] ... Got goaway",
        # seen by an outside probe as a server stopped mid-round) are Flower's log too
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import logging

    import flwr  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


def _server(a) -> int:
    from .client import MAX_ROUNDS
    from .folders import check_out, check_server_out, drop_lock_only
    from .history import earlier_evaluations, earlier_rounds
    from .local import UserError, open_local
    from .server import INITIAL, run_server

    address = parse_address(a.address, "--address")
    for flag, value in (("--rounds", a.rounds), ("--min-clients", a.min_clients)):
        if value < 1:  # (named alone, with a way out: a session 43 probe)
            raise UserError(f"{flag} {value} is invalid: must be at least 1")
    if a.rounds > MAX_ROUNDS:
        raise UserError(f"--rounds {str(a.rounds)[:24]} is more than {MAX_ROUNDS:,}; pass fewer "
                        "(a later run continues with --resume)")
    wait = check_seconds("--wait", a.wait)
    round_timeout = check_seconds("--round-timeout", a.round_timeout)
    if a.resume and a.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    for flag, value, default in (("--text-column", a.text_column, "text"),
                                 ("--label-column", a.label_column, "label")):
        if a.data is None and value != default:  # (a session 43 probe: taken silently)
            raise UserError(f"{flag} was given without --data, the server's held-out file "
                            f"whose columns it names; pass --data, or leave {flag} out")
    if a.out:  # (the default, inside the bundle folder, is checked with the bundle)
        check_out(Path(a.out))
    _flower(a.verbose)
    local = open_local(a.bundle, a.data, mode="vanilla", threads=a.threads,
                       data_options={"text_column": a.text_column,
                                     "label_column": a.label_column})
    hold_bundle(local.bundle.path)  # (an export --overwrite of it is refused meanwhile)
    from ..run_folder import bundle_run, hold_folder

    out = Path(a.out) if a.out else bundle_run(local.bundle.path, "fleet")

    resume = check_server_out(out, a.resume, a.overwrite, init_from=a.init_from is not None)
    classes, init = None, a.init_from is not None and not resume
    if a.init_from is not None and resume:
        print(f"note: --init-from is not read: the fleet run in '{out}' resumes from its "
              "aggregate", flush=True)
    elif init:  # (before the lock: a refusal leaves no folder behind)
        classes = _init_from(a.init_from, local)
    fresh = not out.exists()
    lock = hold_folder(out, f"--out '{out}' is in use by another fleet process of this machine "
                       "(two would write one aggregate); wait for it to end, or pass another "
                       "--out", ".fleet-lock")  # held until the process ends
    earlier = None
    if resume:
        _same_model(out, local, f"--resume: '{out}' holds the aggregate")
        earlier = earlier_rounds(out)
        # fewer --rounds than were done is refused, as train's --steps below its step is
        # (session 43 probe: exit 0, "nothing to resume")
        if earlier is not None and earlier["rounds_done"] > a.rounds:
            raise UserError(f"--resume: the fleet run in '{out}' already did "
                            f"{earlier['rounds_done']} rounds, more than --rounds {a.rounds}; "
                            "pass a larger --rounds to continue it")
        if earlier is not None and earlier["rounds_done"] == a.rounds:
            print(f"the fleet run in '{out}' already did {earlier['rounds_done']} of "
                  f"--rounds {a.rounds}; nothing to resume: pass a larger --rounds to continue "
                  "it", flush=True)
            return 0
        local.set_trainable(local.bundle.load_params(
            out / "params.npz", way_out="start afresh with --overwrite, or pass another --out"))
        done = earlier["rounds_done"] if earlier else 0
        print(f"resuming from the aggregate in {out / 'params.npz'}"
              + (f" after round {done}, up to round {a.rounds}" if done else
                 " (its round count was not recorded: running --rounds more)"), flush=True)
    on = "the clients' own data" if not a.data else \
        str(Path(a.data).resolve()) if Path(a.data).exists() else str(a.data)
    before = set(earlier_evaluations(earlier))
    if before and before != {on}:  # (session 29 probe: 0.106 on digits -> 0.276 on mnist5k)
        print(f"note: the earlier rounds were evaluated on {', '.join(sorted(before))[:80]}, "
              f"these on {on}: their figures are not comparable (the last line compares this "
              "data's rounds only)", flush=True)
    if a.data and local.data is not None and local.data.test is None:
        print(f"note: {a.data} has no held-out split; evaluating on all of it", flush=True)
    try:
        s = run_server(local, address, a.rounds, a.min_clients, out,
                       evaluate_here=a.data is not None, wait_s=wait,
                       round_timeout=round_timeout, earlier=earlier, evaluated_on=on,
                       resumed=resume, classes=classes,
                       start="--init-from weights" if init else INITIAL)
    except BaseException:  # (no client came, or a signal before round 1: FleetInterrupted)
        drop_lock_only(out, fresh)  # no folder left behind (session 27 probe)
        raise
    from ..memory import held_lock

    held_lock(lock, False)
    os.close(lock)
    ev = s["evaluations"].get(on) or {"accuracies": 0, "own_data": False}
    what = "held-out" if a.data else "clients' held-out"
    if not a.data and ev["own_data"]:
        what = "clients' own-data"  # (some clients have no held-out split: their training rows)
    acc = (f"; {what} accuracy {ev['first']:.3f} -> {ev['last']:.3f}"
           if ev["accuracies"] > 1 else "")
    if not s["trained_rounds"]:
        print(f"error: no client finished any of the {s['rounds']} rounds, so the weights in "
              f"{s['weights']} are " + ("still the resumed aggregate; " if earlier else
                                        "the --init-from ones; " if init else
                                        "the initial ones; ")
              + (f"{s['cut_off_at_round_timeout']} client round(s) were cut off at "
                 f"--round-timeout {a.round_timeout:g} s: raise it, or lower the clients' "
                 "--steps" if s.get("cut_off_at_round_timeout") else
                 "see the clients' output (a client with another bundle or unusable data stops "
                 "with its reason) and start again"),
              file=sys.stderr, flush=True)
        return 2
    done, n = (earlier.get("rounds_done", 0) if earlier else 0), s["rounds"]
    ran = (f"{n} round" + "s" * (n != 1) if not done else f"round {n}" if n == done + 1
           else f"rounds {done + 1}-{n}")  # (session 46 probe: "4 rounds" on a resume)
    print(f"fleet run done: {ran} in {s['seconds']:.1f} s{acc}")
    print(f"aggregated weights: {s['weights']} (instant-runtime export-model {out} --out "
          "model.onnx" + ("" if out.parent == local.bundle.path else f" --bundle {a.bundle}")
          + ")", flush=True)
    return 0


def _init_from(given: str, local) -> list[str] | None:
    """``fleet server --init-from``: round 1 starts from a trained run's weights of this bundle
    (session 38: a fleet could only start from the bundle's initial weights). Returns the class
    order they were trained in (None: none recorded), which the fleet then numbers by.

    Raises:
        UserError: an unreadable --init-from, or another bundle's weights.
    """
    from ..cli import trained_source
    from ..run_files import run_class_names

    weights, _, run_dir, _ = trained_source(local.bundle, Path(given), "--init-from")
    local.set_trainable(local.bundle.load_params(
        weights, way_out="pass another --init-from (a run folder or its params.npz)"))
    print(f"round 1 starts from the weights in {weights} (--init-from)", flush=True)
    return run_class_names(run_dir, local.bundle) if run_dir is not None else None


def _same_model(out: Path, local, what: str) -> None:
    """A resumed aggregate, or a client's earlier run in its --out (``what`` it is), must be
    this bundle's model: its summary's signature where it has one, and exactly the bundle's
    trainable tensors (session 27 probe: a --resume with another bundle kept 2 of the 6
    tensors, replaced params.npz and mixed the two models' histories; a client replaced another
    model's weights and mixed its checkpoints in).

    Raises:
        UserError: another model's aggregate.
    """
    import zipfile

    import numpy as np

    from ..run_folder import json_object
    from .local import UserError, model_signature

    theirs = json_object(out / "summary.json").get("signature")
    signed = isinstance(theirs, str) and theirs not in (  # (or as recorded before session 45)
        local.signature, model_signature(local.bundle, before_45=True))
    try:
        with np.load(out / "params.npz", allow_pickle=False) as z:
            names = set(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # a cut or empty file
        names = None  # (load_params words a damaged file)
    if signed or (names is not None and names != set(local.names)):
        raise UserError(f"{what} of another model than bundle '{local.bundle.path}' ("
                        + (f"signature {theirs[:12]}, this bundle's {local.signature[:12]}"
                           if signed else "other trainable tensors")
                        + "); use the bundle it was trained with, or pass another --out")


def _client(a) -> int:
    from .client import run_client
    from .folders import check_out, drop_lock_only, earlier_steps, fleet_role, unsent_steps
    from .local import (
        UserError,
        check_client_options,
        open_local,
        parse_partition,
        resolve_budget,
    )

    address = parse_address(a.server, "--server")
    for flag, value in (("--steps", a.steps), ("--batch", a.batch)):
        if value < 1:
            raise UserError(f"{flag} {value} is invalid: must be at least 1")
    connect_timeout = check_seconds("--connect-timeout", a.connect_timeout)
    keepalive = check_seconds("--keepalive", a.keepalive)
    check_client_options(steps=a.steps, batch=a.batch, micro_batch=a.micro_batch,
                         checkpoint_every=a.checkpoint_every, max_nonfinite=a.max_nonfinite,
                         optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay)
    budget, threads = resolve_budget(a.budget, a.profile, a.threads)
    partition = parse_partition(a.partition)
    _flower(a.verbose)
    bundle = Path(a.bundle)
    from ..run_folder import bundle_run

    out = Path(a.out) if a.out else bundle_run(bundle, "fleet-client")
    if a.out:
        check_out(out)
    role = fleet_role(out)
    if role == "server":
        raise UserError(f"--out '{out}' holds a fleet server's aggregate (summary.json); a "
                        "client there would replace it: pass another --out")
    if role == "other" or ((out / "params.npz").exists() and role is None):
        raise UserError(f"--out '{out}' holds a params.npz or summary.json that no fleet client "
                        "wrote; nothing there is replaced: pass a new or empty folder as --out")
    from ..cli import instant_overrides, note_unused_instant

    local = open_local(bundle, a.data, budget, threads=threads, mode=a.mode,
                       instant=instant_overrides(a),
                       optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay, seed=a.seed,
                       out=out, checkpoint_every=a.checkpoint_every, partition=partition,
                       progress=a.progress, max_nonfinite=a.max_nonfinite,
                       micro_batch=a.micro_batch,
                       data_options={"text_column": a.text_column, "label_column": a.label_column,
                                     "val": a.val, "val_split": a.val_split})
    hold_bundle(local.bundle.path)  # (an export --overwrite of it is refused meanwhile)
    if a.mode is None and not local.bundle.layers:  # (a session 43 probe: taken silently)
        note_unused_instant(a, False)
    if role == "client" and (out / "params.npz").is_file():
        _same_model(out, local, f"--out '{out}' holds a fleet client's run")
    local.trainer.step_count = earlier_steps(out)  # (the weights come from the server)
    fresh = not out.exists()
    local.claim_out()
    try:
        with _signals_stop(local):  # (the budget's probes too: session 30 review)
            tensors = sum(v.nbytes for v in local.get_trainable().values())
            local.prepare(a.batch, reserve=TRANSFER_FACTOR * tensors)  # the budget plan, once
            print(f"fleet client: {len(local.data)} training examples"
                  + (f" (partition {a.partition})" if partition else "")
                  + f", {a.steps} steps of {a.batch} per round"
                  + (f", budget {budget_mb(budget)} MB" if budget else "") + f"; server {address}"
                  + (f"; its earlier run in {out} trained {local.trainer.step_count} steps, "
                     "counted on from there" + unsent_steps(out) if local.trainer.step_count
                     else ""), flush=True)
            return run_client(local, address, a.steps, a.batch,
                              connect_timeout=connect_timeout, keepalive=keepalive)
    except BaseException:  # (an error, or a signal while it waited for the server)
        drop_lock_only(out, fresh)  # a client that never trained leaves no folder behind
        raise


@contextlib.contextmanager
def _signals_stop(local):
    """SIGINT/SIGTERM/SIGHUP outside a round's training (waiting for the server, between
    rounds) end the client as a signal during training does: one line, exit 128 + signal
    (session 29 probe: SIGTERM while it waited said nothing and left a folder holding only the
    lock). During training, ``run.train``'s own handlers checkpoint first."""
    from ..checkpoint import StopSignals, TrainingInterrupted

    def stop(signum, frame):
        raise TrainingInterrupted(signum, local.trainer.step_count, None)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, stop) for s in StopSignals.SIGNALS  # (not SIGHUP under nohup)
           if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN} if main else {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# Message reserve, in trainable-tensor sizes: 3 MiniLM clients needed 3.1-4.4 x above the plan's
# probe (7-8 x before runtime.fleet.transport moved reply tensors one at a time).
TRANSFER_FACTOR = 6


def cmd_fleet(a) -> int:
    """The ``fleet`` handler: 0 when the run ends, 2 with one ``error:`` line on bad input,
    128 + signal when interrupted."""
    from ..checkpoint import TrainingInterrupted
    from ..memory import tune_malloc
    from .local import user_errors

    tune_malloc()  # as `instant-runtime` does: `python -m runtime.fleet` enters here directly
    try:
        from ..cli import check_not_empty

        check_not_empty(a)
        return _server(a) if a.fleet_cmd == "server" else _client(a)
    except user_errors() as exc:
        from ..console import one_line

        print(one_line(f"error: {exc}"), file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:  # a client: the next round starts from the server's
        name = signal.Signals(exc.signum).name  # weights, so rejoining is the way on
        print(f"interrupted by {name} "
              + (f"after step {exc.step}" if exc.step else "before this client trained a step")
              + "; run the same `fleet client` command to rejoin (each round starts from the "
              "server's weights)", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "FleetInterrupted":
            print(exc, file=sys.stderr)
            return exc.exit_code
        raise


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.fleet server|client ...`` (the same as ``instant-runtime fleet``)."""
    ap = argparse.ArgumentParser(prog="python -m runtime.fleet",
                                 description="fleet training over Flower")
    _fill(ap)
    return cmd_fleet(ap.parse_args(argv))
