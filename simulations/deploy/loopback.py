"""Flower's deployment runtime on one machine: a SuperLink and SuperNodes on 127.0.0.1.

:class:`Loopback` starts ``flower-superlink`` (TLS, SuperNode authentication), registers
node keys with ``flwr supernode register``, starts ``flower-supernode`` processes, submits
the app with ``flwr run`` and stops every process it started, by PID, with bounded waits.
The integration test and the benchmark use it; ``fedpeft deploy loopback CONFIG`` runs a
whole loopback deployment for trying things out. On real devices run the same commands by
hand (``Loopback.supernode_command`` prints one).

``fedpeft deploy certs OUT --nodes N [--san HOST]`` writes a CA, the SuperLink certificate
and node keys (simulations/certs.py); ``fedpeft deploy memory CONFIG [--quantization nf4,int8]
[--compute-dtype float32,bfloat16] [--out FILE]`` prints what one client needs in memory after a
local round, each variant measured in a fresh process (simulations/deploy/memory_probe.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config import ExperimentConfig, load_config, parse_override
from fedpeft.rundir import RunDir
from simulations.deploy.certs import DeploymentCerts, make_deployment_certs
from simulations.deploy.processes import process_alive

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # above simulations/deploy/
CONNECTION = "loopback"
STOP_WAIT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: Any) -> str:
    """A scalar as TOML (what ``flwr run --run-config`` and ``--node-config`` parse)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def key_values(pairs: dict[str, Any]) -> str:
    """``k1=v1 k2="v2"`` for Flower's ``--run-config`` / ``--node-config``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in pairs.items())


def run_config_overrides(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flat keys of ``cfg`` that differ from the defaults (pyproject holds the defaults)."""
    defaults = ExperimentConfig().to_flat()
    return {k: v for k, v in cfg.to_flat().items() if defaults.get(k) != v}


@dataclass
class Loopback:
    """A SuperLink and SuperNodes on 127.0.0.1 in a private folder, all stopped by :meth:`stop`.

    Each SuperNode gets its own ``FLWR_HOME`` (as separate devices would), the ``flwr`` CLI
    a connection named ``loopback`` in ``<root>/cli/config.toml``.
    """

    root: Path
    tls: bool = True
    auth: bool = True
    certs: DeploymentCerts | None = None
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        if self.tls and self.certs is None:
            self.certs = make_deployment_certs(self.root / "certs", num_nodes=8)
        self._write_cli_config()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, flwr_home: Path) -> dict[str, str]:
        """Environment for a Flower process: its own FLWR_HOME, offline hub, no dependency installs."""
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(flwr_home),
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        )
        return env

    def _write_cli_config(self) -> None:
        home = self.root / "cli"
        home.mkdir(exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.address}"',
        ]
        lines += [f'root-certificates = "{self.certs.ca_cert.resolve()}"'] if self.tls else ["insecure = true"]
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def _start(self, name: str, args: list[str], flwr_home: Path) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        out = open(self.root / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            args, cwd=self.root, env=self.env(flwr_home), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        out.close()
        self.procs[name] = proc
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return proc

    def superlink_command(self) -> list[str]:
        """``flower-superlink`` with TLS and SuperNode authentication as configured."""
        args = ["flower-superlink", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.tls:
            args += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert)]
            args += ["--ssl-keyfile", str(self.certs.server_key)]
        else:
            args.append("--insecure")
        return args + (["--enable-supernode-auth"] if self.auth else [])

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        """Start the SuperLink and wait until its port accepts connections."""
        self._start("superlink", self.superlink_command(), self.root / "superlink")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.root / 'logs' / 'superlink.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"flower-superlink did not listen on {self.address} within {timeout_s:.0f} s")

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this SuperLink (bounded)."""
        return subprocess.run(
            ["flwr", *args], cwd=REPO_ROOT, env=self.env(self.root / "cli"), capture_output=True, text=True,
            timeout=timeout_s,
        )  # fmt: skip

    def register(self, index: int) -> None:
        """Register node key ``index`` with the SuperLink (``flwr supernode register``)."""
        res = self.flwr("supernode", "register", str(self.certs.node_public_key(index)), CONNECTION)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")

    def supernode_command(self, index: int, node_config: dict[str, Any], runtime_port: int) -> list[str]:
        """``flower-supernode`` for node ``index`` (TLS root certificate, its private key, node config)."""
        args = ["flower-supernode", "--superlink", self.address, "--port", str(runtime_port)]
        args += ["--root-certificates", str(self.certs.ca_cert)] if self.tls else ["--insecure"]
        if self.auth:
            args += ["--auth-supernode-private-key", str(self.certs.node_keys[index])]
        return args + ["--node-config", key_values(node_config)]

    def start_supernode(self, index: int, node_config: dict[str, Any]) -> subprocess.Popen:
        """Start SuperNode ``index`` with its own FLWR_HOME."""
        args = self.supernode_command(index, node_config, free_port())
        return self._start(f"supernode-{index}", args, self.root / f"node-{index}")

    def submit(self, run_config: dict[str, Any], app_dir: Path = REPO_ROOT) -> int:
        """``flwr run APP loopback --run-config ...``; returns the run id."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", key_values(run_config)]
        res = self.flwr(*args)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed ({res.returncode}): {res.stdout}{res.stderr}")
        return int(json.loads(res.stdout)["run-id"])

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout_s=60)
        if res.returncode != 0:
            return f"unknown ({res.stderr.strip()[-200:]})"
        runs = json.loads(res.stdout).get("runs", [])
        return runs[0].get("status", "unknown") if runs else "unknown"

    def wait_for_status(self, run_id: int, prefix: str = "finished", timeout_s: float = 60.0) -> str:
        """Poll ``run_status`` until it starts with ``prefix`` (the ServerApp exits after writing results)."""
        deadline = time.monotonic() + timeout_s
        status = self.run_status(run_id)
        while not status.startswith(prefix) and time.monotonic() < deadline:
            time.sleep(1.0)
            status = self.run_status(run_id)
        return status

    @property
    def worker_dir(self) -> Path:
        """Where this deployment's warm ClientApp workers keep their sockets and PID files."""
        return self.root / "workers"

    def stop(self, name: str | None = None, *, sig: int = signal.SIGTERM) -> None:
        """Stop one process (or all, SuperNodes first) by PID: ``sig``, then SIGKILL after a bounded wait.

        Their children (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) end with
        them; any still alive after ``STOP_WAIT_S`` are killed by PID, and so are the warm
        workers (from their PID files) when stopping everything.
        """
        names = [name] if name else sorted(self.procs, key=lambda n: n == "superlink")
        children: list[int] = []
        for n in names:
            proc = self.procs.get(n)
            if proc is None or proc.poll() is not None:
                continue
            children += _descendants(proc.pid)
            proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_WAIT_S)
        if name is None:
            children += [int(p.read_text()) for p in self.worker_dir.glob("*.pid") if p.read_text().strip().isdigit()]
        _reap(children)

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process already gone
        return []


