"""The device's end of Flower's gRPC bidirectional-stream transport, with a small memory peak.

Same protocol, channel and messages as Flower's own client for this transport
(``flwr.compat.client.grpc_client.connection``): one ``FlowerService/Join`` stream on a channel
from Flower's ``create_channel``; ``ServerMessage`` in (``fit_ins``, ``evaluate_ins``,
``get_properties_ins``, ``reconnect_ins``), ``ClientMessage`` out, converted with Flower's ``serde`` and
``recorddict_compat`` functions; the ``ClientApp`` sees the same ``Message`` objects. What
differs is where the reply's tensors live on the way out, which is what sets a fleet client's
peak (measured on MiniLM-L6 ``last:3``, 14.2 MB of trainable tensors, flwr 1.42, VmHWM reset
around each phase): Flower's send built a ``Parameters`` proto, then a ``FitRes`` proto, then a
``ClientMessage``, each a full copy of the tensors next to the reply's own bytes, and gRPC's
request thread kept the last request object until the next one: the send peaked 56 MB (4 × the
tensors) above the RSS before it. Here the reply's tensors move into the ``ClientMessage`` one at
a time (each serialized tensor freed as soon as it is copied), and the request object gives up
its message as soon as gRPC has serialized it. With 3 such clients the peaks from outside fell
from 335 to 292 MB (``last:3`` at 352 MB) and from 234 to 223 MB (``last:2`` at 256 MB).

The channel pings a silent server (HTTP/2 keepalive, ``fleet client --keepalive``): a server
host that stopped, or a network that dropped without closing the connection, is taken as a lost
connection within about the keepalive and ``KEEPALIVE_TIMEOUT_S`` (session 42 probe: a client
waited silently for ever on a stopped server). The server (:func:`start_server`, Flower's
servicer with its options) accepts pings down to ``MIN_PING_S`` apart; Flower's own server
answers pings more often than every 5 min without data with GOAWAY.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import time
import uuid

from .local import UserError

__all__ = ["JOIN", "KEEPALIVE_S", "Query", "Reconnect", "connection", "start_server"]

JOIN = "/flwr.proto.FlowerService/Join"  # Flower's grpc-bidi method (its generated stub's path)
KEEPALIVE_S = 30.0  # a client's pings of a silent server (fleet client --keepalive)
KEEPALIVE_TIMEOUT_S = 20.0  # no answer to a ping this long: the connection is lost
MIN_PING_S = 0.5  # the server accepts a client's pings this far apart (--keepalive >= 1 s)


def start_server(client_manager, address: str):
    """Flower's gRPC bidirectional-stream server (its ``start_grpc_server``, the same servicer
    and options) that also accepts its clients' keepalive pings (``MIN_PING_S``), started.

    Raises:
        SystemExit: the port is in use (as Flower's does).
        RuntimeError: gRPC cannot bind ``address``.
    """
    import concurrent.futures
    import sys

    import grpc
    from flwr.proto.transport_pb2_grpc import add_FlowerServiceServicer_to_server
    from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import (
        FlowerServiceServicer,
    )
    from flwr.supercore.address import is_port_in_use
    from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH

    if is_port_in_use(address):
        sys.exit(f"Port in server address {address} is already in use.")
    workers = 1000
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers),
                         maximum_concurrent_rpcs=workers, options=[
                             ("grpc.max_concurrent_streams", workers),
                             ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_LENGTH),
                             ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_LENGTH),
                             ("grpc.keepalive_time_ms", 210_000),  # (Flower's: its pings)
                             ("grpc.http2.max_pings_without_data", 0),
                             ("grpc.keepalive_permit_without_calls", 0),
                             ("grpc.http2.min_ping_interval_without_data_ms",
                              int(MIN_PING_S * 1000))])
    add_FlowerServiceServicer_to_server(FlowerServiceServicer(client_manager), server)
    server.add_insecure_port(address)
    server.start()
    return server


@dataclasses.dataclass
class Query:
    """The server's ``get_properties_ins``: its check of a client that joins (``config``: the
    fleet protocol, Flower version and model signature), answered before any round."""

    config: dict


@dataclasses.dataclass
class Reconnect:
    """The server's ``reconnect_ins``: ``seconds`` 0 ends the run, more asks to come back then."""

    seconds: int


class _Outgoing:
    """A request whose message is dropped once gRPC has serialized it (gRPC's request thread
    keeps the last request object until the next one; here it keeps only this empty shell)."""

    __slots__ = ("msg",)

    def __init__(self, msg) -> None:
        self.msg = msg

    def serialize(self) -> bytes:
        data = self.msg.SerializeToString()
        self.msg = None
        return data


