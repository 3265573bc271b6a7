"""The fleet client: a Flower ``ClientApp`` whose train and evaluate functions are our runtime.

``make_client_app`` builds a Message-API ``ClientApp`` (``@app.train()``, ``@app.evaluate()``).
Its messages come from Flower's legacy gRPC server (see ``runtime.fleet``), so their content is
Flower's FitIns/EvaluateIns record layout; Flower's own converters
(``flwr.compat.common.recorddict_compat``) read and write it. Received tensors are copied into
the trainer's arrays one at a time and the received bytes are dropped as they are read, so the
global weights do not stay resident next to the trainer's during training.

``run_client`` is the device process: it joins the server over Flower's gRPC
bidirectional-stream transport (``runtime.fleet.transport``: Flower's channel, service and
message conversions, with the reply's tensors moved into the outgoing message one at a time),
answers the server's reconnect instruction, and runs every other message through the
``ClientApp``: the loop of ``flwr.client.start_client`` for that transport, without the FAB
installer, SQL node state and object store that ``start_client`` imports (38 MB of RSS that a
256 MB device cannot spare; see the README section).
"""

from __future__ import annotations

import json
import math
import sys
import time

from devices.planner import budget_mb

from .local import Local, UserError, names_from_json, release_memory

__all__ = ["PROTOCOL", "check_server_config", "make_client_app", "mismatch", "run_client"]

PROTOCOL = 5  # bumped when the config keys or the tensor order the two sides agree on change
# (4: clients ping every --keepalive s, which a server of 3 answered with GOAWAY, session 42;
# 5: the model's signature covers the tokenizer and image preprocessing, session 45)
MAX_ROUNDS = 1_000_000  # as `fleet server --rounds`


def check_server_config(config: dict, local_signature: str, flwr_version: str) -> int:
    """The server's round config against this device; returns the round number.

    Raises:
        UserError: another fleet protocol, another Flower minor version, another model.
    """
    r = config.get("round", 0)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_ROUNDS:
        raise UserError(f"the fleet server sent round {repr(r)[:24]}, not a round number; check "
                        "that it runs `instant-runtime fleet server`")
    differs = mismatch(config, local_signature, flwr_version)
    if differs == "fleet_protocol":
        raise UserError(f"the fleet server speaks fleet protocol {config.get('fleet_protocol')}, "
                        f"this client {PROTOCOL}; install the same instant-runtime version on "
                        "both sides")
    if differs == "flwr_version":
        server_flwr = str(config.get("flwr_version", "?"))
        raise UserError(f"the fleet server runs Flower {server_flwr}, this client {flwr_version}; "
                        f"install the same version on both (pip install 'flwr=={server_flwr}')")
    if differs == "signature":
        raise UserError("the fleet server trains another model (its bundle's trainable tensors, "
                        "graph, frozen weights, tokenizer or image preprocessing differ from "
                        "this bundle's); give every client a copy of the server's bundle")
    return r


def mismatch(theirs: dict, signature: str, flwr_version: str) -> str | None:
    """The first of the things both sides must share where ``theirs`` (the other side's round
    config or join-check answer) differs from this side: "fleet_protocol", "flwr_version" (the
    minor version) or "signature" (the model); None where none does."""
    if theirs.get("fleet_protocol") != PROTOCOL:
        return "fleet_protocol"
    if str(theirs.get("flwr_version", "?")).split(".")[:2] != flwr_version.split(".")[:2]:
        return "flwr_version"
    if theirs.get("signature") != signature:
        return "signature"
    return None


def _fleet_names(config: dict) -> list[str] | None:
    """The fleet's class names in a server's config (None: it has none)."""
    return names_from_json(config.get("classes"))


def _refusal(config: dict, local_signature: str, flwr_version: str) -> str | None:
    """Why this client cannot join the server whose check sent ``config`` (None: it can)."""
    try:
        check_server_config(config, local_signature, flwr_version)
    except UserError as exc:
        return str(exc)
    return None


