"""Cohort nodes: one Flower node (a worker) trains many simulated clients.

Flower's simulation engine runs one ClientApp actor per simulated client at a time; on a
small machine that wastes cores (one torch thread per actor, Ray's overhead) and memory
(a backbone per actor). With ``simulation.cohort-size = K`` the engine runs
``ceil(N / K)`` worker nodes instead; worker ``w`` owns partitions ``wK .. wK+K-1``.

Server side, :class:`CohortGrid` sits between the strategies and Flower's grid. It shows
the strategies one virtual node per partition (``VIRTUAL_BASE + partition id``), packs a
round's per-client messages for the partitions of one worker into one Flower message
(each distinct ArrayRecord once, e.g. the global adapter FedAvg sends to everyone), and
unpacks the worker's reply into one reply per client, so strategies and the metering grid
outside it see exactly what they would see with one client per node: the byte ledger
counts every client's own logical message as if sent alone. Client side, a Flower mod
(simulations/cohort_worker.py) unpacks a cohort, calls the rest of the ClientApp once per
client with that client's own context, and packs the replies; a client that gives no reply
(:class:`NoReply`) is listed under ``no-reply`` and handed out here as the failure the
strategy records for a client that timed out alone (``NO_REPLY``; the wait itself cannot
end early otherwise: Flower's Grid has no "no reply" outcome). Deployment is unchanged: one device, one client.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from simulations.grids import DelegatingGrid, collect_replies
from strategies.screening import NO_REPLY

log = logging.getLogger(__name__)

COHORT_KEY = "cohort"
ERROR_KEY = "error"
#: node-config key of a client's context inside a cohort worker (its value: the worker's index)
WORKER_KEY = "cohort-worker"
#: virtual node id of partition p (Flower's own node ids are random 63-bit integers)
VIRTUAL_BASE = 1 << 40


def num_workers(num_partitions: int, cohort_size: int) -> int:
    """How many Flower nodes hold ``num_partitions`` clients, ``cohort_size`` each."""
    return math.ceil(num_partitions / cohort_size)


def cohort_partitions(worker: int, num_partitions: int, cohort_size: int) -> list[int]:
    """The partitions worker ``worker`` owns: a contiguous block of ``cohort_size``."""
    if not 0 <= worker < num_workers(num_partitions, cohort_size):
        raise ValueError(f"worker {worker} outside 0..{num_workers(num_partitions, cohort_size) - 1}")
    return list(range(worker * cohort_size, min(num_partitions, (worker + 1) * cohort_size)))


# --- packing (both sides) ---------------------------------------------------------------


class NoReply(Exception):  # noqa: N818 (an outcome, not an error: the client stays silent)
    """Raised for a client of a cohort that gives no reply this round (an injected hang, simulations/faults.py)."""


def pack(contents: dict[int, RecordDict], no_reply: Iterable[int] = ()) -> RecordDict:
    """One RecordDict holding every client's records; an ArrayRecord shared by several is stored once.

    ``no_reply`` lists clients that give no reply at all (a worker's reply only).
    """
    packed = RecordDict()
    shared: dict[int, str] = {}
    refs: list[str] = []
    for pid, content in contents.items():
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                key = shared.setdefault(id(record), f"shared/{len(shared)}")
                if key not in packed:
                    packed[key] = record
                refs.append(f"{pid}|{name}|{key}")
            else:
                packed[f"{pid}/{name}"] = record
    config = ConfigRecord({"partitions": list(contents)})
    if refs:  # Flower's records reject empty lists
        config["array-refs"] = refs
    if no_reply := list(no_reply):
        config["no-reply"] = no_reply
    packed[COHORT_KEY] = config
    return packed


def unpack(packed: RecordDict) -> dict[int, RecordDict]:
    """The inverse of :func:`pack`: ``{partition id: its own RecordDict}``."""
    config = packed[COHORT_KEY]
    out = {int(pid): RecordDict() for pid in config["partitions"]}
    for key, record in packed.items():
        if key == COHORT_KEY or key.startswith("shared/"):
            continue
        pid, name = key.split("/", 1)
        out[int(pid)][name] = record
    for ref in config.get("array-refs", []):
        pid, name, key = ref.split("|")
        out[int(pid)][name] = packed[key]
    return out


def error_record(reason: str) -> RecordDict:
    """One client's failure inside a cohort reply: its own reason (``"<ExceptionType>: <message>"``)."""
    return RecordDict({ERROR_KEY: ConfigRecord({"reason": reason})})


# --- server side ---------------------------------------------------------------------------


class CohortGrid(DelegatingGrid):
    """Shows one virtual node per partition; packs each worker's messages into one (module docstring).

    Parameters
    ----------
    grid : Grid
        Flower's grid of worker nodes.
    num_partitions, cohort_size : int
        N and K.
    """

    def __init__(self, grid: Grid, num_partitions: int, cohort_size: int) -> None:
        super().__init__(grid)
        self.num_partitions, self.cohort_size = num_partitions, cohort_size
        self.worker_of: dict[int, int] = {}  # partition id -> worker node id
        self._waiting: dict[str, list[Message]] = {}  # packed message id -> the clients' messages
        self._ready: dict[str, Message] = {}  # virtual message id -> its reply

    def discover(self, wait_s: float) -> dict[int, int]:
        """Ask every worker which partitions it holds (waits up to ``wait_s`` for all of them)."""
        want = num_workers(self.num_partitions, self.cohort_size)
        deadline = time.monotonic() + wait_s
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        query = ConfigRecord({"query": "partition-ids"})
        messages = [
            Message(RecordDict({"config": query}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
        ]
        for reply in self.grid.send_and_receive(messages, timeout=wait_s):
            if reply.has_error():
                log.warning("worker %s failed the cohort query: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            for pid in reply.content["config"]["partition-ids"]:
                self.worker_of[int(pid)] = reply.metadata.src_node_id
        if not self.worker_of:
            raise RuntimeError("no worker node answered the cohort query")
        return dict(self.worker_of)

    def get_node_ids(self) -> Iterable[int]:
        """One virtual node per partition a worker holds."""
        return [VIRTUAL_BASE + pid for pid in sorted(self.worker_of)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Pack the messages per worker and push one message to each worker."""
        by_worker: dict[tuple[int, str], list[Message]] = {}
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's own grids do
            ids.append(msg.metadata.message_id)
            pid = msg.metadata.dst_node_id - VIRTUAL_BASE
            if pid not in self.worker_of:
                error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no worker holds partition {pid}")
                self._ready[msg.metadata.message_id] = Message(error, reply_to=msg)
                continue
            by_worker.setdefault((self.worker_of[pid], msg.metadata.message_type), []).append(msg)
        for (worker, message_type), group in by_worker.items():
            content = pack({m.metadata.dst_node_id - VIRTUAL_BASE: m.content for m in group})
            (packed_id,) = self.grid.push_messages([Message(content, dst_node_id=worker, message_type=message_type)])
            self._waiting[packed_id] = group
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the workers' replies and hand out one reply per client."""
        wanted = set(message_ids)
        if self._waiting:
            for reply in self.grid.pull_messages(list(self._waiting)):
                self._unpack_reply(reply, self._waiting.pop(reply.metadata.reply_to_message_id))
        return [self._ready.pop(i) for i in list(self._ready) if i in wanted]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then poll until every client's reply is in or ``timeout`` passes."""
        messages = list(messages)
        return collect_replies(self.pull_messages, set(self.push_messages(messages)), messages, timeout, 0.1)

    def _unpack_reply(self, reply: Message, group: list[Message]) -> None:
        if reply.has_error():  # the whole worker failed: every client in it did
            for msg in group:
                self._ready[msg.metadata.message_id] = Message(reply.error, reply_to=msg)
            return
        contents = unpack(reply.content)
        silent = set(reply.content[COHORT_KEY].get("no-reply", []))
        for msg in group:
            pid = msg.metadata.dst_node_id - VIRTUAL_BASE
            content = contents.get(pid)
            if pid in silent:  # recorded as if it had timed out alone (the worker's reply did arrive)
                out = Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason=NO_REPLY), reply_to=msg)
            elif content is None:
                out = Message(Error(code=ErrorCode.UNKNOWN, reason="missing from its worker's reply"), reply_to=msg)
            elif ERROR_KEY in content.config_records:
                out = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(content[ERROR_KEY]["reason"])),
                    reply_to=msg,
                )
            else:
                out = Message(content, reply_to=msg)
            self._ready[msg.metadata.message_id] = out
