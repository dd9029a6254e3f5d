"""Shared fixtures: tiny configs over the real embedded model and data."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers import FreshTasks, tiny_config  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run with one torch thread, like a simulated client."""
    torch.set_num_threads(1)


@pytest.fixture
def task_identity():
    """Flower's Message() needs a task identity; set a dummy one as run_simulation does."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    yield


@pytest.fixture
def tiny():
    """The tiny config (see :func:`tiny_config`)."""
    return tiny_config()


@pytest.fixture
def fresh_task():
    """``fresh_task(cfg)`` loads a task at its initial adapter state; teardown restores every one it
    handed out, even when the test failed (see :class:`tests.helpers.FreshTasks`)."""
    tasks = FreshTasks()
    yield tasks
    tasks.close()


@pytest.fixture
def empty_model_cache():
    """The process's model cache emptied before the test and again after it, even when it fails:
    for tests that count builds or need a model built as another client process would build it."""
    from fedpeft import backbone

    backbone.clear_cache()
    yield backbone
    backbone.clear_cache()