@contextlib.contextmanager
def connection(address: str, max_message: int | None = None, keepalive_s: float = KEEPALIVE_S):
    """Yield ``(receive, send, disconnect, answer, flush)`` on a Join stream to the fleet server
    at ``address``; gRPC refuses a message over ``max_message`` bytes (default: Flower's 512 MB)
    before reading it.

    ``receive()`` returns a Flower ``Message`` (train or evaluate), a :class:`Query` or a
    :class:`Reconnect`; ``send(reply)`` sends the ``ClientApp``'s reply; ``answer(properties)``
    answers a ``Query``; ``disconnect(reconnect)`` answers a ``Reconnect``; ``flush(timeout)``
    waits until what was sent has left. gRPC errors propagate (``grpc.RpcError``, ``StopIteration`` when the server
    closes the stream; UNAVAILABLE where a ping ``keepalive_s`` after the server was last heard
    went unanswered).
    """
    import grpc
    from flwr.app import DEFAULT_TTL, Metadata
    from flwr.app.message import make_message
    from flwr.app.message_type import MessageType
    from flwr.common import serde
    from flwr.compat.common import recorddict_compat as compat
    from flwr.proto.transport_pb2 import ClientMessage, Reason, ServerMessage
    from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH

    limit = min(max_message or GRPC_MAX_MESSAGE_LENGTH, GRPC_MAX_MESSAGE_LENGTH)
    channel = grpc.insecure_channel(address, options=[  # (Flower's create_channel's, and pings)
        ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),  # (else 60 s here)
        ("grpc.http2.max_pings_without_data", 0)])
    outbox: queue.Queue = queue.Queue(maxsize=1)
    join = channel.stream_stream(JOIN, request_serializer=_Outgoing.serialize,
                                 response_deserializer=ServerMessage.FromString)
    incoming = join(iter(outbox.get, None))

    def receive():
        proto = next(incoming)
        kind = proto.WhichOneof("msg")
        if kind == "fit_ins":
            content = compat.fitins_to_recorddict(serde.fit_ins_from_proto(proto.fit_ins), False)
            mtype = MessageType.TRAIN
        elif kind == "evaluate_ins":
            content = compat.evaluateins_to_recorddict(
                serde.evaluate_ins_from_proto(proto.evaluate_ins), False)
            mtype = MessageType.EVALUATE
        elif kind == "reconnect_ins":
            return Reconnect(int(proto.reconnect_ins.seconds))
        elif kind == "get_properties_ins":
            return Query(dict(serde.get_properties_ins_from_proto(proto.get_properties_ins).config))
        else:
            raise UserError(f"the fleet server sent a '{kind}' instruction, which an "
                            "instant-runtime fleet client does not answer; run "
                            "`instant-runtime fleet server` on the server side")
        del proto  # the received bytes now live in the message's records only
        meta = Metadata(run_id=0, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(),
                        ttl=DEFAULT_TTL, message_type=mtype)
        return make_message(meta, content)

    def send(reply) -> None:
        mtype = reply.metadata.message_type
        if mtype == MessageType.TRAIN:
            res = compat.recorddict_to_fitres(reply.content, False)  # empties the reply
            out = ClientMessage()
            fit = out.fit_res
            fit.status.CopyFrom(serde.status_to_proto(res.status))
            tensors = res.parameters.tensors
            for i in range(len(tensors)):  # one tensor at a time: no second full copy
                fit.parameters.tensors.append(tensors[i])
                tensors[i] = b""
            fit.parameters.tensor_type = res.parameters.tensor_type
            fit.num_examples = res.num_examples
            for k, v in serde.metrics_to_proto(res.metrics or {}).items():
                fit.metrics[k].CopyFrom(v)
            del res, tensors, fit
        elif mtype == MessageType.EVALUATE:
            out = ClientMessage(evaluate_res=serde.evaluate_res_to_proto(
                compat.recorddict_to_evaluateres(reply.content)))
        else:
            raise ValueError(f"cannot send a '{mtype}' reply over this transport")
        outbox.put(_Outgoing(out), block=False)

    def answer(properties: dict) -> None:
        """Reply to a :class:`Query`."""
        from flwr.common import Code, GetPropertiesRes, Status

        res = GetPropertiesRes(status=Status(code=Code.OK, message="Success"),
                               properties=properties)
        outbox.put(_Outgoing(ClientMessage(
            get_properties_res=serde.get_properties_res_to_proto(res))), block=False)

    def flush(timeout: float) -> None:
        """Wait (at most ``timeout`` s) until gRPC has taken what was sent."""
        end = time.monotonic() + timeout
        while not outbox.empty() and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))  # on its way out of the socket

    def disconnect(rec: Reconnect) -> None:
        reason = Reason.RECONNECT if rec.seconds else Reason.ACK
        msg = ClientMessage(disconnect_res=ClientMessage.DisconnectRes(reason=reason))
        outbox.put(_Outgoing(msg), block=False)

    try:
        yield receive, send, disconnect, answer, flush
    finally:
        channel.close()