def make_client_app(local: Local, steps: int, batch: int, say=None, seen: dict | None = None):
    """A Flower ``ClientApp``: ``train`` runs ``steps`` local steps of ``batch`` examples on the
    received weights and replies with the updated trainable tensors, the number of training
    examples and the round's metrics; ``evaluate`` reports loss and accuracy of the received
    weights on this device's held-out split. Frozen weights never leave the bundle.

    ``seen`` (where given) hears of each training round: its number, the server's
    ``round_timeout`` (0: none or not sent) and ``late``, whether the round's training alone
    outlasted it (the server then cut this client off: its reply is lost)."""
    import flwr
    from flwr.app import Context, Message
    from flwr.client import ClientApp
    from flwr.common import (
        Code,
        EvaluateRes,
        FitRes,
        Status,
        bytes_to_ndarray,
        ndarrays_to_parameters,
    )
    from flwr.compat.common.recorddict_compat import (
        evaluateres_to_recorddict,
        fitres_to_recorddict,
        recorddict_to_evaluateins,
        recorddict_to_fitins,
    )

    say = say or say_to()
    app = ClientApp()
    version = flwr.__version__
    seen_over: list[int] = []  # the round whose peak passed the budget (warned once)

    def receive(content, to_ins) -> tuple[int, dict]:
        ins = to_ins(content, keep_input=False)  # empties the message's records as it reads
        config = dict(ins.config)
        server_round = check_server_config(config, local.signature, version)
        line = local.agree_classes(_fleet_names(config))
        if line:
            say(line)
        tensors = ins.parameters.tensors
        del ins
        if len(tensors) != len(local.names):
            raise UserError(f"the fleet server sent {len(tensors)} tensors, this bundle trains "
                            f"{len(local.names)}; give every client a copy of the server's bundle")
        for i, name in enumerate(local.names):
            raw, tensors[i] = tensors[i], b""
            why = _header_problem(raw, name, local)
            if why is None:
                try:
                    value = bytes_to_ndarray(raw)  # allow_pickle=False inside
                    why = local.problem(name, value)
                except (ValueError, OSError, EOFError):
                    why = f"tensor '{name}' is not a plain NumPy array"
            del raw
            if why is not None and why.endswith("NaN or inf values"):
                raise UserError(f"the fleet server sent unusable weights: {why} (its average "
                                "diverged, or a client sent them); nothing was trained on them: "
                                "restart the server from a sound aggregate, with a lower client "
                                "--lr")
            if why is not None:
                raise UserError(f"the fleet server sent unusable weights: {why}; check that it "
                                "runs `instant-runtime fleet server` with this bundle")
            local.set_one(name, value)
            del value
        del tensors
        release_memory()
        return server_round, config

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t0 = time.monotonic()
        server_round, config = receive(msg.content, recorddict_to_fitins)
        timeout = config.get("round_timeout", 0)
        timeout = float(timeout) if isinstance(timeout, (int, float)) and \
            not isinstance(timeout, bool) and math.isfinite(timeout) and timeout > 0 else 0.0
        if seen is not None:
            seen.update(round=server_round, round_timeout=timeout, late=False, seconds=0.0)
        say(f"round {server_round}: received the global weights ({len(local.names)} tensors); "
            f"training {steps} steps")
        res = local.train_local(steps, batch, server_round)
        for line in res.lines if local.rounds == 1 else []:
            say(line)  # the budget plan, in full the first time
        for line in res.lines if local.rounds > 1 else []:
            if line.startswith(("plan for budget", "budget guard")):
                say(line)
        m = res.metrics
        say(f"round {server_round}: loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}"
            + (f", train accuracy {m['train_accuracy']:.3f}" if "train_accuracy" in m else "")
            + f", micro-batch {m['micro_batch']}; RSS {int(m['rss_at_start']) / 1e6:.1f} MB "
            f"before training, peak {int(m['peak_rss']) / 1e6:.1f} MB so far"
            + (f" (budget {budget_mb(local.budget)} MB)" if local.budget else ""))
        if local.budget and m["peak_rss"] > local.budget and not seen_over:
            seen_over.append(server_round)  # once: the peak is the process's, it only grows
            say(f"warning: this client passed its budget in round {server_round}: peak "
                f"{int(m['peak_rss']) / 1e6:.1f} MB over --budget {budget_mb(local.budget)} MB; "
                "it goes on; please report it with the bundle and the command", err=True)
        params = ndarrays_to_parameters(list(local.get_trainable().values()))
        fit = FitRes(status=Status(code=Code.OK, message="Success"), parameters=params,
                     num_examples=int(res.num_examples),
                     metrics={k: _scalar(v) for k, v in m.items()})
        del params
        if seen is not None:
            seen["seconds"] = time.monotonic() - t0
            seen["late"] = bool(timeout) and seen["seconds"] >= timeout - 0.5
        return Message(fitres_to_recorddict(fit, keep_input=False), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        server_round, _ = receive(msg.content, recorddict_to_evaluateins)
        loss, acc, n = local.evaluate()
        local.record_evaluation(server_round, loss, acc, n)
        what = ("held-out" if getattr(local, "evaluated_held_out", True)
                else "training (the data has no held-out split: x_test, y_test)")
        say(f"round {server_round}: evaluated the global weights on {n} local {what} examples"
            f": loss {loss:.4f}" + (f", accuracy {acc:.3f}" if acc is not None else ""))
        metrics = {"accuracy": float(acc)} if acc is not None else {}
        metrics["held_out"] = int(getattr(local, "evaluated_held_out", True))
        res = EvaluateRes(status=Status(code=Code.OK, message="Success"), loss=float(loss),
                          num_examples=int(n), metrics=metrics)
        return Message(evaluateres_to_recorddict(res), reply_to=msg)

    return app


def _message_limit(local: Local) -> int:
    """The largest gRPC message this client sends or takes: its trainable tensors as float32
    ``.npy`` bytes, with room for their headers and the round's config and metrics. gRPC refuses
    a larger one before reading it (a server had sent one 480 MB tensor for a 0.1 MB model and
    taken a client under --budget 256MB to 1.57 GB)."""
    tensors = local.get_trainable().values()
    return sum(4 * v.size + 256 for v in tensors) + (1 << 20)


def _header_problem(raw: bytes, name: str, local: Local) -> str | None:
    """What the ``.npy`` header of ``raw`` says is wrong for tensor ``name`` (None: nothing),
    read before the array itself: a header can declare any size (10^12 elements were an
    out-of-memory error, reported as the user's)."""
    import io

    from numpy.lib import format as npy

    f = io.BytesIO(raw)
    try:
        major, _ = npy.read_magic(f)
        shape, _, dtype = (npy.read_array_header_1_0 if major == 1
                           else npy.read_array_header_2_0)(f)
    except (ValueError, OSError, EOFError, SyntaxError):
        return f"tensor '{name}' is not a plain NumPy array (.npy bytes, no pickle)"
    return local.form_problem(name, shape, dtype)


def _scalar(v):
    if isinstance(v, (bool, int, str)):
        return v
    return float(v)


# gRPC's own reconnect backoff grows to minutes (1 s, 1.6 s, 2.6 s, ... with jitter): a client
# started a while before its server joined only many seconds after the server came up, and a
# short run could end before it did. Polled at least once a second instead (one TCP connect).
_POLL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                 ("grpc.max_reconnect_backoff_ms", 1000)]


