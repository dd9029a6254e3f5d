"""The one launcher: ``fedpeft check`` / ``simulate`` / ``config`` / ``plot`` / ``sweep`` / ``tune`` / ``report`` (or ``python -m simulations.run``).

The command line only: parsing, dispatch and exit codes. Starting a run is
simulations/launch.py's ``simulate`` (re-exported here for callers of
``simulations.run.simulate``). ``flwr run .`` runs the same apps with the pyproject defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedpeft.check import check_experiment, config_sources
from fedpeft.config import ConfigError, load_config, parse_override
from fedpeft.report import add_parser as add_report_parser
from fedpeft.rundir import check_run_dir
from simulations.experiments import sweep, tune
from simulations.front_door import run_main
from simulations.launch import default_run_dir_of, run_dir_flag, simulate
from simulations.quiet import quiet_run_logs, use_one_log_format
from simulations.resume import resume_config

log = logging.getLogger("fedpeft")


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
    sim.add_argument("--quiet", action="store_true", help="warnings and errors only (CI logs): no progress lines")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its last round")
    sim.add_argument("--in-process", action="store_true", help="run the same apps in this process, without Ray")
    chk = sub.add_parser("check", help="validate a config, its data, model folder, trace and privacy plan; no Ray")
    chk.add_argument("config", help="experiment TOML, e.g. simulations/configs/quickstart.toml")
    chk.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    keys = sub.add_parser("config", help="list the config keys with their defaults, choices, ranges and help")
    keys.add_argument("key", nargs="?", help="one key (dp.clip-norm) or section (dp); default: every key")
    plot = sub.add_parser("plot", help="plot one or more runs from their results files")
    plot.add_argument("runs", nargs="+", help="run folders or results.json files")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.add_argument("--title")
    plot.add_argument(
        "--metric", default="accuracy", help="round column to plot (default accuracy; e.g. balanced_accuracy)"
    )
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
    tune.add_parser(sub)
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

        use_one_log_format(logging.INFO)
        return run_main(deploy_main, argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # argparse has printed its usage error (exit 2) or --help (exit 0)
        return int(done.code or 0)
    use_one_log_format()
    if getattr(args, "verbose", False) and getattr(args, "quiet", False):
        print("fedpeft: error: --verbose and --quiet contradict each other; pass one", file=sys.stderr)
        return 2
    quiet_run_logs(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    return run_main(_run_command, args, argv)  # errors: 2 bad input, 130 interrupted, 1 failed (front_door.py)


def _run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """One parsed subcommand."""
    if args.command == "plot":
        from fedpeft.plot import plot_runs, target_table  # matplotlib: only when plotting

        _check_plot_args(args)
        print(
            plot_runs(
                args.runs,
                args.out,
                title=args.title,
                total_bytes=args.total_bytes,
                target=args.target,
                metric=args.metric,
            )
        )
        if args.target is not None:
            print(target_table(args.runs, args.target))
        return 0
    if args.command == "config":
        from fedpeft.config_doc import describe

        print(describe(args.key))
        return 0
    if args.command == "sweep":
        return sweep.main(args, argv)
    if args.command == "tune":
        return tune.main(args, argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "report":
        from fedpeft.report import parse_baseline, write_report

        summary = write_report(args.dir, args.out, target=args.target, baseline=parse_baseline(args.baseline))
        print(f"{len(summary['groups'])} groups: {Path(args.out) / 'report.md'}")
        return 0
    if args.command == "simulate" and args.resume:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume RUN_DIR takes the run's own config and folder; drop CONFIG, --set and --out")
        cfg = resume_config(args.resume)
        print(simulate(cfg, args.resume, plot=not args.no_plot, resume=True, in_process=args.in_process))
        return 0
    if not args.config:
        raise ConfigError("fedpeft simulate needs CONFIG.toml (or --resume RUN_DIR)")
    overrides = _parse_overrides(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.command == "simulate":  # the cheapest check first: never start what cannot be saved
        check_run_dir(args.out or default_run_dir_of(cfg), overwrite=args.overwrite, flag=run_dir_flag(args.out))
    report = check_experiment(cfg, config_sources(args.config, overrides))
    print(report.text(), flush=True)
    if args.command == "check":
        return 0
    path = simulate(
        cfg, args.out, plot=not args.no_plot, in_process=args.in_process, overwrite=args.overwrite, checked=report
    )
    print(path)
    return 0


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