def _reap(pids: list[int], timeout_s: float = STOP_WAIT_S) -> None:
    """Wait (bounded) for ``pids`` to exit, then SIGKILL the ones left."""
    deadline = time.monotonic() + timeout_s
    left = set(pids)
    while left and time.monotonic() < deadline:
        left = {p for p in left if process_alive(p)}
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_results(path: Path, *, timeout_s: float, until_rounds: int | None = None) -> dict[str, Any]:
    """Poll a results file until it says completed (or has ``until_rounds`` round rows)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError:
                results = {}
            if results.get("status") == "completed":
                return results
            if until_rounds is not None and len(results.get("rounds", [])) >= until_rounds:
                return results
        time.sleep(0.2)
    raise TimeoutError(f"{path} not complete within {timeout_s:.0f} s")


def run_loopback(cfg: ExperimentConfig, *, root: Path, num_nodes: int, timeout_s: float = 1800.0) -> Path:
    """One experiment on a TLS + authenticated loopback deployment; returns its results file."""
    out = (root / "run").resolve()
    run_config = {**run_config_overrides(cfg), "out-dir": str(out)}
    with Loopback(root) as dep:
        dep.start_superlink()
        for i in range(num_nodes):
            dep.register(i)
        for i in range(num_nodes):
            node = {"partition-id": i, "num-partitions": num_nodes, "warm-worker": str(dep.worker_dir)}
            dep.start_supernode(i, node)
        run_id = dep.submit(run_config)
        log.info("run %d submitted; logs in %s", run_id, root / "logs")
        wait_for_results(RunDir(out).results, timeout_s=timeout_s)
    return RunDir(out).results


def print_memory(
    cfg: ExperimentConfig, quantizations: Sequence[str] = (), compute_dtypes: Sequence[str] = (), out: str | None = None
) -> list[dict[str, Any]]:
    """One client's memory after a local round on partition 0, each variant in a fresh process.

    See simulations/deploy/memory_probe.py; empty lists mean the config's own setting.
    """
    from simulations.deploy.memory_probe import probe_memory

    return probe_memory(cfg, list(quantizations), list(compute_dtypes), out)


def _choices(key: str):
    """An argparse type: a comma list of ``key``'s valid choices."""
    from fedpeft.config import CHOICES

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in CHOICES[key]]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: valid {key} values are {', '.join(CHOICES[key])}")
        return values

    return parse


def main(argv: list[str] | None = None) -> int:
    """``fedpeft deploy {certs,memory,loopback} ...``."""
    parser = argparse.ArgumentParser(prog="fedpeft deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("certs", help="CA, SuperLink certificate and node keys (see simulations/certs.py)", add_help=False)
    for name, text in (("memory", "memory one client needs"), ("loopback", "run CONFIG on a loopback deployment")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "loopback":
            p.add_argument("--root", help="folder for certificates, logs and results (default: a temp folder)")
        else:
            p.add_argument("--quantization", type=_choices("model.quantization"), default=[], help="e.g. nf4,int8,none")
            p.add_argument("--compute-dtype", type=_choices("model.compute-dtype"), default=[], help="float32,bfloat16")
            p.add_argument("--out", help="write the rows as JSON here")
    args, rest = parser.parse_known_args(argv)
    if args.action == "certs":
        from simulations.deploy.certs import main as certs_main

        return certs_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    cfg = load_config(args.config, dict(parse_override(o) for o in args.overrides))
    if args.action == "memory":
        print_memory(cfg, args.quantization, args.compute_dtype, args.out)
        return 0
    root = Path(args.root or tempfile.mkdtemp(prefix="fedpeft-loopback-"))
    print(run_loopback(cfg, root=root, num_nodes=cfg.partition.num_partitions))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    from simulations.front_door import run_main

    raise SystemExit(run_main(main))
