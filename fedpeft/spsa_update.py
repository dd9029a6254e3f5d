"""A client's SPSA local update, as a function: the zeroth-order counterpart of ``Task.local_update``.

Given the task, the synced global adapter ``theta_r`` (``master``) and the server's step scale and
learning rate, run ``spsa.local-steps`` shared-seed SPSA steps on this client's own rows and return
the one-byte codes. Like first-order training it reads the node's own file when the SuperNode has a
``data-path`` (``Task.client_rows``); before, the Flower shell trained on the bundled partition even
then. No Flower types here: catching up from the server's log and keeping the client's state between
rounds stay in the ClientApp's shell (simulations/spsa_client.py), so this can be tested and reused
outside Flower (TFF's simple_fedavg keeps client_update the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedpeft import privacy, zo
from fedpeft.rng import torch_generator
from fedpeft.task import Task
from fedpeft.train import batch_loss, forward_logits


@dataclass(frozen=True)
class SpsaUpdate:
    """One client's round of SPSA: the steps' result and, under DPZero, the noise it used."""

    result: zo.LocalResult
    dp_sigma: float | None = None  # DPZero's noise multiplier; None without sample-level DP
    dp_rate: float | None = None  # its sample rate 1 / ceil(n / B)


def spsa_local_update(
    task: Task,
    master: zo.Tensors,
    *,
    partition_id: int,
    round_: int,
    scale: float,
    lr: float,
    data_path: str = "",
) -> SpsaUpdate:
    """``spsa.local-steps`` SPSA steps from ``master`` (updated in place) on this client's rows.

    Parameters
    ----------
    task : the client's task (its cached model is overwritten with ``master`` first).
    master : theta_r as CPU fp32 tensors, the state every client and the server agree on.
    partition_id, round_ : seed the batches and the perturbation directions.
    scale, lr : the server's step scale and learning rate for this round (the message header).
    data_path : the node's own training file, or "" for its partition of the bundled data.
    """
    cfg = task.cfg
    model = task.model
    model.eval()  # dropout off: both evaluations of a step must see the same function
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    zo.copy_into_(params, master)
    rows = task.client_rows(partition_id, data_path)
    # The task's own batches: a classifier's labels, or a causal LM's prompt + response tokens, whose
    # loss (batch_loss) is the response's cross-entropy: the label word's under MeZO's prompt + label words.
    loader = task.shuffled_loader(
        rows,
        batch_size=cfg.spsa.batch_size,
        generator=torch_generator(cfg.seed, "spsa-batches", round_, partition_id),
    )
    sigma, rate = dpzero_noise(task, len(rows))
    # Through the frozen-prefix cache when every trainable parameter sits above layer k: SPSA
    # runs forwards only, in eval mode, so the cached prefix is exact and a step costs the top.
    logits_fn = task.logits_fn()
    result = zo.run_local_steps(
        params,
        master,
        loader,
        (lambda batch: per_example_loss(model, batch, logits_fn))
        if sigma is not None
        else (lambda batch: batch_loss(model, batch, logits_fn)),
        run_seed=cfg.seed,
        round_=round_,
        partition_id=partition_id,
        num_steps=cfg.spsa.local_steps,
        eps=cfg.spsa.eps,
        lr=lr,
        scale=scale,
        codec=cfg.spsa.codec,
        distribution=cfg.spsa.distribution,
        dp_clip=cfg.dp.clip_norm if sigma is not None else 0.0,
        dp_sigma=sigma if sigma is not None else 0.0,
    )
    return SpsaUpdate(result, sigma, rate)


def per_example_loss(model, batch, logits_fn=None) -> torch.Tensor:
    """Cross-entropy of every example of the batch (DPZero clips per example).

    A causal LM's token targets (2-D labels) give each example's mean response-token loss,
    the per-example terms of fedpeft/lm_batches.py's ``response_loss``.
    """
    logits = forward_logits(model, batch) if logits_fn is None else logits_fn(batch)
    if batch["labels"].dim() == 2:
        from fedpeft.lm_batches import token_losses

        sums, counts = token_losses(logits, batch["labels"])
        return sums / counts.clamp(min=1)
    return F.cross_entropy(logits.float(), batch["labels"].to(logits.device), reduction="none")


def dpzero_noise(task: Task, num_rows: int) -> tuple[float | None, float | None]:
    """DPZero's noise multiplier and sample rate for a client of ``num_rows`` rows; (None, None) without DP.

    Sample rate 1/ceil(n/B) as for DP-SGD; batches are shuffled, not Poisson-sampled, so
    (as for fixed-size participation) Opacus' RDP epsilon is an approximation.
    """
    cfg = task.cfg
    if cfg.dp.mode != "sample":
        return None, None
    rate = privacy.poisson_rate(num_rows, cfg.spsa.batch_size)
    sigma = privacy.sample_noise_multiplier(cfg, num_rows)  # the privacy plan's formula (fedpeft/privacy_plan.py)
    return sigma, rate
