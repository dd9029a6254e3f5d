"""Progress inside long rounds (clients finished / sent, elapsed, ETA) and ``--quiet``."""

import logging
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from simulations import progress
from simulations.grids import InMemoryGrid
from simulations.progress import RoundProgress
from simulations.quiet import QUIET_ENV, quiet_run_logs
from simulations.run import main


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_round_progress_logs_every_ten_seconds_with_a_hand_computed_eta(caplog):
    clock = FakeClock()
    bar = RoundProgress(total=10, server_round=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="fedpeft.progress"):
        clock.now += 4
        bar.add(2)  # 4 s: a short round says nothing
        clock.now += 8
        bar.add(2)  # 12 s, 4 of 10 done: 3 s per client, 6 left -> 18 s
        clock.now += 5
        bar.add(1)  # 17 s: only 5 s since the last line
        clock.now += 63
        bar.add(0)  # 80 s, 5 of 10: 16 s per client, 5 left -> 80 s
        clock.now += 30
        bar.add(5)  # all finished: the round's own line says the rest
    assert [r.getMessage() for r in caplog.records] == [
        "round 3: 4/10 clients finished, 12 s elapsed, ETA 18 s",
        "round 3: 5/10 clients finished, 1 min 20 s elapsed, ETA 1 min 20 s",
    ]


def test_round_progress_before_the_first_reply_says_the_eta_is_unknown():
    clock = FakeClock()
    bar = RoundProgress(total=4, server_round=0, clock=clock)
    clock.now += 11
    assert bar.line() == "set-up: 0/4 clients finished, 11 s elapsed, ETA unknown until a client finishes"


def test_the_in_process_grid_reports_clients_as_they_finish(caplog, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.05)

    def slow_client(msg, context):
        time.sleep(0.06)
        return Message(RecordDict(), reply_to=msg)

    grid = InMemoryGrid(slow_client, run_config={}, node_configs=[{}, {}, {}])
    config = RecordDict({"config": ConfigRecord({"server-round": 2})})
    messages = [grid.create_message(config, "train", node, "") for node in grid.get_node_ids()]
    with caplog.at_level(logging.INFO, logger="fedpeft.progress"):
        replies = grid.send_and_receive(messages)
    assert len(replies) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["round 2: 1/3 clients finished", "round 2: 2/3 clients finished"]


@pytest.fixture
def restore_loggers(monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    levels = {name: logging.getLogger(name).level for name in ("fedpeft", "flwr")}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_keeps_warnings_and_drops_progress_and_round_lines(restore_loggers):
    quiet_run_logs(quiet=True)
    assert not logging.getLogger("fedpeft.progress").isEnabledFor(logging.INFO)
    assert not logging.getLogger("fedpeft.sweep").isEnabledFor(logging.INFO)
    assert not logging.getLogger("flwr").isEnabledFor(logging.INFO)
    assert logging.getLogger("fedpeft").isEnabledFor(logging.WARNING)


def test_verbose_and_quiet_together_are_refused(capsys, restore_loggers):
    assert main(["simulate", "x.toml", "--verbose", "--quiet"]) == 2
    assert "--verbose and --quiet contradict" in capsys.readouterr().err
