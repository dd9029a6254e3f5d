"""Shared-seed SPSA with one-byte projected gradients (Zelikman et al. 2023, "Just One Byte";
MeZO, Malladi et al. 2023; replay-based catch-up as in DeComFL, Li et al. 2025).

Round ``r``: each online client ``i`` catches up to the global adapter ``theta_r``, runs
``K`` local two-point SPSA steps from it (``theta <- theta - lr_r g_hat_ik z_ik``, the
directions ``z_ik = z(seed(run seed, r, i, k))`` derived, never sent) and uploads its
``K`` one-byte codes. The server decodes them and replays every step on ``theta_r`` in
(partition id, step) order:

    theta_{r+1} = theta_r - (server_lr / m) * sum_i sum_k lr_r * g_hat_ik * z_ik,

with ``m`` the number of accepted clients. Since client ``i``'s local displacement is
``Delta_i = -sum_k lr_r g_hat_ik z_ik`` exactly, this is FedAvg with *uniform* weights
``1/m`` (not example weights; every client runs the same K steps of the same batch size)
of the clients' zeroth-order updates, scaled by ``server_lr``.

Downlink (all of it counted by the byte ledger): a 16-byte header (scale and lr of round
``r``, 8-byte hash of ``theta_r``) plus, for a client last synced at round ``t``, the log
of rounds ``t..r-1`` without its own codes (a client present in round ``r-1`` receives
only the others' codes of ``r-1``). When that log would be at least as large as the
adapter (``4 |theta|`` bytes), or the server does not know the client's state (never
seen after a failure, a rejected reply, a hash mismatch), the full adapter is sent
instead. The client checks the hash after catching up and reports a mismatch.

Torch: the directions z are torch's CPU generator stream (what the clients draw), and the
server keeps its fp32 master copy as torch tensors so replaying gives the clients' bits;
torch is imported when the strategy is built, not when this module is imported.

The codec scale ``s_{r+1}`` is ``scale_multiplier x median |g_hat|`` of round ``r``
(``scale_rule="median"``) or fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft import onebyte
from fedpeft.records import record_to_state, state_to_record
from fedpeft.state import DeltaError, State
from fedpeft.zo_log import RoundLog, f32, pack_header, pack_log, replay_round
from strategies.base import KIND_SPSA, Reporter, no_report
from strategies.screening import ReplyScreen, summarise_metrics

log = logging.getLogger(__name__)


def next_scale(g_hat: np.ndarray, scale: float, *, rule: str, multiplier: float) -> float:
    """The codec scale of the next round: ``multiplier x median |g_hat|`` (float32).

    Falls back to the mean |g_hat| when the median is 0, and keeps ``scale`` when every
    value is 0 or ``rule == "fixed"``.
    """
    a = np.abs(np.asarray(g_hat, dtype=np.float64))
    if rule == "fixed" or a.size == 0 or not np.any(a > 0):
        return scale
    centre = float(np.median(a)) or float(np.mean(a))
    return f32(multiplier * centre)


class SharedSeedSPSA(FedAvg):
    """Server side of shared-seed SPSA; holds theta, the log and what each client holds.

    Parameters
    ----------
    initial_state : dict of name -> ndarray
        ``theta_1`` (= the seeded initial adapter every client builds by itself).
    run_seed : int
        The run seed all direction seeds derive from.
    local_steps, lr, lr_schedule, codec, scale_rule, scale_multiplier, initial_scale, distribution
        See ``SpsaConfig`` in ``fedpeft/config.py``.
    server_lr : float
        Multiplies the 1/m average (1.0 is plain FedAvg of the ZO updates).
    node_selector, partition_of, report
        As in :class:`~strategies.peft_strategy.PeftStrategy`.
    """

    client_mode = "spsa"
    expected_kind = KIND_SPSA

    def __init__(
        self,
        *,
        initial_state: State,
        run_seed: int,
        local_steps: int = 20,
        lr: float = 1e-4,
        lr_schedule: str = "constant",
        codec: str = "int8",
        scale_rule: str = "median",
        scale_multiplier: float = 3.0,
        initial_scale: float = 1.0,
        distribution: str = "gaussian",
        server_lr: float = 1.0,
        node_selector: Callable[[int, Grid], list[int]] | None = None,
        partition_of: Callable[[int], int] | None = None,
        report: Reporter | None = None,
    ) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.server_lr = server_lr
        self.node_selector = node_selector
        self.partition_of = partition_of or (lambda node_id: node_id)
        self.report = report if report is not None else no_report
        self.screen = ReplyScreen(expected_kind=self.expected_kind, partition_of=self.partition_of, report=self.report)
        from fedpeft.zo import lr_at, state_hash, to_master, to_state  # torch: see the module docstring

        self._lr_at, self._state_hash, self._to_master, self._to_state = lr_at, state_hash, to_master, to_state
        self.master = to_master(initial_state)
        self.adapter_bytes = 4 * sum(int(a.size) for a in initial_state.values())
        self.run_seed, self.local_steps, self.codec, self.distribution = run_seed, local_steps, codec, distribution
        self.lr, self.lr_schedule = lr, lr_schedule
        self.scale_rule, self.scale_multiplier = scale_rule, scale_multiplier
        self.scale = f32(initial_scale)
        self.log: list[RoundLog] = []
        self.hashes: dict[int, str] = {1: state_hash(self.master).hex()}
        # partition id -> round t whose start state theta_t (plus its own round-t codes) it holds;
        # missing = a fresh client (theta_1); None = unknown, send the full adapter.
        self.synced: dict[int, int | None] = {}
        self.downloads: dict[str, int] = {"log": 0, "full": 0}

    @classmethod
    def from_config(cls, cfg, ctx) -> SharedSeedSPSA:
        """Build from an ``ExperimentConfig`` and a :class:`~strategies.base.StrategyContext`."""
        if ctx.initial_state is None:
            raise ValueError("SPSA replays from the initial adapter: pass StrategyContext(initial_state=...)")
        s = cfg.spsa
        return cls(
            initial_state=ctx.initial_state,
            run_seed=cfg.seed,
            local_steps=s.local_steps,
            lr=s.lr,
            lr_schedule=s.lr_schedule,
            codec=s.codec,
            scale_rule=s.scale_rule,
            scale_multiplier=s.scale_multiplier,
            initial_scale=s.initial_scale,
            distribution=s.distribution,
            server_lr=cfg.strategy.server_lr,
            node_selector=ctx.node_selector,
            partition_of=ctx.partition_of,
            report=ctx.report,
        )

    def summary(self) -> None:
        """Log the settings (called by ``Strategy.start``)."""
        log.info(
            "SharedSeedSPSA: %d local steps, lr %g (%s), codec %s, server_lr %g",
            self.local_steps, self.lr, self.lr_schedule, self.codec, self.server_lr,
        )  # fmt: skip

    def client_dp_refusal(self) -> str:
        """SPSA replies are one-byte codes, not deltas a client-level DP wrapper could clip."""
        return (
            "dp.mode='client' clips array deltas, but SPSA clients send one-byte codes; "
            "use dp.mode='sample' with strategy.name='spsa' (DPZero: clip + noise each projected gradient)"
        )

    def round_lr(self, server_round: int) -> float:
        """The float32 learning rate of ``server_round``."""
        return f32(self._lr_at(self.lr, self.lr_schedule, server_round))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Per node: header + log tail (bytes), or header + full adapter when that is cheaper."""
        given = record_to_state(arrays)
        if self._state_hash(given) != self._state_hash(self.master):
            log.warning("round %d: the server state differs from SPSA's replayed state; resyncing all", server_round)
            self.master, self.synced = self._to_master(given), dict.fromkeys(self.synced)
        self._fill_skipped_rounds(server_round)
        header = pack_header(self.scale, self.round_lr(server_round), self._state_hash(self.master))
        nodes = self.node_selector(server_round, grid) if self.node_selector else sorted(grid.get_node_ids())
        self.downloads = {"log": 0, "full": 0}
        messages = []
        for node in nodes:
            pid = self.partition_of(node)
            base = self.synced.get(pid, 1)
            tail = pack_log(self.log[base - 1 : server_round - 1], yours=pid) if base is not None else None
            conf = ConfigRecord(
                {**dict(config), "mode": self.client_mode, "server-round": server_round, "spsa-header": header}
            )
            content = RecordDict({self.configrecord_key: conf})
            if tail is None or len(tail) >= self.adapter_bytes:
                content[self.arrayrecord_key] = state_to_record(self._to_state(self.master))
                self.downloads["full"] += 1
            else:
                conf["spsa-base-round"] = base
                if tail:  # Flower's count_bytes() rejects an empty bytes value
                    conf["spsa-log"] = tail
                self.downloads["log"] += 1
            self.synced[pid] = None  # known again only once its reply is accepted
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self.screen.sent(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the accepted codes, replay them in (partition, step) order, log the round."""
        self._fill_skipped_rounds(server_round)
        accepted = self.accept_codes(server_round, replies)
        weight = f32(self.server_lr / len(accepted)) if accepted else f32(1.0)
        scale, lr = self.scale, self.round_lr(server_round)
        entry = RoundLog(server_round, scale, lr, weight, tuple((pid, codes) for pid, codes, _ in accepted))
        replay_round(self.master, entry, run_seed=self.run_seed, codec=self.codec, distribution=self.distribution)
        self.log.append(entry)
        self.hashes[server_round + 1] = self._state_hash(self.master).hex()
        for pid, _, _ in accepted:
            self.synced[pid] = server_round
        g_hat = np.concatenate(
            [onebyte.decode(onebyte.from_bytes(c, self.codec), scale, codec=self.codec) for _, c, _ in accepted] or [[]]
        )
        self.scale = next_scale(g_hat, scale, rule=self.scale_rule, multiplier=self.scale_multiplier)
        extras = {
            "spsa_scale": scale,
            "spsa_lr": lr,
            "spsa_weight": weight,
            "spsa_clipped_fraction": float(np.mean(np.abs(g_hat) >= scale)) if g_hat.size else 0.0,
            "spsa_state_hash": self.hashes[server_round + 1],
            "spsa_log_downloads": self.downloads["log"],
            "spsa_full_downloads": self.downloads["full"],
        }
        metrics = summarise_metrics(accepted, [weight] * len(accepted)) if accepted else None
        self.screen.finish(server_round, accepted, train_metrics=dict(metrics or {}), **extras)
        return state_to_record(self._to_state(self.master)), metrics

    def accept_codes(self, server_round: int, replies: Iterable[Message]) -> list[tuple[int, bytes, dict]]:
        """``(partition id, codes, metrics)`` of valid replies, sorted by partition id."""

        def parse(msg: Message, metrics: dict) -> bytes:
            reason = self._check_reply(msg, metrics)
            if reason:
                raise DeltaError(reason)
            return bytes(msg.content["spsa"]["codes"])

        return self.screen.screen(server_round, replies, parse)

    def _check_reply(self, msg: Message, metrics: dict) -> str:
        if metrics.get("spsa-desync"):
            return "client state hash did not match after catch-up (it gets the full adapter next time)"
        record = msg.content.config_records.get("spsa")
        codes = record.get("codes") if record is not None else None
        if not isinstance(codes, bytes):
            return "reply has no 'spsa' ConfigRecord with a bytes 'codes' value"
        if len(codes) != self.local_steps:
            return f"reply has {len(codes)} codes, expected spsa.local-steps={self.local_steps}"
        try:
            onebyte.decode(onebyte.from_bytes(codes, self.codec), self.scale, codec=self.codec)
        except ValueError as err:
            return str(err)
        return ""

    def _fill_skipped_rounds(self, server_round: int) -> None:
        # Rounds where nobody replied never reach aggregate_train; log them as empty.
        while len(self.log) < server_round - 1:
            r = len(self.log) + 1
            self.log.append(RoundLog(r, self.scale, self.round_lr(r), f32(1.0), ()))
            self.hashes[r + 1] = self.hashes[r]

    def checkpoint_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The fp32 master, the whole log (codes as hex), hashes, the next scale, what each client holds."""
        meta = {
            "scale": self.scale,
            "hashes": {str(k): v for k, v in self.hashes.items()},
            "synced": {str(p): r for p, r in self.synced.items()},
            "log": [
                {"round": e.round, "scale": e.scale, "lr": e.lr, "weight": e.weight,
                 "entries": [[pid, None if c is None else c.hex()] for pid, c in e.entries]}
                for e in self.log
            ],
        }  # fmt: skip
        return meta, {f"master/{k}": v for k, v in self._to_state(self.master).items()}

    def restore_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Reload :meth:`checkpoint_state`. Restarted clients lost their synced adapters: each gets the
        full adapter once (extra downlink a real restart causes), a never-seen client still starts
        from the seeded theta_1."""
        self.master = self._to_master({k.removeprefix("master/"): v for k, v in arrays.items()})
        self.scale = float(meta["scale"])
        self.hashes = {int(k): v for k, v in meta["hashes"].items()}
        self.synced = {int(p): None for p in meta["synced"]}
        self.log = [
            RoundLog(e["round"], e["scale"], e["lr"], e["weight"],
                     tuple((pid, None if c is None else bytes.fromhex(c)) for pid, c in e["entries"]))
            for e in meta["log"]
        ]  # fmt: skip

    def state_for_results(self) -> dict:
        """The ordered log (round, partition, codes, scale, lr, weight) and per-round hashes."""
        return {
            "codec": self.codec,
            "distribution": self.distribution,
            "run_seed": self.run_seed,
            "state_hash": dict(self.hashes),
            "log": [
                {
                    "round": e.round,
                    "scale": e.scale,
                    "lr": e.lr,
                    "weight": e.weight,
                    "codes": {str(pid): codes.hex() for pid, codes in e.entries},
                }
                for e in self.log
            ],
        }
