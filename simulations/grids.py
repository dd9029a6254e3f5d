"""Grids around Flower's: one that meters every message, one that runs the ClientApp in-process.

:class:`MeteringGrid` wraps any Flower ``Grid`` (simulation engine, SuperLink) and records
every message it sends and every reply it receives in the byte ledger: it is the only
byte counter, so ``Strategy.start`` needs no help to account communication. It also
turns the SuperLink's own error replies (a node that stopped heart-beating is answered
for by the SuperLink, from its own node id) into errors from the node the message went
to, so the strategy records them as that partition's failure.

:class:`InMemoryGrid` delivers each message by calling the ClientApp's handlers directly
in this process, one after another. Flower has no in-process grid for a ClientApp object
(its simulation engine always starts Ray); sweeps and benchmarks use this one to drive
exactly the same ``ServerApp`` code and ``Strategy.start`` loop without Ray's start-up and
per-actor memory. Client failures become error replies carrying the client's own
exception type and message, as Flower's engine does.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.comm import DOWN, UP, Ledger
from simulations.interrupt import check_stop
from simulations.progress import RoundProgress

log = logging.getLogger(__name__)


class DelegatingGrid(Grid):
    """A Grid around another one: run bookkeeping and node listing go to ``self.grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run_id: int) -> None:
        """Delegated."""
        self.grid.set_run(run_id)

    @property
    def run(self):
        """Delegated."""
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        """A message as Flower's grids create it."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.grid.get_node_ids()


def message_round(msg: Message) -> int:
    """The server round a message belongs to (its config's ``server-round``; 0 = set-up)."""
    config = msg.content.config_records.get("config") if not msg.has_error() else None
    return int(config.get("server-round", 0)) if config is not None else 0


def message_kind(msg: Message) -> str:
    """The ledger kind of a message: ``train``, ``evaluate`` (per-client evaluation, off the byte axis) or ``setup``."""
    for kind in ("train", "evaluate"):
        if msg.metadata.message_type.startswith(kind):
            return kind
    return "setup"


def collect_replies(
    pull: Callable[[set[str]], Iterable[Message]],
    pending: set[str],
    sent: list[Message],
    timeout: float | None,
    interval_s: float,
) -> list[Message]:
    """Flower's push-then-poll wait: ``pull`` until every id in ``pending`` has its reply or ``timeout`` passes.

    Written here (not Flower's ``send_and_receive``) so that a Ctrl-C (simulations/interrupt.py) ends the
    wait within one poll interval and the round's progress line counts replies as they come.
    """
    progress = RoundProgress(total=len(sent), server_round=message_round(sent[0]) if sent else 0)
    deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
    received: list[Message] = []
    while pending:
        check_stop()
        got = list(pull(pending))
        received.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        progress.add(len(got))
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    return received


class MeteringGrid(DelegatingGrid):
    """Records every message sent and every reply received in ``ledger`` (see the module docstring).

    Parameters
    ----------
    grid : Grid
        The grid that carries the messages.
    ledger : Ledger
        Where rows go: round, partition, direction, payload and message bytes.
    partition_of : callable
        Flower node id -> partition id (-1 for unknown ids such as the SuperLink's).
    """

    def __init__(self, grid: Grid, ledger: Ledger, partition_of: Callable[[int], int]) -> None:
        super().__init__(grid)
        self.ledger = ledger
        self.partition_of = partition_of
        self.poll_interval_s = 0.1

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Record each message as downlink, then push it."""
        messages = list(messages)
        self._record_sent(messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies and record them as uplink."""
        replies = list(self.grid.pull_messages(message_ids))
        self._record_received(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send, wait for replies (:func:`collect_replies`), record both directions; SuperLink errors are re-attributed."""
        check_stop()
        messages = list(messages)
        if not messages:
            return []
        self._record_sent(messages)
        pending = set(self.grid.push_messages(messages))
        received = collect_replies(self.grid.pull_messages, pending, messages, timeout, self.poll_interval_s)
        replies = self.attribute_superlink_errors(received, messages)
        self._record_received(replies, round_of={m.metadata.message_id: message_round(m) for m in messages})
        return replies

    def attribute_superlink_errors(self, replies: list[Message], sent: list[Message]) -> list[Message]:
        """Replace an error reply from an unknown node by the same error from the node it was sent to."""
        by_id = {m.metadata.message_id: m for m in sent}
        out = []
        for reply in replies:
            original = by_id.get(reply.metadata.reply_to_message_id)
            if reply.has_error() and self.partition_of(reply.metadata.src_node_id) < 0 and original is not None:
                error = Error(code=reply.error.code, reason=f"node unavailable: {reply.error.reason}")
                reply = Message(error, reply_to=original)
            out.append(reply)
        return out

    def _record_sent(self, messages: list[Message]) -> None:
        for msg in messages:
            kind = message_kind(msg)
            pid = self.partition_of(msg.metadata.dst_node_id)
            self.ledger.record_message(message_round(msg), pid, DOWN, msg.content, kind=kind)

    def _record_received(self, replies: list[Message], round_of: dict[str, int] | None = None) -> None:
        for reply in replies:
            if reply.has_error():
                continue
            kind = message_kind(reply)
            round_ = (round_of or {}).get(reply.metadata.reply_to_message_id, 0) if kind != "setup" else 0
            pid = self.partition_of(reply.metadata.src_node_id)
            self.ledger.record_message(round_, pid, UP, reply.content, kind=kind)


class InMemoryGrid(Grid):
    """Delivers messages by calling ``client_app(message, context)`` in this process.

    Parameters
    ----------
    client_app : callable
        A Flower ``ClientApp`` (or anything with its call signature).
    run_config : dict
        Flower's run config every node sees (flat experiment keys).
    node_configs : list of dict
        One node config per node (e.g. ``{"partition-id": i, "num-partitions": n}``).
    run_id : int
        The run id messages carry.
    reply_timeout_s : float, optional
        A reply whose handling took longer is dropped, as if it arrived after the round's
        timeout (clients run one after another here, so each is timed on its own).
    """

    def __init__(
        self,
        client_app,
        run_config: dict,
        node_configs: list[dict],
        run_id: int = 1,
        reply_timeout_s: float | None = None,
    ) -> None:
        self.client_app = client_app
        self.reply_timeout_s = reply_timeout_s
        self._run_id = run_id
        self.node_ids = [1000 + i for i in range(len(node_configs))]
        self.contexts = {
            node: Context(
                run_id=run_id, node_id=node, node_config=dict(conf), state=RecordDict(), run_config=run_config
            )
            for node, conf in zip(self.node_ids, node_configs, strict=True)
        }
        self._replies: dict[str, Message] = {}
        self._task_ids = itertools.count(1)
        self._as_server()

    def _as_server(self) -> None:
        # Flower's Message() reads the process's task identity; a ServerApp process has one.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self._run_id, SUPERLINK_NODE_ID, 0

    def set_run(self, run_id: int) -> None:
        """Nothing to do: the run is fixed at construction."""

    @property
    def run(self):
        """Not available in process (no SuperLink run record)."""
        raise NotImplementedError("InMemoryGrid has no Flower Run object")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        """A message as Flower's grids create it."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every node, always online."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply waits for :meth:`pull_messages`."""
        messages = list(messages)
        ids = []
        progress = RoundProgress(total=len(messages), server_round=message_round(messages[0]) if messages else 0)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's own grids do
            t0 = time.monotonic()
            reply = self._deliver(msg)
            if self.reply_timeout_s is None or time.monotonic() - t0 <= self.reply_timeout_s:
                self._replies[msg.metadata.message_id] = reply
            else:
                log.warning(
                    "node %d replied after the %.1f s timeout; dropped", msg.metadata.dst_node_id, self.reply_timeout_s
                )
            ids.append(msg.metadata.message_id)
            progress.add(1)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these message ids, in the order the messages were pushed."""
        wanted = set(message_ids)
        return [self._replies.pop(i) for i in list(self._replies) if i in wanted]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver every message in order and return the replies."""
        return list(self.pull_messages(self.push_messages(messages)))

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node}"), reply_to=msg)
        TaskIdentity.node_id, TaskIdentity.task_id = node, next(self._task_ids)
        t0 = time.monotonic()
        try:
            reply = self.client_app(msg, self.contexts[node])
        except Exception as err:  # a client failure is a reply, as in Flower's engine
            log.warning("node %d raised %s: %s", node, type(err).__name__, err)
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=msg
            )
        finally:
            self._as_server()
        log.debug("node %d handled %s in %.2f s", node, msg.metadata.message_type, time.monotonic() - t0)
        return reply
