"""The one launcher: ``fedpeft check`` / ``simulate`` / ``plot`` / ``sweep`` / ``report`` (or ``python -m simulations.run``).

This is the only file that knows how Flower is started. Local runs use Flower's
simulation engine (Ray backend) through ``flwr.simulation.run_simulation``; the same
command on the head node of a Ray cluster (``ray start --head`` there, ``ray start
--address=<head>:6379`` on the others) spreads the clients over the cluster, because
Ray attaches to a running cluster when one exists. ``flwr run .`` runs the same apps
with the pyproject defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from fedpeft.check import CheckReport, check_experiment, config_sources
from fedpeft.config import ConfigError, ExperimentConfig, load_config, parse_override
from fedpeft.report import add_parser as add_report_parser
from fedpeft.results import default_run_dir, load_results
from fedpeft.rundir import check_run_dir, prepare_run_dir
from simulations.experiments import sweep
from simulations.inprocess import num_nodes
from simulations.interrupt import RunInterrupted, stop_on_sigint
from simulations.quiet import quiet_run_logs
from simulations.resume import resume_config

log = logging.getLogger("fedpeft")


def backend_config(cfg: ExperimentConfig) -> dict:
    """Ray resources per simulated client, from our config (not Flower's 2-CPU default)."""
    resources = {"num_cpus": cfg.simulation.num_cpus_per_client, "num_gpus": cfg.simulation.num_gpus_per_client}
    return {"client_resources": resources, "init_args": {"include_dashboard": False}}


def simulate(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    plot: bool = True,
    client_mods: list | None = None,
    resume: bool = False,
    in_process: bool = False,
    overwrite: bool = False,
    checked: CheckReport | None = None,
) -> Path:
    """Check ``cfg`` and its run folder, then run it on Flower's simulation engine; return the results file.

    ``client_mods`` are Flower ClientApp mods (tests use one to make a client fail);
    ``resume`` continues the run in ``run_dir`` after its last checkpoint;
    ``in_process`` runs the same apps without Ray (simulations/inprocess.py);
    ``overwrite`` lets a folder holding an earlier run be cleared, once the check has passed;
    ``checked`` is the report of a check already run on ``cfg`` (the CLI's, with key sources).
    """
    flag = _flag(run_dir)
    run_dir = Path(run_dir) if run_dir else _default_run_dir(cfg)
    if not resume:
        check_run_dir(run_dir, overwrite=overwrite, flag=flag)
    report = checked or check_experiment(cfg)
    for warning in report.warnings if checked is None else []:
        log.warning("%s", warning)
    if not resume:
        run_dir = prepare_run_dir(run_dir, overwrite=overwrite, flag=flag)

    from flwr.simulation import run_simulation

    from simulations.client_app import build_client_app
    from simulations.server_app import build_server_app

    flat = cfg.to_flat()
    # Users do not set HF_HUB_OFFLINE for the embedded default; nothing there needs the hub.
    if cfg.model.name == "embedded" and cfg.data.dataset == "embedded":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    if in_process:
        from simulations.inprocess import run_in_process

        results_path = run_in_process(cfg, run_dir, client_mods=client_mods, resume=resume)
        return _finish(cfg, results_path, plot, t0)
    # Ray starts its workers at nice 15, so any ordinary process on a shared machine starves the actors.
    os.environ.setdefault("RAY_worker_niceness", "0")
    logging.getLogger("flwr").addFilter(_DropRunSimulationDeprecation())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        with stop_on_sigint():
            run_simulation(
                server_app=build_server_app(flat, run_dir.resolve(), resume=resume, checked=True),
                client_app=build_client_app(flat, mods=client_mods),
                num_supernodes=num_nodes(cfg),
                backend_config=backend_config(cfg),
            )
    return _finish(cfg, run_dir / "results.json", plot, t0)


def _finish(cfg: ExperimentConfig, results_path: Path, plot: bool, t0: float) -> Path:
    check_finished(results_path)
    log.info("simulation finished in %.1f s: %s", time.monotonic() - t0, results_path)
    if plot:
        from fedpeft.plot import plot_runs  # matplotlib: only when plotting

        fig = plot_runs([results_path], results_path.parent / "accuracy.png", title=cfg.name)
        log.info("plot: %s", fig)
    return results_path


def _default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else default_run_dir(cfg.name, cfg.seed)


def _flag(run_dir: str | Path | None) -> str:
    return "--out" if run_dir else "the default run folder (set --out to choose another)"


class RunFailed(RuntimeError):
    """The run ended without aggregating any client update (or without results)."""


def check_finished(results_path: Path) -> None:
    """Raise unless ``results_path`` records a completed run (interrupted and failed runs say why)."""
    if not results_path.exists():
        raise RunFailed(f"the simulation wrote no results; see the log above ({results_path.parent})")
    results = load_results(results_path)
    status = results.get("status")
    if status == "interrupted":
        raise RunInterrupted(
            f"interrupted after round {results.get('last_completed_round')}; results so far in {results_path}"
        )
    if status != "completed":
        raise RunFailed(f"the run {status}: {results.get('error', 'see the log above')} ({results_path})")


class _DropRunSimulationDeprecation(logging.Filter):
    """``run_simulation`` logs a deprecation notice pointing at ``flwr run``.

    We keep the Python API on purpose: it takes our resources and overrides in-process
    and returns when the run ends; ``flwr run .`` remains available for Flower's CLI.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "run_simulation" not in msg and "deprecated feature" not in msg.lower()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run an experiment config on Flower's simulation engine")
    sim.add_argument("config", nargs="?", help="experiment TOML, e.g. simulations/configs/quickstart.toml")
    sim.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    sim.add_argument("--out", help="run folder (default runs/<name>/seed-<seed>); must be new, empty or --overwrite")
    sim.add_argument("--no-plot", action="store_true", help="skip the accuracy plot")
    sim.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in the run folder (cleared after the check)"
    )
    sim.add_argument("--verbose", action="store_true", help="show every library log line and warning")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its last round")
    sim.add_argument("--in-process", action="store_true", help="run the same apps in this process, without Ray")
    chk = sub.add_parser("check", help="validate a config, its data, model folder, trace and privacy plan; no Ray")
    chk.add_argument("config", help="experiment TOML, e.g. simulations/configs/quickstart.toml")
    chk.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    plot = sub.add_parser("plot", help="plot one or more runs from their results files")
    plot.add_argument("runs", nargs="+", help="run folders or results.json files")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.add_argument("--title")
    plot.add_argument("--total-bytes", action="store_true", help="add a panel: accuracy vs uplink + downlink bytes")
    plot.add_argument(
        "--target", type=float, help="accuracy target: draw it and print the bytes each run needed to reach it"
    )
    gen = sub.add_parser("generate", help="greedy reply of a causal-LM run's adapter to a prompt")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="a finished task.kind='causal-lm' run folder (or its adapter/)")
    gen.add_argument("--prompt", required=True, help="the user turn (the chat template is applied)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit (default 64)")
    gen.add_argument("--save-merged", metavar="DIR", help="also write an fp32 copy with the adapter merged (inference)")
    sweep.add_parser(sub)
    add_report_parser(sub)
    sub.add_parser("deploy", help="certs | memory | loopback: Flower's deployment runtime (simulations/deploy.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".toml"):
        argv = ["simulate", *argv]
    if argv and argv[0] == "deploy":  # its own sub-commands and options
        from simulations.deploy.loopback import main as deploy_main

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return deploy_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # argparse has printed its usage error (exit 2) or --help (exit 0)
        return int(done.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedpeft").setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler already
    quiet_run_logs(verbose=getattr(args, "verbose", False))
    try:
        if args.command == "plot":
            from fedpeft.plot import plot_runs, target_table  # matplotlib: only when plotting

            _check_plot_args(args)
            print(plot_runs(args.runs, args.out, title=args.title, total_bytes=args.total_bytes, target=args.target))
            if args.target is not None:
                print(target_table(args.runs, args.target))
            return 0
        if args.command == "sweep":
            return sweep.main(args, argv)
        if args.command == "generate":
            return _generate(args)
        if args.command == "report":
            from fedpeft.report import parse_baseline, write_report

            summary = write_report(args.dir, args.out, target=args.target, baseline=parse_baseline(args.baseline))
            print(f"{len(summary['groups'])} groups: {Path(args.out) / 'report.md'}")
            return 0
        if args.command == "simulate" and args.resume:
            if args.config or args.overrides or args.out:
                raise ConfigError(
                    "--resume RUN_DIR takes the run's own config and folder; drop CONFIG, --set and --out"
                )
            cfg = resume_config(args.resume)
            print(simulate(cfg, args.resume, plot=not args.no_plot, resume=True, in_process=args.in_process))
            return 0
        if not args.config:
            raise ConfigError("fedpeft simulate needs CONFIG.toml (or --resume RUN_DIR)")
        overrides = _parse_overrides(args.overrides)
        cfg = load_config(args.config, overrides)
        if args.command == "simulate":  # the cheapest check first: never start what cannot be saved
            check_run_dir(args.out or _default_run_dir(cfg), overwrite=args.overwrite, flag=_flag(args.out))
        report = check_experiment(cfg, config_sources(args.config, list(overrides)))
        print(report.text(), flush=True)
        if args.command == "check":
            return 0
        path = simulate(
            cfg, args.out, plot=not args.no_plot, in_process=args.in_process, overwrite=args.overwrite, checked=report
        )
        print(path)
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"fedpeft: {err}", file=sys.stderr)
        return 130
    except RunFailed as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 1


def _generate(args: argparse.Namespace) -> int:
    """``fedpeft generate RUN_DIR --prompt ...``: rebuild base + adapter, print the greedy reply."""
    from fedpeft.lm_export import export_merged, generate_text, load_lm_export, resolve_adapter_dir

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    adapter = resolve_adapter_dir(args.run_dir)
    model, tokenizer = load_lm_export(adapter)
    print(generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
    if args.save_merged:
        print(export_merged(adapter, args.save_merged), file=sys.stderr)
    return 0


def _parse_overrides(texts: list[str]) -> dict:
    overrides: dict = {}
    for text in texts:
        key, value = parse_override(text)
        if key in overrides:
            raise ConfigError(f"--set {key} is given twice ({overrides[key]!r} and {value!r}); keep one")
        overrides[key] = value
    return overrides


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _check_plot_args(args: argparse.Namespace) -> None:
    """``fedpeft plot``'s output and target, before any results file is read."""
    out = Path(args.out)
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"plot --out {args.out!r} must end in {' / '.join(PLOT_SUFFIXES)} (the figure's format)")
    if out.is_dir():
        raise ConfigError(f"plot --out {args.out!r} is a folder; pass a file name such as {out / 'accuracy.png'}")
    if not out.parent.is_dir():
        raise ConfigError(f"plot --out {args.out!r}: the folder {str(out.parent)!r} does not exist; create it first")
    if args.target is not None and not 0 < args.target <= 1:
        raise ConfigError(f"plot --target {args.target} is not an accuracy; pass a value in (0, 1]")


if __name__ == "__main__":
    sys.exit(main())
