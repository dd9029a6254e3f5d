"""Fast unit tests of the Flower apps' pieces: the ClientApp's handlers, the ledger, the handshake.

Everything runs in this process (simulations/grids.py InMemoryGrid, the real ClientApp), no Ray.
"""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft.comm import DOWN, UP, Ledger, message_bytes, payload_bytes
from fedpeft.records import record_to_state, state_to_record
from fedpeft.tasks import load_task
from simulations.client_app import build_client_app
from simulations.grids import InMemoryGrid, MeteringGrid
from simulations.server_app import discover_partitions
from strategies.base import CONTRACT_KEY, KIND_DELTA
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def grid_and_cfg():
    cfg = tiny_config()
    configs = [{"partition-id": p, "num-partitions": 3} for p in range(3)]
    return InMemoryGrid(build_client_app(), run_config=cfg.to_flat(), node_configs=configs), cfg


def _train_message(node: int, state: dict, mode: str | None = "first-order") -> Message:
    config = ConfigRecord({"server-round": 1} | ({"mode": mode} if mode else {}))
    content = RecordDict({"arrays": state_to_record(state), "config": config})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def test_the_handshake_maps_every_partition_to_its_node_and_meters_the_replies(grid_and_cfg):
    grid, cfg = grid_and_cfg
    ledger = Ledger()
    assert discover_partitions(grid, cfg, ledger) == {0: 1000, 1: 1001, 2: 1002}
    assert [(r.round, r.partition_id, r.direction, r.kind) for r in ledger.rows] == [
        (0, 0, UP, "setup"),
        (0, 1, UP, "setup"),
        (0, 2, UP, "setup"),
    ]


def test_the_train_handler_replies_with_a_delta_of_the_adapters_shapes_and_says_so(grid_and_cfg):
    grid, cfg = grid_and_cfg
    initial = load_task(cfg).initial_state
    (reply,) = grid.send_and_receive([_train_message(1001, initial)])
    assert not reply.has_error()
    assert reply.content[CONTRACT_KEY]["kind"] == KIND_DELTA
    delta = record_to_state(reply.content["arrays"])
    assert {k: v.shape for k, v in delta.items()} == {k: v.shape for k, v in initial.items()}
    assert any(np.abs(v).max() > 0 for v in delta.values())  # it trained
    metrics = reply.content["metrics"]
    assert metrics["partition-id"] == 1 and metrics["num-examples"] == 2 * cfg.train.batch_size


def test_a_train_message_from_a_stock_flower_strategy_is_refused_with_the_reason(grid_and_cfg):
    grid, cfg = grid_and_cfg
    (reply,) = grid.send_and_receive([_train_message(1000, load_task(cfg).initial_state, mode=None)])
    assert reply.has_error()
    assert "replies with PEFT deltas" in reply.error.reason and "fedpeft strategy" in reply.error.reason


def test_the_metering_grid_records_every_message_and_reply_with_exact_bytes(grid_and_cfg):
    grid, cfg = grid_and_cfg
    ledger = Ledger()
    metered = MeteringGrid(grid, ledger, partition_of=lambda node: node - 1000)
    initial = load_task(cfg).initial_state
    sent = [_train_message(1000, initial), _train_message(1002, initial)]
    down = [(payload_bytes(m.content), message_bytes(m.content)) for m in sent]
    replies = list(metered.send_and_receive(sent, timeout=60))
    numel = sum(v.size for v in initial.values())
    rows = ledger.rows
    assert [(r.round, r.partition_id, r.direction) for r in rows] == [
        (1, 0, DOWN),
        (1, 2, DOWN),
        (1, 0, UP),
        (1, 2, UP),
    ]
    assert [(r.payload_bytes, r.message_bytes) for r in rows[:2]] == down
    assert all(r.payload_bytes == 4 * numel for r in rows)
    assert [r.message_bytes for r in rows[2:]] == [message_bytes(r.content) for r in replies]


def test_an_error_reply_from_the_superlink_is_attributed_to_the_node_the_message_went_to(grid_and_cfg, task_identity):
    from flwr.app import Error

    grid, _ = grid_and_cfg
    metered = MeteringGrid(grid, Ledger(), partition_of=lambda node: node - 1000 if node >= 1000 else -1)
    query = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1002, message_type=MessageType.TRAIN)
    query.metadata.__dict__["_message_id"] = "m1"  # what a grid's push sets
    from_link = Message(Error(code=0, reason="heartbeat lost"), reply_to=query)
    from_link.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a dead node
    (fixed,) = metered.attribute_superlink_errors([from_link], [query])
    assert fixed.metadata.src_node_id == 1002 and fixed.error.reason == "node unavailable: heartbeat lost"


def test_a_client_that_raises_becomes_an_error_reply_with_its_own_exception():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise FloatingPointError("local loss became nan at step 0; lower train.lr")

    grid = InMemoryGrid(app, run_config={}, node_configs=[{"partition-id": 0}])
    msg = Message(RecordDict({"arrays": ArrayRecord()}), dst_node_id=1000, message_type=MessageType.TRAIN)
    (reply,) = grid.send_and_receive([msg])
    assert reply.error.reason == "FloatingPointError: local loss became nan at step 0; lower train.lr"
