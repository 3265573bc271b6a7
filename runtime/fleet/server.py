"""The fleet server: Flower's FedAvg over Flower's gRPC server, evaluated by our runtime.

Built from Flower's own parts, exactly as ``flwr.server.start_server`` assembles them:
its gRPC bidirectional-stream Fleet API servicer (started by ``transport.start_server`` with
Flower's options, accepting the clients' keepalive pings), ``Server`` with a
``SimpleClientManager``, the ``FedAvg`` strategy and ``run_fl`` (rounds, then a disconnect
message to every client). Assembled here rather than through ``start_server`` so that the gRPC
server is stopped on every way out (an error or a signal in the middle of a round would otherwise
leave its threads waiting for clients and the process hanging), and without its telemetry.

What is ours: the strategy's start (the bundle's initial trainable tensors), its round config
(fleet protocol, Flower version, model signature: a client of another model refuses to train),
the same check as a client joins (``get_properties`` before any round picks it: such a client is
dropped and tells its user why, instead of failing a round),
a check of every returned tensor before averaging (a bad reply counts as a failure instead of
breaking the average), the held-out evaluation of each aggregate, the run folder written after
every round, and a client manager that waits a bounded time for ``--min-clients``.

Why one module (~540 lines): ``run_server``'s strategy, client manager and summary are closures
over one run's state (rounds done, the fleet's classes, the last aggregate); the reply and join
checks beside it are what they call.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np

from .classes import agree_here, fleet_classes, numbered_classes, resumed_classes
from .client import PROTOCOL, mismatch, say_to
from .history import RoundHistory, earlier_evaluations
from .local import Local, UserError, names_from_json, save_run

__all__ = ["INITIAL", "NotEnoughClients", "run_server"]

INITIAL = "initial weights"  # run_server's ``start`` where round 1 starts from the bundle's


class NotEnoughClients(UserError):
    pass


def _parts():
    """Flower's server parts, imported on first use (keeps ``runtime.fleet`` import-light)."""
    from flwr.common import (
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server import Server, ServerConfig, SimpleClientManager
    from flwr.server.server import run_fl
    from flwr.server.strategy import FedAvg

    from .transport import start_server

    return (ndarrays_to_parameters, parameters_to_ndarrays, Server, ServerConfig,
            SimpleClientManager, run_fl, FedAvg, start_server)


def _weighted(metrics: list[tuple[int, dict]]) -> dict:
    """Example-weighted mean of every numeric metric the clients report (Flower's
    ``MetricsAggregationFn`` signature)."""
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, (int, float))}
    out = {}
    for k in sorted(keys):  # over the clients that reported k (a dropped NaN is not a 0)
        have = [(n, float(m[k])) for n, m in metrics if isinstance(m.get(k), (int, float))]
        out[k] = sum(n * v for n, v in have) / (sum(n for n, _ in have) or 1)
    if metrics:
        out["peak_rss_max"] = max(float(m.get("peak_rss", 0)) for _, m in metrics)
    return out


