"""A warm ClientApp worker: keep the model loaded between messages on a SuperNode.

Flower's deployment runtime starts a fresh ``flwr-clientapp`` process for every message
(flwr 1.41: pull one message, load the app, run it, exit). Importing peft and
transformers and building the quantized model again in each of those processes costs
several seconds per message on a small CPU, more than the training itself.

With ``--node-config "... warm-worker=true"`` the ClientApp's mod (:func:`warm_worker_mod`)
forwards each message to a long-lived worker process of this SuperNode and returns its
reply. The worker runs the very same ClientApp (the factory the mod names), so every handler
behaves as in simulation; the model stays in the worker's per-process cache (backbone.py).
Messages and the node's ``Context`` travel as Flower's own protobufs over a Unix socket
in a directory only this user can open.

Lifecycle: the first message starts the worker (``python -m simulations.deploy.warm_worker``,
detached, under a lock so two messages never start two). It serves one SuperNode (its
``flower-superexec``, the ClientApp process's parent) and one app version (the installed
FAB's folder), and exits when that SuperNode is gone or after ``IDLE_EXIT_S`` without a
message. ``warm-worker="/some/dir"`` puts its socket, log and timing file there instead of
``$TMPDIR/fedpeft-<uid>``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from simulations.deploy.processes import process_alive

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "warm-worker"
IDLE_EXIT_S = 3600.0
START_TIMEOUT_S = 120.0
APP_ROOT = Path(__file__).resolve().parents[2]  # the installed FAB (or the checkout): above simulations/deploy/


def worker_dir(setting: object) -> Path | None:
    """Where this node's worker lives, from the node-config value; None when disabled."""
    if setting is None or setting is False or str(setting).lower() in ("", "false", "0", "no"):
        return None
    if setting is True or str(setting).lower() in ("true", "1", "yes"):
        return Path(tempfile.gettempdir()) / f"fedpeft-{os.getuid()}"
    return Path(str(setting)).expanduser()


def socket_path(directory: Path, owner_pid: int, app_root: Path = APP_ROOT) -> Path:
    """One worker per SuperNode (``owner_pid``) and app version (``app_root``)."""
    digest = hashlib.sha256(str(app_root).encode()).hexdigest()[:10]
    return directory / f"w{owner_pid}-{digest}.sock"


# --- framing: 8-byte big-endian length, then the bytes ------------------------------------


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    """Write each frame with its length prefix."""
    sock.sendall(b"".join(struct.pack(">Q", len(f)) + f for f in frames))


