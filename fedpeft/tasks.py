"""The task seam: ``load_task(cfg)`` gives the task of ``cfg``'s kind.

Its own module so that the kinds (fedpeft/task.py: sequence classification; fedpeft/lm_task.py:
causal-LM instruction tuning, a subclass of the classification task's :class:`~fedpeft.task.Task`)
do not import each other back. Both kinds cache their built model per process.
"""

from __future__ import annotations

from fedpeft.config import ExperimentConfig
from fedpeft.task import Task, load_classification_task


def load_task(cfg: ExperimentConfig) -> Task:
    """Build (or fetch from the process cache) everything a client or server needs for ``cfg``.

    ``task.kind = "causal-lm"`` gives a :class:`fedpeft.lm_task.CausalLMTask`, the same seam.
    """
    if cfg.task.kind == "causal-lm":
        from fedpeft.lm_task import load_lm_task

        return load_lm_task(cfg)
    return load_classification_task(cfg)