def _wait_ready(address: str, timeout: float, say=None) -> None:
    """Block until a gRPC connection to ``address`` is up; a clear error after ``timeout``.
    Where it is not up at once, ``say`` hears that this client waits (and for how long)."""
    import grpc

    channel = grpc.insecure_channel(address, options=_POLL_OPTIONS)
    ready = grpc.channel_ready_future(channel)
    end = time.monotonic() + timeout
    try:
        try:
            ready.result(timeout=min(1.0, timeout))
        except grpc.FutureTimeoutError:
            if say is not None:
                say(f"waiting up to {timeout:.0f} s for the fleet server at {address}")
            ready.result(timeout=max(0.0, end - time.monotonic()))
    except grpc.FutureTimeoutError:
        raise UserError(f"cannot reach a fleet server at {address} within {timeout:.0f} s; start "
                        "`instant-runtime fleet server` there first, or check --server HOST:PORT"
                        ) from None
    finally:
        ready.cancel()
        channel.close()


def run_client(local: Local, address: str, steps: int, batch: int,
               connect_timeout: float = 60.0, say=None, keepalive: float = 30.0) -> int:
    """Serve the fleet server at ``address`` until it ends the run (returns 0).

    A lost connection (a server silent to pings ``keepalive`` seconds apart included) is
    retried for ``connect_timeout`` seconds (the server may restart);
    after that, or when nothing answers at all, a ``UserError``; also where the server ends the
    run before this client answered a single training or evaluation request.
    """
    import flwr
    import grpc
    from flwr.app import Context, RecordDict

    from .transport import Query, Reconnect, connection

    say = say or say_to()
    version = flwr.__version__
    seen: dict = {}
    app = make_client_app(local, steps, batch, say, seen)
    context = Context(run_id=0, node_id=-1, node_config={}, state=RecordDict(), run_config={})
    served = 0
    while True:
        _wait_ready(address, connect_timeout, say)
        say(f"connected to the fleet server at {address}")
        try:
            with connection(address, _message_limit(local), keepalive) as (
                    receive, send, disconnect, answer, flush):
                while True:
                    message = receive()
                    if isinstance(message, Query) and "fleet_failed" in message.config:
                        answer({})  # (server.py _tell_ended: the run failed, after this
                        flush(2.0)  # client's rounds, if any)
                        stop = bool(message.config.get("fleet_stopped"))
                        raise UserError((
                            f"the fleet server at {address} "
                            f"{'was stopped' if stop else 'ended the run'} before this client "
                            "trained or evaluated anything" if not served else
                            f"the fleet server at {address} "
                            f"{'was stopped' if stop else 'stopped the run in failure'} after "
                            f"this client answered {served} request(s) ({local.rounds} "
                            "trained round(s))") + "; the server "
                            f"said: {message.config['fleet_failed']}" + (
                                "; start this client again once the server runs again"
                                if stop else ""))
                    if isinstance(message, Query):  # the server's check as this client joins
                        refusal = _refusal(message.config, local.signature, version)
                        if refusal is None:
                            try:
                                line = local.agree_classes(_fleet_names(message.config))
                            except UserError as exc:
                                refusal = str(exc)
                            else:
                                if line:
                                    say(line)
                        own = local.own_classes()
                        answer({"signature": local.signature, "fleet_protocol": PROTOCOL,
                                "flwr_version": version, "refused": refusal or "",
                                "classes": json.dumps(own) if own else ""})
                        if refusal:
                            flush(2.0)  # the server hears why before the stream closes
                            raise UserError(refusal)
                        continue
                    if isinstance(message, Reconnect):  # the run ends (or: come back later)
                        disconnect(message)
                        sleep_s = message.seconds
                        break
                    reply = app(message, context)
                    del message
                    send(reply)
                    del reply
                    served += 1
                    release_memory()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise UserError(f"{address} answers gRPC but is not a fleet server (no Flower "
                                "service there); check --server HOST:PORT") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # (refused before it is read)
                raise UserError(f"a message from the fleet server at {address} is larger than "
                                f"this bundle's weights allow ({_details(exc)}); check that it "
                                "runs `instant-runtime fleet server` with this bundle") from None
            if seen.get("late"):  # the server's round ended before this client's training did
                say(f"the fleet server cut this client off at its --round-timeout of "
                    f"{seen['round_timeout']:.0f} s: round {seen['round']}'s training took "
                    f"{seen['seconds']:.0f} s and its update is lost; give the server a longer "
                    f"--round-timeout or this client fewer --steps; reconnecting for up to "
                    f"{connect_timeout:.0f} s")
                seen["late"] = False
            else:
                say(f"lost the connection to {address} ({code.name if code else exc}); "
                    f"reconnecting for up to {connect_timeout:.0f} s")
            _retry_or_fail(address, connect_timeout)
            continue
        except StopIteration:
            say(f"the fleet server at {address} closed the stream; reconnecting for up to "
                f"{connect_timeout:.0f} s")
            _retry_or_fail(address, connect_timeout)
            continue
        if sleep_s < 0:  # (it looped: "reconnect in 0 s", a thousand lines a minute)
            raise UserError(f"the fleet server at {address} asked this client to reconnect in "
                            f"{sleep_s} s; check that it runs `instant-runtime fleet server`")
        if sleep_s:
            sleep_s = min(sleep_s, connect_timeout)  # a server's word, bounded
            say(f"the fleet server asks to reconnect in {sleep_s:.0f} s")
            time.sleep(sleep_s)
            continue
        if not served:  # (the server gave up, or its rounds were done before this client joined)
            raise UserError(f"the fleet server at {address} ended the run before this client "
                            "trained or evaluated anything; see the server's output (too few "
                            "clients within its --wait, or its rounds were already done)")
        again = local.rounds - len(local.round_numbers)  # (session 47 probe: "trained 6
        # rounds" of a 5-round fleet, one of them twice after its server started again)
        say(f"the fleet server ended the run; this client trained {local.rounds} round(s)"
            + (f" ({again} of them again: its server started again and repeated them)"
               if again > 0 else "") + f" and answered {served} request(s)")
        return 0


def _retry_or_fail(address: str, timeout: float) -> None:
    try:
        _wait_ready(address, timeout)
    except UserError:
        raise UserError(f"lost the connection to the fleet server at {address} and it did not "
                        f"come back within {timeout:.0f} s; restart the client when the server "
                        "runs again (the server may also have finished its rounds)") from None


def _details(exc) -> str:
    d = exc.details() if hasattr(exc, "details") else str(exc)
    return (d or "").splitlines()[0] if d else type(exc).__name__


def say_to(stream=None):
    """A ``say`` that flushes each line (progress of background processes stays visible)."""

    def say(line: str, err: bool = False) -> None:
        print(line, file=sys.stderr if err else (stream or sys.stdout), flush=True)

    return say