def recv_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` length-prefixed frames."""
    return [_recv_exact(sock, struct.unpack(">Q", _recv_exact(sock, 8))[0]) for _ in range(count)]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the warm worker closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode(message: Message, context: Context) -> tuple[bytes, bytes]:
    """A message and a context as Flower protobuf bytes."""
    return message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString()


def decode(message_bytes: bytes, context_bytes: bytes) -> tuple[Message, Context]:
    """The inverse of :func:`encode`."""
    proto_msg, proto_ctx = ProtoMessage(), ProtoContext()
    proto_msg.ParseFromString(message_bytes)
    proto_ctx.ParseFromString(context_bytes)
    return message_from_proto(proto_msg), context_from_proto(proto_ctx)


# --- the ClientApp side -------------------------------------------------------------------


def make_warm_worker_mod(app_factory: str):
    """Flower mod: forward to this node's warm worker when its node config asks for one.

    ``app_factory`` ("module:function") names the ClientApp builder the worker runs; it is
    passed by reference so this module never imports the ClientApp (no import cycle).
    """

    def warm_worker_mod(msg: Message, context: Context, call_next) -> Message:
        directory = worker_dir(context.node_config.get(NODE_CONFIG_KEY))
        if directory is None:
            return call_next(msg, context)
        t0 = time.monotonic()
        path = socket_path(directory, os.getppid())
        conn = connect_or_start(path, owner_pid=os.getppid(), app_factory=app_factory)
        with conn:
            send_frames(conn, *encode(msg, context))
            status, first, second, worker_s = recv_frames(conn, 4)
        if status != b"ok":
            raise RuntimeError(f"warm worker: {first.decode(errors='replace')}")
        reply, new_context = decode(first, second)
        context.state = new_context.state  # Flower saves the node's state from this process
        _append_stats(path, msg, process_age_s=_process_age_s(), worker_s=float(worker_s), mod_s=time.monotonic() - t0)
        return reply

    return warm_worker_mod


def connect_or_start(path: Path, *, owner_pid: int, app_factory: str) -> socket.socket:
    """A connection to the worker at ``path``, starting one first if none answers."""
    conn = _try_connect(path)
    if conn is not None:
        return conn
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another message of this node may be starting it
        conn = _try_connect(path)
        if conn is None:
            _spawn(path, owner_pid, app_factory)
            deadline = time.monotonic() + START_TIMEOUT_S
            while conn is None and time.monotonic() < deadline:
                time.sleep(0.05)
                conn = _try_connect(path)
    if conn is None:
        raise RuntimeError(f"warm worker did not start within {START_TIMEOUT_S:.0f} s; see {path.with_suffix('.log')}")
    return conn


def _try_connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _spawn(path: Path, owner_pid: int, app_factory: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(APP_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    args = [
        sys.executable,
        "-m",
        "simulations.deploy.warm_worker",
        "--socket",
        str(path),
        "--owner-pid",
        str(owner_pid),
    ]
    args += ["--app", app_factory]
    with open(path.with_suffix(".log"), "ab") as out:
        proc = subprocess.Popen(
            args, cwd=APP_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    path.with_suffix(".pid").write_text(str(proc.pid))


def _process_age_s() -> float | None:
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # psutil is optional on a device
        return None


def _append_stats(path: Path, msg: Message, **fields: float | None) -> None:
    row = {"message_type": msg.metadata.message_type, "run_id": msg.metadata.run_id, "time": time.time(), **fields}
    with open(path.with_suffix(".stats.jsonl"), "a") as fh:
        fh.write(json.dumps(row) + "\n")


# --- the worker side ----------------------------------------------------------------------


def load_factory(app_factory: str):
    """The callable named by ``"module:function"``."""
    module_name, _, attr = app_factory.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def serve(path: Path, owner_pid: int, app_factory: str, idle_exit_s: float = IDLE_EXIT_S) -> None:
    """Answer messages on ``path`` until the owner process is gone or nothing came for a while."""
    from fedpeft.backbone import clear_cache

    app = load_factory(app_factory)()  # the same handlers, without the forwarding mod
    old_umask = os.umask(0o077)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    server.bind(str(path))
    os.umask(old_umask)
    server.listen(8)
    server.settimeout(1.0)
    log.info("warm worker %d serving %s for SuperNode process %d", os.getpid(), path, owner_pid)
    last_run, last_seen = None, time.monotonic()
    try:
        while process_alive(owner_pid) and time.monotonic() - last_seen < idle_exit_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                msg, context = decode(*recv_frames(conn, 2))
                if last_run is not None and msg.metadata.run_id != last_run:
                    clear_cache()  # a new run: free the previous run's model before building its own
                last_run = msg.metadata.run_id
                send_frames(conn, *_handle(app, msg, context))
            if msg.metadata.message_type == "query":
                _prewarm(context)  # the server's handshake comes first: build the model while it waits
            last_seen = time.monotonic()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        log.info("warm worker %d exiting", os.getpid())


def _handle(app, msg: Message, context: Context) -> tuple[bytes, bytes, bytes, bytes]:
    t0 = time.monotonic()
    try:
        reply = app(msg, context)
    except Exception as err:  # reported to the ClientApp process, which raises it for Flower
        log.exception("handler failed")
        return b"err", f"{type(err).__name__}: {err}".encode(), b"", b"0"
    if msg.metadata.message_type.startswith("train"):
        _log_memory(context)
    return (b"ok", *encode(reply, context), f"{time.monotonic() - t0:.6f}".encode())


def _prewarm(context: Context) -> None:
    from fedpeft.task import set_threads

    try:
        cfg = _run_config(context)
        set_threads(cfg.simulation.torch_threads)
        _log_memory(context)
    except Exception:  # the train message will raise it again, where Flower reports it
        log.exception("pre-loading the model failed")


def _run_config(context: Context):
    from fedpeft.config import ExperimentConfig

    return ExperimentConfig.from_flat(dict(context.run_config))


def _log_memory(context: Context) -> None:
    from fedpeft.memory import format_memory, measure_client_memory
    from fedpeft.tasks import load_task

    cfg = _run_config(context)
    log.info("memory: %s", format_memory(measure_client_memory(load_task(cfg).model, cfg.train.optimizer)))


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.deploy.warm_worker --socket PATH --owner-pid PID --app MODULE:FACTORY`` (started by the mod)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--owner-pid", required=True, type=int)
    parser.add_argument("--app", required=True, help="ClientApp factory, module:function")
    parser.add_argument("--idle-exit-s", type=float, default=IDLE_EXIT_S)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    serve(args.socket, args.owner_pid, args.app, args.idle_exit_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