def run_server(local: Local, address: str, rounds: int, min_clients: int, out: Path,
               evaluate_here: bool, wait_s: float = 300.0, round_timeout: float | None = 3600.0,
               say=None, earlier: dict | None = None, evaluated_on: str = "",
               resumed: bool = False, classes: list[str] | None = None,
               start: str = INITIAL) -> dict:
    """Run FedAvg up to round ``rounds``; returns the run summary (also in ``OUT/summary.json``,
    written after every round; every round's entry in ``OUT/rounds.jsonl``). ``earlier``: the
    summary of the run this one resumes (its rounds count, its history is kept); ``classes``:
    the class order of the weights round 1 starts from, ``start`` what they are (``--init-from``).

    Raises:
        UserError: cannot listen on ``address``; fewer than ``min_clients`` clients within
            ``wait_s`` seconds at the start of a round.
    """
    import flwr

    (ndarrays_to_parameters, parameters_to_ndarrays, Server, ServerConfig, SimpleClientManager,
     run_fl, FedAvg, start_grpc_server) = _parts()
    say = say or say_to()
    names = list(local.names)
    earlier = earlier or {}
    history = RoundHistory(out, earlier or None, lambda: way_out(), resumed)
    done = int(earlier.get("rounds_done", 0))  # rounds of the resumed run: Flower counts from 1
    scored = set(earlier_evaluations(earlier)) if done else set()  # the data it was scored on
    state = {"fit": None, "round": 0, "saved": 0, "trained": int(earlier.get("trained_rounds", 0)),
             "ended": 0, "fit_t0": time.monotonic(), "late": 0,
             # a resumed run keeps the class order its aggregate was trained in (session 29
             # probe: the server's --data's own order replaced it, and the resumed aggregate
             # was read with its classes swapped: 0.997 -> 0.370)
             "classes": resumed_classes(local, earlier) or classes or fleet_classes(local)}
    t0 = time.perf_counter() - float(earlier.get("seconds", 0.0))
    if state["classes"]:  # (a resumed run's classes may be its first client's)
        agree_here(local, state["classes"], say)

    def trained() -> bool:
        """Whether the weights a round sends were trained already (a resumed run's aggregate,
        --init-from weights, a round done): with no class names they were trained on numbered
        labels, so a client that joins naming its classes cannot renumber them (session 42
        probe: a resumed digits fleet took a "9".."0" client's order, 0.975 -> 0.006)."""
        before = earlier.get("trained_rounds", done)  # (rounds that all failed trained none)
        return bool(before or state["trained"] or start != INITIAL)

    def round_config(server_round: int) -> dict:
        return {"round": server_round + done, "fleet_protocol": PROTOCOL,
                "flwr_version": flwr.__version__, "signature": local.signature,
                "classes": json.dumps(state["classes"]) if state["classes"] else "",
                # a client whose training outlasts it can say so (its stream is cut then)
                "round_timeout": float(round_timeout or 0.0)}

    def summary(finished: bool) -> dict:
        return {"rounds": rounds, "min_clients": min_clients, "address": address,
                "seconds": time.perf_counter() - t0, **history.fields(),
                "trained_rounds": state["trained"], "rounds_done": done + state["ended"],
                "finished": finished, "class_names": state["classes"],
                "cut_off_at_round_timeout": state["late"],
                # (none where no round's aggregate was written: session 29 probe, it named a
                # params.npz that did not exist)
                "weights": str(out / "params.npz") if finished or state["saved"] or done
                else None,
                "signature": local.signature, "bundle": str(local.bundle.path)}

    def way_out() -> str:
        """What a folder that cannot be written leaves (session 29 probe: "pass another --out"
        alone, where a --resume after freeing the disk keeps the rounds done)."""
        if not (state["saved"] or done):
            return "no aggregate was written: free space or make it writable and run again, " \
                "or pass another --out"
        return (f"the aggregate of round {done + state['saved']} is in {out / 'params.npz'}: "
                "free space or make the folder writable and run the same command with "
                "--resume, or pass another --out")

    def fit_part(r: int) -> str:
        f = state["fit"]
        if f is None or f["round"] != r:
            return f"round {r + done}"
        late = (f"; {f['late']} cut off at --round-timeout {round_timeout:.0f} s: raise it, or "
                "lower the clients' --steps" if f.get("late") else "")
        if not f["clients"]:
            return (f"round {r + done}: no client finished ({f['failures']} failed{late}), "
                    "weights unchanged")
        loss = f["loss_last"]
        return (f"round {r + done}: {f['clients']} client{'' if f['clients'] == 1 else 's'} "
                f"trained ({f['failures']} failed{late}), "
                f"{f['examples']} examples"
                + (f", client loss {loss:.4f}" if math.isfinite(loss) else ""))

    def record(r: int, loss: float, acc, n: int, where: str) -> None:
        if r == 0:
            head = (f"round {done} (the resumed aggregate); " if done
                    else f"round 0 ({start}); ")
        else:
            head = f"{fit_part(r)}; " if evaluate_here else f"round {r + done}: "
        line = f"{head}{where} " + (f"accuracy {acc:.3f}, " if acc is not None else "") + \
            f"loss {loss:.4f} ({n} examples)"
        say(line)
        if r == 0 and done and evaluated_on in scored:  # (its history has this round already;
            return  # on other data its score is new, and the summary's comparison starts there)
        entry = {"round": r + done, "loss": loss, "accuracy": acc, "examples": n,
                 "where": where, "evaluated_on": evaluated_on,
                 "seconds": time.perf_counter() - t0}
        if state["fit"] is not None and state["fit"]["round"] == r:
            entry["fit"] = {**state["fit"], "round": r + done}
        history.add(entry)
        if r:  # the summary so far, beside the round's aggregate (a stopped run keeps it)
            save_run(out, None, summary(False), way_out())

    def evaluate_fn(server_round: int, ndarrays, config):
        local.set_trainable(dict(zip(names, ndarrays, strict=True)))
        loss, acc, n = local.evaluate()
        record(server_round, loss, acc, n, "held-out")
        return loss, ({"accuracy": acc} if acc is not None else {})

    class FleetFedAvg(FedAvg):
        """Flower's FedAvg; replies whose tensors do not fit the bundle count as failures."""

        def aggregate_fit(self, server_round, results, failures):
            good = []
            for proxy, res in results:
                why = _reply_problem(res, names, local, parameters_to_ndarrays,
                                     ndarrays_to_parameters)
                if why is not None:
                    say(f"round {server_round + done}: dropped a reply ({why})")
                    failures = [*failures, (proxy, res)]
                    continue
                good.append((proxy, res))
            params, metrics = super().aggregate_fit(server_round, good, failures)
            if params is not None and not all(
                    np.isfinite(a).all() for a in parameters_to_ndarrays(params)):
                say(f"round {server_round + done}: the average of the replies is not finite "
                    "(values too large to add); weights unchanged")
                params = None
            state["ended"] = server_round
            # a reply past --round-timeout reads as a client that left (its stream is cut):
            # told apart by the round's time (session 27 probe: the timeout was never named)
            late = round_timeout is not None and \
                time.monotonic() - state["fit_t0"] >= round_timeout - 0.5
            cut = late * sum(type(f).__name__ == "GrpcBridgeClosed" for f in failures)
            state["late"] += cut
            state["fit"] = {"round": server_round, "clients": len(good), "late": cut,
                            "failures": len(failures),
                            "examples": sum(r.num_examples for _, r in good),
                            "loss_last": float(metrics.get("loss_last", float("nan"))),
                            "peak_rss_max": metrics.get("peak_rss_max")}
            state["trained"] += bool(good)
            if params is not None:
                arrays = parameters_to_ndarrays(params)
                failed = way_out()  # (the aggregate before this one stays where this fails)
                state["saved"] = server_round
                # the summary beside it counts this round (a kill before its evaluation, or
                # a round nobody evaluated, would have a resume train it again)
                save_run(out, dict(zip(names, arrays, strict=True)), summary(False), failed)
            if not evaluate_here:
                say(fit_part(server_round))
            return params, metrics

        def configure_fit(self, server_round, parameters, client_manager):
            state["round"] = server_round
            state["fit_t0"] = time.monotonic()
            return _classes_now(super().configure_fit(server_round, parameters,
                                                      client_manager))

        def configure_evaluate(self, server_round, parameters, client_manager):
            f = state["fit"]  # a round no client finished left nothing new to evaluate (a probe:
            if f is not None and f["round"] == server_round and not f["clients"]:  # its clients
                return []  # were waited for --wait, then "only 0 of the 1 connected")
            return _classes_now(super().configure_evaluate(server_round, parameters,
                                                           client_manager))

        def aggregate_evaluate(self, server_round, results, failures):
            kept = []
            for proxy, res in results:
                why = _count_problem(res.num_examples) or (
                    None if _finite_number(res.loss) else f"loss {str(res.loss)[:24]}")
                if why is not None:
                    say(f"round {server_round + done}: dropped an evaluation ({why})")
                    failures = [*failures, (proxy, res)]
                    continue
                res.metrics = _numbers(res.metrics)
                kept.append((proxy, res))
            results = kept
            loss, metrics = super().aggregate_evaluate(server_round, results, failures)
            if loss is not None:
                n = sum(r.num_examples for _, r in results)
                # a client without a held-out split evaluates on its training rows (it says so)
                seen = sum(r.num_examples for _, r in results
                           if r.metrics.get("held_out", 1) == 0)
                whose = f"{len(results)} " + ("client's" if len(results) == 1 else "clients'")
                where = f"{whose} own held-out"
                if seen:
                    where = (f"{whose} own data ({seen} of the {n} examples are "
                             "training rows of clients without a held-out split)")
                record(server_round, loss, metrics.get("accuracy"), n, where)
            return loss, metrics

    def _classes_now(instructions):
        """FedAvg reads the round's config before it picks the clients, and the first client's
        join check, inside the pick, may name the fleet's classes: the config then said none,
        and round 1 trained in each client's own numbering (session 29 probe: the round's
        aggregate scored 0.395 where the same rows numbered alike scored 0.997)."""
        for _, ins in instructions:
            ins.config["classes"] = json.dumps(state["classes"]) if state["classes"] else ""
        return instructions

    initial = ndarrays_to_parameters([local.get_trainable()[k] for k in names])
    strategy = FleetFedAvg(
        fraction_fit=1.0, min_fit_clients=min_clients, min_available_clients=min_clients,
        fraction_evaluate=0.0 if evaluate_here else 1.0,
        min_evaluate_clients=0 if evaluate_here else min_clients,
        evaluate_fn=evaluate_fn if evaluate_here else None,
        on_fit_config_fn=round_config, on_evaluate_config_fn=round_config,
        accept_failures=True, initial_parameters=initial,
        fit_metrics_aggregation_fn=_weighted, evaluate_metrics_aggregation_fn=_weighted)

    class BoundedClientManager(SimpleClientManager):
        """Flower's client manager, but a round waits ``wait_s`` for clients, not a day, and
        counts only clients that passed the join check (:meth:`vet`)."""

        def __init__(self) -> None:
            super().__init__()
            self.vetted: set[str] = set()
            self.refused = 0

        def sample(self, num_clients, min_num_clients=None, criterion=None):
            """Every connected client that passed the join check (FedAvg asks for all of
            them: ``num_clients`` was counted before the check, so it may include clients the
            check drops), at least ``min_num_clients``, waiting up to ``--wait`` for them."""
            need = min_num_clients or num_clients
            end, every = time.monotonic() + wait_s, min(30, max(2, wait_s // 3))  # (said)
            said = time.monotonic()
            while True:
                left = end - time.monotonic()
                if left > 0 and self.wait_for(need, timeout=max(1, int(min(left, 2) + 0.999))):
                    checked = self.vet(end)
                    if len(checked) >= need:
                        take = max(need, min(num_clients, len(checked)))
                        return random.sample(checked, take)
                    if time.monotonic() < end:
                        time.sleep(0.2)  # (refused ones are gone; others may still join)
                        continue
                elif time.monotonic() < end - 1:  # (session 39 probe: 300 s without a word)
                    # a client of another model is refused as it joins, not counted (session
                    # 49 probe: "1 of 2 connected" until --wait ran out, then refused)
                    checked = self.vet(end)
                    if time.monotonic() - said >= every:
                        said = time.monotonic()
                        say(f"round {state['round'] + done}: waiting for clients, "
                            f"{len(checked)} of {need} connected "
                            f"({end - time.monotonic():.0f} s of --wait left)")
                    continue
                refused = (f" ({self.refused} refused at the join check, above)"
                           if self.refused else "")
                cut = state["fit"] or {}  # (a session 44 probe: clients cut off at the round
                cut = (f"the {cut['late']} client(s) cut off at --round-timeout "  # timeout
                       f"{round_timeout:.0f} s in round {cut['round'] + done} may still be "
                       "training it: raise --round-timeout or --wait, or lower the clients' "
                       "--steps") if cut.get("late") else ""  # were blamed as never started)
                raise NotEnoughClients(
                    f"only {len(self.vet(end))} of the {need} clients that round "
                    f"{state['round'] + done} needs connected within {wait_s:.0f} s{refused}; "
                    + (f"{cut}; otherwise " if cut else "")
                    + "start more clients (`instant-runtime fleet client`), lower "
                    "--min-clients or raise --wait" + (
                        f"; the aggregate of round {done + state['saved']} is kept: "
                        + ("run the same command again" if resumed else "add --resume")
                        + " to go on from it" if done + state["saved"] else ""))

        def vet(self, end: float) -> list:
            """Ask every client that joined since it last looked for its fleet protocol, Flower
            version and model signature, until every connected one is checked; one that differs
            (or does not answer by ``end``, at most 60 s) is dropped before a round picks it (it
            wasted the round, and with one round the run). Returns the checked clients."""
            from concurrent.futures import ThreadPoolExecutor

            while True:
                new = [(cid, p) for cid, p in list(self.all().items()) if cid not in self.vetted]
                if not new:
                    return [p for cid, p in self.all().items() if cid in self.vetted]
                timeout = max(1.0, min(60.0, end - time.monotonic()))

                heard: list = []

                def check(proxy, timeout=timeout, heard=heard):
                    return _join_check(proxy, round_config(state["round"]), local.signature,
                                       flwr.__version__, timeout=timeout, heard=heard)

                # all at once: a silent peer held each good one up to 60 s (two: 98 s)
                with ThreadPoolExecutor(max_workers=min(32, len(new))) as pool:
                    answers = list(pool.map(check, [p for _, p in new]))
                if state["classes"] is None:  # the first client's names number the fleet's
                    named = [c for c in heard if c]
                    if named:
                        state["classes"] = numbered_classes(local, trained()) or named[0]
                        said = state["classes"]
                        say(f"before round {state['round'] + done}: the fleet's classes are "
                            f"{', '.join(said[:8])}{', ...' if len(said) > 8 else ''} " + (
                                "(the first client's; every client's labels are numbered so)"
                                if said is named[0] else "(the numbers its weights were "
                                "trained on; a client's named labels are numbered so)"))
                        agree_here(local, said, say)
                for (cid, proxy), why in zip(new, answers, strict=True):
                    if why is None:
                        self.vetted.add(cid)
                        continue
                    if why != GONE:
                        self.refused += 1
                        say(f"before round {state['round'] + done}: refused a client ({why})")
                    self.unregister(proxy)

    manager = BoundedClientManager()
    server = Server(client_manager=manager, strategy=strategy)
    _check_local_address(address)
    try:
        grpc_server = start_grpc_server(manager, address)
    except SystemExit as exc:  # Flower exits on a port in use
        why = str(exc.code).rstrip(".")
        raise UserError(f"cannot listen on {address}: {why}; pick another port") from None
    except RuntimeError as exc:
        raise UserError(f"cannot listen on {address}: {exc}; check --address HOST:PORT"
                        ) from None
    say(f"fleet server on {address}: FedAvg, {rounds} round{'s' * (rounds != 1)}, waiting for "
        f"{min_clients} "
        f"client(s) per round; model {local.signature[:12]}, {len(names)} trainable tensors "
        f"({sum(v.nbytes for v in local.get_trainable().values()) / 1e6:.2f} MB)")
    stopped = {"signal": None}
    # connected clients that can answer hear why at once (a session 44 probe: they waited a
    # minute, then blamed the network): told from a thread started now, which a signal wakes
    # (a handler that takes locks could wait for one its own thread holds: a review)
    wake, told = threading.Event(), threading.Event()

    def tell_then_stop() -> None:
        wake.wait()
        if stopped["signal"] is not None:
            _tell_ended(manager, f"it was stopped by {signal.Signals(stopped['signal']).name}",
                        timeout=2.0, stopped=True)
            grpc_server.stop(grace=0)  # clients' pending replies fail now: rounds cannot hang
        told.set()

    threading.Thread(target=tell_then_stop, name="fleet-stop", daemon=True).start()

    def on_signal(signum, frame):
        if stopped["signal"] is not None:  # a second one: stop at once
            grpc_server.stop(grace=0)
        stopped["signal"] = signum
        wake.set()
        raise KeyboardInterrupt

    from ..checkpoint import StopSignals

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in StopSignals.SIGNALS:  # (HUP: a closed terminal or ssh session; not under
            if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN:  # nohup)
                old[s] = signal.signal(s, on_signal)
    try:
        try:
            run_fl(server, ServerConfig(num_rounds=rounds - done, round_timeout=round_timeout))
        except UserError as exc:  # the clients that did connect hear that the run failed and
            _tell_ended(manager, str(exc))  # why (session 42 probe: one that had trained a
            server.disconnect_all_clients(timeout=5)  # round exited 0), then that it ended
            raise  # (they went on retrying for a minute)
    except KeyboardInterrupt:
        told.wait(5)  # (the clients told, within 2 s each, at once)
        raise FleetInterrupted(stopped["signal"] or signal.SIGINT,
                               done + state["saved"], out) from None
    finally:
        wake.set()  # (the teller ends: without a signal it tells nobody)
        for s, h in old.items():
            signal.signal(s, h)
        grpc_server.stop(grace=1).wait(5)
        history.close()
    state["ended"] = rounds - done
    final = parameters_to_ndarrays(server.parameters)
    result = summary(True)
    save_run(out, dict(zip(names, final, strict=True)), result, way_out())
    return result


GONE = "gone"  # _join_check: the client disconnected (not a refusal)
MAX_EXAMPLES = 1 << 40  # a reply's example count above this is not a device's data


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(metrics) -> dict:
    """The finite numeric metrics of a reply (text, bytes, NaN dropped: the averages are of
    numbers; a text metric was a traceback)."""
    return {k: v for k, v in dict(metrics or {}).items() if _finite_number(v)}


def _count_problem(n) -> str | None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_EXAMPLES:
        return f"{str(n)[:24]} examples"
    return None


def _reply_problem(res, names: list[str], local: Local, to_arrays, to_parameters) -> str | None:
    """Why a client's training reply cannot enter the average (None: it can). A reply that can
    is rewritten in place as float32 tensors and numeric metrics. FedAvg weights each reply by
    its example count: one below 1 or absurdly large (a negative one scaled the others' updates
    ~1400 times) is refused; a count a client overstates within reason still weighs more."""
    why = _count_problem(res.num_examples)
    if why is not None:
        return why
    try:
        arrays = to_arrays(res.parameters)  # (np.load without pickle)
    except Exception as exc:  # noqa: BLE001 - any bytes may arrive
        return f"tensors that are not plain NumPy arrays ({type(exc).__name__})"
    if len(arrays) != len(names):
        return f"{len(arrays)} tensors instead of {len(names)}"
    for name, a in zip(names, arrays, strict=True):
        why = local.problem(name, a)
        if why is not None:
            return why
    res.parameters = to_parameters([np.asarray(a, dtype=np.float32) for a in arrays])
    res.metrics = _numbers(res.metrics)
    return None



def _tell_ended(manager, why: str, timeout: float = 5.0, stopped: bool = False) -> None:
    """Tell every connected client that the run failed (``stopped``: was stopped by a signal),
    and ``why`` (a ``get_properties`` carrying ``fleet_failed``; a client that does not answer
    within ``timeout`` seconds, one busy training, is not waited for)."""
    from concurrent.futures import ThreadPoolExecutor

    from flwr.common import GetPropertiesIns

    def tell(proxy) -> None:
        try:
            proxy.get_properties(GetPropertiesIns(config={"fleet_failed": why, **(
                {"fleet_stopped": 1} if stopped else {})}), timeout=timeout, group_id=None)
        except Exception:  # noqa: BLE001 - gone already: nothing to tell
            pass

    proxies = list(manager.all().values())
    if proxies:
        with ThreadPoolExecutor(max_workers=min(32, len(proxies))) as pool:
            list(pool.map(tell, proxies))


def _join_check(proxy, config: dict, signature: str, flwr_version: str,
                timeout: float = 60.0, heard: list | None = None) -> str | None:
    """Why the client behind ``proxy`` cannot take part (None: it can): its answer to the
    server's ``get_properties`` carrying ``config``. The class names it answers with go to
    ``heard`` (None where it has none)."""
    from flwr.common import GetPropertiesIns

    t0 = time.monotonic()
    try:
        res = proxy.get_properties(GetPropertiesIns(config=config), timeout=timeout,
                                   group_id=None)
        props = dict(res.properties)
    except Exception as exc:  # noqa: BLE001 - gone, or not an instant-runtime client
        if type(exc).__name__ == "GrpcBridgeClosed":  # it left, or was cut off at the timeout
            if time.monotonic() - t0 >= timeout - 0.5:
                return (f"it did not answer the join check within {timeout:.0f} s: another "
                        "program, or a device too busy to answer")
            return GONE
        return f"it did not answer the join check ({type(exc).__name__}): another program or " \
               "an older instant-runtime"
    differs = mismatch(props, signature, flwr_version)
    if differs == "fleet_protocol":
        return f"it speaks fleet protocol {props.get('fleet_protocol')}, this server " \
               f"{PROTOCOL}; install the same instant-runtime version on both sides"
    if differs == "flwr_version":
        return f"it runs Flower {props.get('flwr_version', '?')}, this server {flwr_version}"
    if differs == "signature":
        return f"it has another model (signature {str(props.get('signature'))[:12]}, this " \
               f"server's {signature[:12]}); give every client a copy of the server's bundle"
    if props.get("refused"):
        return str(props["refused"])
    if heard is not None:
        heard.append(names_from_json(props.get("classes")))
    return None


def _check_local_address(address: str) -> None:
    """An address that is not this machine's (Flower reports any failure to listen as a port
    in use): one line that says so.

    Raises:
        UserError: the host is not an address of this machine.
    """
    import errno
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:  # (Flower said "port already in use")
        raise UserError(f"cannot listen on {address}: the host '{host}' does not resolve "
                        f"({exc.strerror}); use 0.0.0.0:{port} (every interface) or "
                        f"127.0.0.1:{port}") from None
    except (OSError, ValueError):
        return  # left to the server's own error
    for family, kind, proto, _, where in infos[:1]:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(where)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise UserError(f"cannot listen on {address}: {host} is not an address of "
                                    f"this machine; use 0.0.0.0:{port} (every interface) or "
                                    f"127.0.0.1:{port}") from None


class FleetInterrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP: the server stopped; the last aggregate is in ``out``."""

    def __init__(self, signum: int, saved_round: int, out: Path) -> None:
        self.exit_code = 128 + int(signum)
        where = (f"the aggregate of round {saved_round} is in {out}/params.npz" if saved_round
                 else "no round finished, so there is no aggregate to resume from: start "
                 "the server again as before (not with --resume)")  # (its log and summary exist)
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {where}")
