"""Fleet training: federated averaging of a training bundle over Flower (``flwr``).

``instant-runtime fleet server BUNDLE`` runs Flower's FedAvg; every ``instant-runtime fleet client
BUNDLE --data DATA`` is one device training its own data with our runtime under its ``--budget``.
Only the trainable tensors travel (the server's initial ones, then each round's aggregate, and
each client's update back); frozen weights, data and optimizer state never leave the device.

Modules: ``local`` (the one adapter to the training runtime), ``client`` (the ``ClientApp`` and the
device loop), ``transport`` (the client's end of the gRPC stream), ``server`` (the strategy and
the gRPC server), ``cli`` (``add_fleet_parser``,
``cmd_fleet``). Importing this package imports neither Flower nor torch.

Which of Flower's ways to run, and why (Flower 1.42):

* **Chosen: Flower's gRPC bidirectional-stream Fleet API** (``grpc-bidi``), the transport behind
  the deprecated-but-present ``flwr.server.start_server`` / ``flwr.client.start_client``. Our own
  CLI processes are the server and the clients: the server process runs Flower's
  ``start_grpc_server``, ``Server``, ``SimpleClientManager``, ``FedAvg`` and ``run_fl``; each client
  process joins Flower's ``FlowerService`` stream over a Flower channel (``transport``: Flower's
  message types and converters, the reply's tensors moved one at a time) and runs a Flower
  ``ClientApp``. The strategy is Flower's
  legacy ``flwr.server.strategy.FedAvg`` (the one this server API drives; it accepts failures and
  has ``min_fit_clients`` / ``min_available_clients``).
* **Not chosen: SuperLink / SuperNode** (``flower-superlink``, ``flower-supernode``, ``flwr run``).
  In 1.42 the SuperNode-SuperLink Fleet API is HTTP (FastAPI/uvicorn), not gRPC; the ServerApp
  runs in a process the SuperLink starts, and each ``ClientApp`` in a process the SuperNode
  starts, from a FAB (a packaged Flower app) submitted with ``flwr run``. So neither our server
  nor our client would be our CLI process, and a device would hold two Python processes that
  each import Flower (the SuperNode alone imports FastAPI, SQLAlchemy and uvicorn): well over a
  256 MB budget before the model loads.
* **Not used: the simulation engine** (needs ray; the loopback test runs real processes).

Trade-offs of the choice: ``start_server``/``start_client`` are deprecated since Flower 1.13 and
the parts we assemble live in internal modules, so Flower is pinned to ``1.42.*`` (checked at
start with a one-line error). The server's strategy API is the legacy one: a ``ClientApp``
written for it receives Flower's FitIns/EvaluateIns record layout, which the client decodes with
Flower's own converters. grpc-bidi has no node IDs, no TLS set-up here, and no SuperNode
authentication; each round's config carries the fleet protocol, Flower version and model
signature so a mismatched client refuses with one line instead of averaging nonsense.
The client does not call ``start_client`` itself: it runs the same receive/handle/send loop over
the same transport, because importing ``start_client`` also imports Flower's FAB installer and
SQL-backed node state (measured: +38 MB RSS, unused with this transport). Flower's import cost
that remains (grpc, protobuf, and everything ``import flwr`` pulls in) is measured in the README.
"""
