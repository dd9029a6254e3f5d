"""Flower ServerApp: config -> participation -> strategy -> ``Strategy.start`` -> results file.

The round loop is Flower's own ``Strategy.start``. Around it: a handshake learns which
partition each node holds; the environment's participation model (unknown to the
strategy) is the strategy's node selector; a :class:`~simulations.grids.MeteringGrid`
counts every message in the byte ledger; the ``evaluate_fn`` (:class:`RunRecorder`)
scores the global adapter on the fixed held-out set and rewrites ``results.json`` every
round, joined with the strategies' round reports (aggregated, failed and rejected
partitions, FedAU weights, SPSA hashes, epsilon). A round with nobody online is recorded
and skipped; failed or rejected client replies are recorded, never applied.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedpeft import participation as participation_lib
from fedpeft.adapters import export_adapter, num_trainable, set_adapter_state
from fedpeft.comm import UP, Ledger
from fedpeft.config import ExperimentConfig
from fedpeft.privacy_plan import plan_privacy
from fedpeft.records import record_to_state, state_to_record
from fedpeft.results import default_run_dir, git_revision, load_results, package_versions, write_results
from fedpeft.rundir import RunDir
from fedpeft.task import set_threads
from fedpeft.tasks import load_task
from simulations.cohort import CohortGrid
from simulations.grids import MeteringGrid
from simulations.interrupt import RunInterrupted
from simulations.node_layout import flower_nodes
from simulations.quiet import quiet_libraries
from simulations.recorder import RunRecorder
from simulations.resume import Resumed, read_checkpoint
from strategies import StrategyContext, build_strategy

quiet_libraries()


def discover_partitions(grid: Grid, cfg: ExperimentConfig, ledger: Ledger) -> dict[int, int]:
    """Ask every connected node for its partition id: ``{partition id: node id}``.

    Flower node ids are random in simulation, so all per-client state is keyed by
    partition id. Waits up to ``simulation.node-wait-s`` for all partitions' nodes,
    then goes on with those present (a warning names the missing ones).
    """
    want = cfg.partition.num_partitions
    deadline = time.monotonic() + cfg.simulation.node_wait_s
    node_ids: list[int] = []
    while time.monotonic() < deadline:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= want:
            break
        time.sleep(0.5)
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"query": "partition-id"})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.simulation.node_wait_s):
        if reply.has_error():
            log(WARNING, "node %s failed the partition query: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        pid = int(reply.content["config"]["partition-id"])
        if pid in mapping:
            log(
                WARNING,
                "partition %d claimed by nodes %s and %s; keeping the first",
                pid,
                mapping[pid],
                reply.metadata.src_node_id,
            )
            continue
        mapping[pid] = reply.metadata.src_node_id
        ledger.record_message(0, pid, UP, reply.content, kind="setup")
    missing = sorted(set(range(want)) - set(mapping))
    if missing:
        log(WARNING, "no node holds partitions %s; they never train", missing)
    if not mapping:
        raise RuntimeError("no node answered the partition query; are SuperNodes connected?")
    return mapping


def server_threads(cfg: ExperimentConfig, own_process: bool) -> int:
    """Torch threads for the server's aggregation and evaluation (``simulation.server-threads``).

    A server in its own process (Flower's engine, deployment) evaluates while every client
    waits, so by default it takes every core it may use; in the in-process runner the
    clients share its process and its ``torch-threads``.
    """
    if cfg.simulation.server_threads > 0:
        return cfg.simulation.server_threads
    return len(os.sched_getaffinity(0)) if own_process else cfg.simulation.torch_threads


@dataclass(kw_only=True)
class OpenRun:
    """An experiment ready for its round loop: what :func:`open_run` set up and :func:`close_run` needs."""

    cfg: ExperimentConfig
    run_dir: Path
    task: Any  # fedpeft.task.Task
    ledger: Ledger
    grid: Grid  # metered: the only byte counter
    results: dict[str, Any]
    recorder: RunRecorder
    runner: Any  # the strategy, or Resumed(strategy) continuing after a checkpoint
    initial: Any  # ArrayRecord the loop starts from
    done: int  # rounds already run (a resumed run)
    evaluate_fn: Any
    t_start: float


def run_experiment(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    own_process: bool = False,
    as_given: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid`` through ``Strategy.start``; write ``run_dir/results.json``.

    ``resume=True`` continues the run in ``run_dir`` after its last checkpointed round
    (simulations/resume.py). ``own_process``: no client runs in this process (see
    :func:`server_threads`). ``as_given``: the config as the user gave it, recorded in the
    results file when the launcher grouped the clients into cohort nodes (simulations/node_layout.py).
    """
    run = open_run(grid, cfg, run_dir, resume=resume, own_process=own_process, as_given=as_given)
    try:
        outcome = run.runner.start(
            run.grid,
            run.initial,
            num_rounds=cfg.num_rounds - run.done,
            timeout=cfg.simulation.round_timeout_s,
            evaluate_fn=run.evaluate_fn,
        )
    except (RunInterrupted, KeyboardInterrupt):
        return run.recorder.interrupted(run.t_start)
    return close_run(run, outcome.arrays)


def open_run(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool,
    own_process: bool,
    as_given: dict[str, Any] | None = None,
) -> OpenRun:
    """Task, checkpoint, handshake, participation, results header, strategy: everything before round 1."""
    t_start = time.monotonic()
    set_threads(server_threads(cfg, own_process))
    task = load_task(cfg)
    checkpoint = read_checkpoint(run_dir) if resume else None
    ledger = Ledger.from_json(checkpoint[0]["ledger"]) if checkpoint else Ledger()
    if cfg.simulation.cohort_size > 1:  # one Flower node per cohort of clients (simulations/cohort.py)
        grid = CohortGrid(grid, cfg.partition.num_partitions, cfg.simulation.cohort_size)
        grid.discover(cfg.simulation.node_wait_s)
    node_of = discover_partitions(grid, cfg, ledger)
    partition_of = {node: pid for pid, node in node_of.items()}
    env = participation_lib.build_participation(
        cfg.participation, cfg.partition.num_partitions, cfg.seed, label_hist=task.label_histograms()
    )
    results = results_header(cfg, task, env)
    if as_given is not None:  # the config the user gave (what reproduces the run) and the layout apart
        results["config"], results["flower_nodes"] = as_given, flower_nodes(cfg)
    recorder = RunRecorder(cfg, task, ledger, run_dir, results)

    def selector(server_round: int, _grid: Grid) -> list[int]:
        pids = [p for p in env.online(server_round) if p in node_of]
        recorder.report(server_round, {"participants": pids})
        if not pids:
            log(WARNING, "round %d: no client online; skipped", server_round)
        return [node_of[p] for p in pids]

    ctx = StrategyContext(
        node_selector=selector,
        partition_of=lambda node: partition_of.get(node, -1),
        num_clients=cfg.partition.num_partitions,
        environment=env,
        report=recorder.report,
        initial_state=dict(task.initial_state),
        client_ranks=results.get("client_ranks"),
        # every sigma of the run, planned once (fedpeft check prints the same plan)
        privacy_plan=plan_privacy(
            cfg, results["partitions"]["sizes"], np.asarray(results["participation_trace"], dtype=bool)
        ),
    )
    strategy = build_strategy(cfg, ctx)
    recorder.strategy = strategy
    results["startup_s"] = time.monotonic() - t_start
    metered = MeteringGrid(grid, ledger, lambda node: partition_of.get(node, -1))
    run = OpenRun(
        cfg=cfg,
        run_dir=run_dir,
        task=task,
        ledger=ledger,
        grid=metered,
        results=results,
        recorder=recorder,
        runner=strategy,
        initial=state_to_record(task.initial_state),
        done=0,
        evaluate_fn=recorder.evaluate,
        t_start=t_start,
    )
    if checkpoint:
        resume_from(run, strategy, checkpoint)
    return run


def results_header(cfg: ExperimentConfig, task, env) -> dict[str, Any]:
    """The results file before any round: config, versions, model, partitions, participation."""
    online_trace = participation_lib.trace(env, cfg.num_rounds, cfg.partition.num_partitions)
    results: dict[str, Any] = {
        "status": "running",
        "config": cfg.to_flat(),
        "versions": package_versions(),
        "git_revision": git_revision(Path(__file__).resolve().parent),
        "trainable_params": num_trainable(task.model),
        "backbone": vars(task.weight_bytes),
        "partitions": {"sizes": [len(task.partition(p)) for p in range(cfg.partition.num_partitions)]},
        "label_histograms": task.label_histograms().tolist(),
        "participation_trace": online_trace.astype(int).tolist(),
        # the environment's p_n, for analysis only (strategies other than oracles never see them)
        "participation_probabilities": [float(p) for p in env.probabilities],
        "rounds": [],
        "adapter_dir": None,
    }
    if cfg.clients.rank_profile:  # unequal LoRA ranks: every partition's rank and each rank's training bytes
        results["client_ranks"] = task.client_ranks()
        results["training_bytes_by_rank"] = {r: task.training_bytes(r) for r in sorted(set(results["client_ranks"]))}
    return results


def resume_from(run: OpenRun, strategy, checkpoint: tuple) -> None:
    """Continue ``run`` after its checkpointed round: strategy state, global state, rounds so far."""
    meta, state, extra = checkpoint
    strategy.restore_state(meta["strategy"], extra)
    done = run.done = meta["round"]
    run.initial = state_to_record(state)
    previous = load_results(RunDir(run.run_dir).results)
    run.results["rounds"] = [r for r in previous["rounds"] if r["round"] <= done]
    run.results["resumed_after_rounds"] = [*previous.get("resumed_after_rounds", []), done]
    run.runner = Resumed(strategy=strategy, offset=done)
    recorder = run.recorder

    def evaluate_fn(server_round: int, arrays):  # round 0 of the resumed loop is round `done`, recorded
        return None if server_round == 0 else recorder.evaluate(server_round + done, arrays)

    run.evaluate_fn = evaluate_fn
    log(INFO, "resuming %s after round %d of %d", run.run_dir, done, run.cfg.num_rounds)


def close_run(run: OpenRun, final_arrays) -> dict[str, Any]:
    """Export the final adapter, the ledger and the status; write results.json; return the results."""
    cfg, task, results = run.cfg, run.task, run.results
    final = final_arrays if final_arrays is not None and len(final_arrays) else run.initial
    set_adapter_state(task.model, record_to_state(final))
    if cfg.task.kind == "causal-lm":  # peft CAUSAL_LM folder + tokenizer + how to rebuild the base
        from fedpeft.lm_export import export_lm_adapter

        adapter_dir = export_lm_adapter(task.model, task.tokenizer, RunDir(run.run_dir).adapter, cfg)
    else:
        adapter_dir = export_adapter(task.model, RunDir(run.run_dir).adapter, cfg.peft, cfg.model)
    results["adapter_dir"] = str(adapter_dir.resolve())
    results["ledger"] = run.ledger.to_json()
    results["wall_s"] = time.monotonic() - run.t_start
    aggregated_any = any(r["aggregated"] for r in results["rounds"][1:])
    results["status"] = "completed" if aggregated_any else "failed"
    if not aggregated_any:
        errors = sorted({f["reason"] for r in results["rounds"] for f in r["failed"] + r["rejected"]})
        results["error"] = "no client update was aggregated in any round; clients reported: " + "; ".join(errors[:5])
        log(WARNING, "%s", results["error"])
    path = write_results(run.run_dir, results)
    run.recorder.close()
    final = results["rounds"][-1]
    if final.get("accuracy") is not None:
        log(INFO, "wrote %s (final accuracy %.4f)", path, final["accuracy"])
    else:  # a causal LM with free-form replies (no label words) has no accuracy, only its response perplexity
        log(INFO, "wrote %s (final perplexity %.4g)", path, final.get("perplexity") or float("nan"))
    return results


def start_experiment(
    grid: Grid,
    run_config: dict[str, Any],
    overrides: dict[str, Any],
    run_dir: str | Path | None,
    *,
    resume: bool = False,
    checked: bool = False,
    as_given: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ServerApp's body: ``run_config`` overlaid with ``overrides``, checked unless ``checked``, then run.

    ``fedpeft simulate`` checks the config before it starts Flower's engine and passes
    ``checked=True``; a ServerApp started by Flower's own CLI (``flwr run .``) has had no
    check, so it runs ``fedpeft check``'s :func:`~fedpeft.check.check_experiment` here, before
    the first message: a typo fails in seconds with the fix, not after the nodes trained.
    """
    cfg = ExperimentConfig.from_flat({**run_config, **overrides})
    if not checked:
        from fedpeft.check import Sources, check_experiment

        report = check_experiment(cfg, Sources(overrides={**run_config, **overrides}))
        for warning in report.warnings:
            log(WARNING, "%s", warning)
        log(INFO, "%s", report.text())
    out = Path(run_dir or cfg.out_dir or default_run_dir(cfg.name, cfg.seed))
    return run_experiment(grid, cfg, out, resume=resume, own_process=True, as_given=as_given)


def build_server_app(
    overrides: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    checked: bool = False,
    as_given: dict[str, Any] | None = None,
) -> ServerApp:
    """A ServerApp whose config is ``run_config`` overlaid with ``overrides`` (``resume``: continue ``run_dir``).

    ``checked``: the caller already ran ``check_experiment`` on the same config (the launcher).
    ``as_given``: the user's config when ``overrides`` group its clients into cohort nodes (the launcher).
    """
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start_experiment(
            grid, dict(context.run_config), overrides, run_dir, resume=resume, checked=checked, as_given=as_given
        )

    return app


app = build_server_app()
