"""Deployment tooling without a SuperLink: certificates, node config, warm worker, node data, memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import parse_config_args
from torch import nn

from fedpeft.config import DataConfig, ExperimentConfig
from fedpeft.data import load_node_data
from fedpeft.memory import measure_client_memory, split_bytes
from simulations.deploy import warm_worker
from simulations.deploy.certs import make_deployment_certs
from simulations.deploy.loopback import key_values, run_config_overrides
from simulations.deploy.processes import process_alive
from tests.helpers import tiny_config


def test_the_server_certificate_is_signed_by_the_ca_and_names_loopback_and_extra_hosts(tmp_path):
    certs = make_deployment_certs(tmp_path, num_nodes=2, sans=["10.0.0.5", "gpu-box"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())

    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "gpu-box"}
    assert os.stat(certs.server_key).st_mode & 0o777 == 0o600


def test_node_keys_are_openssh_p384_pairs_as_flower_expects(tmp_path):
    certs = make_deployment_certs(tmp_path, num_nodes=2)
    assert [p.name for p in certs.node_keys] == ["node-0", "node-1"]
    private = load_ssh_private_key(certs.node_keys[1].read_bytes(), password=None)
    public = load_ssh_public_key(certs.node_public_key(1).read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()


def test_node_config_text_parses_back_in_flower_with_strings_quoted():
    text = key_values({"partition-id": 2, "data-path": "/data/my reviews.csv", "warm-worker": True})
    assert text == 'partition-id=2 data-path="/data/my reviews.csv" warm-worker=true'
    assert parse_config_args([text]) == {"partition-id": 2, "data-path": "/data/my reviews.csv", "warm-worker": True}


def test_run_config_overrides_hold_only_the_keys_that_differ_from_the_defaults():
    cfg = ExperimentConfig().replace({"train.lr": 0.01, "num-rounds": 2, "out-dir": "/tmp/x"})
    assert run_config_overrides(cfg) == {"train.lr": 0.01, "num-rounds": 2, "out-dir": "/tmp/x"}


def test_the_warm_worker_setting_is_off_by_default_and_accepts_a_folder():
    assert warm_worker.worker_dir(None) is None
    assert warm_worker.worker_dir(False) is None
    assert warm_worker.worker_dir(True).name == f"fedpeft-{os.getuid()}"
    assert warm_worker.worker_dir("/srv/fedpeft") == Path("/srv/fedpeft")


def _query(run_config: dict, node_config: dict) -> tuple[Message, Context]:
    msg = Message(
        RecordDict({"config": ConfigRecord({"query": "partition-id"}), "arrays": ArrayRecord([np.arange(3.0)])}),
        dst_node_id=7,
        message_type=MessageType.QUERY,
    )
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    return msg, ctx


def test_messages_and_the_node_context_survive_the_worker_encoding(task_identity):
    msg, ctx = _query({"train.lr": 0.5}, {"partition-id": 1})
    ctx.state["kept"] = ConfigRecord({"round": 3})

    msg2, ctx2 = warm_worker.decode(*warm_worker.encode(msg, ctx))

    assert msg2.metadata.message_type == "query" and msg2.metadata.dst_node_id == 7
    np.testing.assert_array_equal(msg2.content["arrays"].to_numpy_ndarrays()[0], np.arange(3.0))
    assert dict(ctx2.run_config) == {"train.lr": 0.5} and dict(ctx2.node_config) == {"partition-id": 1}
    assert ctx2.state["kept"]["round"] == 3


MOD = warm_worker.make_warm_worker_mod("simulations.client_app:build_client_app")


@pytest.fixture
def worker_folder(tmp_path_factory):
    """A warm-worker folder; every worker started there is killed by PID afterwards."""
    folder = tmp_path_factory.mktemp("w")
    yield folder
    for pid_file in folder.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_mod_starts_a_warm_worker_that_answers_and_is_reused(task_identity, worker_folder):
    run_config = tiny_config().to_flat()
    msg, ctx = _query(run_config, {"partition-id": 2, "num-partitions": 3, "warm-worker": str(worker_folder)})
    in_process = lambda m, c: pytest.fail("the message ran in this process")  # noqa: E731

    reply = MOD(msg, ctx, in_process)
    again = MOD(msg, ctx, in_process)

    assert reply.content["config"]["partition-id"] == 2 and again.content["config"]["partition-id"] == 2
    assert len(list(worker_folder.glob("*.pid"))) == 1  # one worker served both
    stats = (worker_folder / next(worker_folder.glob("*.stats.jsonl")).name).read_text().splitlines()
    assert len(stats) == 2


def test_without_the_setting_the_mod_runs_the_message_in_process(task_identity):
    msg, ctx = _query({}, {"partition-id": 0})
    assert MOD(msg, ctx, lambda m, c: "ran here") == "ran here"


def test_a_node_file_is_read_with_the_configured_columns_and_the_experiments_labels(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("review,sentiment\ngreat film,fresh\ndull,rotten\nfine,fresh\n")
    cfg = DataConfig(text_column="review", label_column="sentiment")

    rows = load_node_data(path, cfg, ("fresh", "rotten"))

    assert rows.texts == ("great film", "dull", "fine")
    assert rows.labels.tolist() == [0, 1, 0] and rows.label_names == ("fresh", "rotten")
    with pytest.raises(ValueError, match="meh"):
        path.write_text("review,sentiment\nok,meh\n")
        load_node_data(path, cfg, ("fresh", "rotten"))


def test_memory_splits_frozen_and_trainable_bytes_and_counts_optimizer_state():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))  # 15 frozen floats, 8 trainable floats
    for p in model[0].parameters():
        p.requires_grad_(False)

    assert split_bytes(model) == (60, 32)
    assert measure_client_memory(model, "adamw").training_state_bytes == 32 * 3  # grad + 2 moments
    assert measure_client_memory(model, "sgd").training_state_bytes == 32
    assert measure_client_memory(model).peak_rss_bytes > 10_000_000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_puts_an_nf4_backbone_on_the_gpu_and_reports_gpu_memory():
    import bitsandbytes as bnb

    from fedpeft.tasks import load_task

    task = load_task(tiny_config(**{"model.device": "auto"}))
    task.local_update(dict(task.initial_state), 0, 1)
    report = measure_client_memory(task.model)
    assert report.device.startswith("cuda") and report.peak_cuda_bytes > 0
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in task.model.modules())


def test_a_process_is_alive_while_it_runs_and_dead_once_it_exits_even_unreaped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_alive(os.getpid()) and process_alive(child.pid)
        child.kill()  # exits, and stays a zombie: Popen does not reap it until asked
        deadline = time.monotonic() + 10
        while process_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(child.pid)  # a zombie counts as dead (and ours is reaped on the way)
    finally:
        child.kill()
        child.wait()
