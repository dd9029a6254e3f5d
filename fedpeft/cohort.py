"""Train a cohort of clients in one process: batched for LoRA, one after another otherwise.

:func:`train_cohort` returns what ``[task.local_update(state, pid, rnd) for ...]`` returns.
For LoRA (dropout 0, first-order, no DP-SGD) and two or more clients it trains the K
clients together: each step concatenates the current batch of every client that still has
steps to do (each keeps its own seeded loader, so its data order is the one it has alone,
and its own step count), runs one forward/backward over the shared frozen backbone, and
every adapted layer adds each row's own client's LoRA term (fedpeft/grouped.py). The loss
is the sum over clients of each client's mean loss, so each client's gradient is the one
it has alone; each client has its own torch optimizer over its own tensors, stepped only
when it had a batch. Results equal training alone to fp tolerance when the backbone's own
dropout is off. With it on (MiniLM: 0.1), the masks are drawn for the whole concatenated
batch from one generator seeded by the round and the cohort's first partition, so each
client's training matches the alone run in distribution, not draw for draw.

Batching needs every trainable tensor to be a LoRA factor of a peft linear layer or the
linear head; anything else (IA3, prompt tuning, BitFit, DoRA, LoRA dropout, DP-SGD, one
client) trains one client after another with all the threads the caller set.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft import adapters
from fedpeft.batches import cycle_batches, planned_steps
from fedpeft.grouped import CohortHead, CohortLoraLinear, CohortStep, Segments, swapped_modules
from fedpeft.logit_adjust import label_log_prior
from fedpeft.rng import derive_seed
from fedpeft.task import Task
from fedpeft.train import TrainResult, build_param_optimizer, forward_logits

log = logging.getLogger(__name__)

Job = tuple[adapters.State, int, int]  # (global adapter state, partition id, server round)


@dataclass(frozen=True)
class Sites:
    """Where a cohort's per-client tensors plug into the model: LoRA layers and the head."""

    lora: tuple[tuple[str, str, str, float], ...]  # (module path, A name, B name, scaling)
    head: tuple[str, str, str | None] | None  # (module path, weight name, bias name)


@dataclass
class ClientRun:
    """One client of a batched cohort: its own tensors, optimizer, batches and losses."""

    partition_id: int
    round: int
    global_state: adapters.State
    params: dict[str, torch.Tensor]  # trainable name -> this client's leaf tensor
    optimizer: torch.optim.Optimizer
    batches: Iterator[dict[str, torch.Tensor]]
    losses: list[float] = field(default_factory=list)
    num_examples: int = 0
    logit_offset: torch.Tensor | None = None  # train.logit-adjust * log(label prior), fedpeft/logit_adjust.py

    def result(self) -> tuple[adapters.State, TrainResult]:
        """(delta, TrainResult) as ``Task.local_update`` reports them."""
        state = {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in self.params.items()}
        delta = adapters.compute_delta(state, self.global_state)
        return delta, TrainResult(
            mean_loss=sum(self.losses) / len(self.losses),
            first_loss=self.losses[0],
            last_loss=self.losses[-1],
            num_examples=self.num_examples,
            num_steps=len(self.losses),
        )


def train_cohort(
    task: Task, jobs: list[Job], *, batched: bool | None = None
) -> list[tuple[adapters.State, TrainResult]]:
    """Every job's ``(delta, TrainResult)``, in job order, as ``Task.local_update`` gives them.

    Parameters
    ----------
    task : Task
        The process's task (model, tokenizer, data).
    jobs : list of (global_state, partition_id, round)
        The cohort's clients.
    batched : bool or None
        ``None`` batches when :func:`batch_blocker` finds nothing against it; ``False``
        forces one client after another; ``True`` raises ``ValueError`` if batching is impossible.
    """
    reason = batch_blocker(task, len(jobs))
    if batched and reason:
        raise ValueError(f"cannot train this cohort batched: {reason}")
    if batched is False or reason:
        if len(jobs) > 1:
            log.info("cohort of %d trains one client after another: %s", len(jobs), reason or "batched=False")
        return [task.local_update(state, pid, rnd) for state, pid, rnd in jobs]
    return _train_halving_on_oom(task, jobs)


def _train_halving_on_oom(task: Task, jobs: list[Job]) -> list[tuple[adapters.State, TrainResult]]:
    # A cohort too large for the device trains as two halves (recursively); no client is lost,
    # and each client's result does not depend on who shares its batches.
    try:
        return [client.result() for client in train_batched(task, jobs)]
    except torch.OutOfMemoryError:
        if len(jobs) == 1:
            raise
        half = len(jobs) // 2
        log.warning("cohort of %d ran out of device memory; training it as %d + %d", len(jobs), half, len(jobs) - half)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return _train_halving_on_oom(task, jobs[:half]) + _train_halving_on_oom(task, jobs[half:])


def batch_blocker(task: Task, num_clients: int) -> str:
    """Why a cohort of ``num_clients`` cannot train batched on ``task``; ``""`` if it can."""
    cfg = task.cfg
    if num_clients < 2:
        return "one client"
    if cfg.peft.method != "lora":
        return f"peft.method={cfg.peft.method!r} (batching covers lora)"
    if cfg.peft.lora_dropout > 0:
        return f"peft.lora-dropout={cfg.peft.lora_dropout} (per-client dropout masks would differ)"
    if cfg.dp.mode == "sample":
        return "dp.mode='sample' (DP-SGD clips per client example with Opacus)"
    if getattr(task.tokenizer, "padding_side", "right") != "right":
        return "the tokenizer pads on the left"
    return find_sites(task.model)[1]


def find_sites(model: nn.Module) -> tuple[Sites, str]:
    """The LoRA layers and head a cohort swaps, and ``""`` or why some trainable tensor is not covered."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    trainable = adapters.trainable_names(model)
    covered: set[str] = set()
    lora, head = [], None
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer | ModulesToSaveWrapper) or len(module.active_adapters) != 1:
            continue  # several adapters at once stay uncovered, so no batching
        name = module.active_adapters[0]
        if isinstance(module, LoraLayer):
            a_name, b_name = f"{path}.lora_A.{name}.weight", f"{path}.lora_B.{name}.weight"
            plain = (
                name in module.lora_A  # LoRA on embeddings keeps its factors elsewhere
                and not module.merged
                and name not in getattr(module, "lora_variant", {})
                and isinstance(module.lora_dropout[name], nn.Identity)
                and isinstance(module.lora_A[name], nn.Linear)
                and module.lora_A[name].bias is None
                and module.lora_B[name].bias is None
            )
            if plain and a_name in trainable and b_name in trainable:
                lora.append((path, a_name, b_name, float(module.scaling[name])))
                covered.update((a_name, b_name))
        elif isinstance(module, ModulesToSaveWrapper):
            inner = module.modules_to_save[name]
            w_name = f"{path}.modules_to_save.{name}.weight"
            b_name = f"{path}.modules_to_save.{name}.bias" if getattr(inner, "bias", None) is not None else None
            if isinstance(inner, nn.Linear) and w_name in trainable:
                head = (path, w_name, b_name)
                covered.update(n for n in (w_name, b_name) if n)
    missing = [n for n in trainable if n not in covered]
    reason = f"trainable tensors outside LoRA linear layers and a linear head, e.g. {missing[0]}" if missing else ""
    return Sites(tuple(lora), head), reason


def train_batched(task: Task, jobs: list[Job]) -> list[ClientRun]:
    """Train the cohort together (see the module docstring); the model is left as found.

    Returns each client's :class:`ClientRun`, whose ``params`` and ``optimizer`` tests and
    benchmarks can read.
    """
    model, cfg = task.model, task.cfg
    sites, reason = find_sites(model)
    if reason:
        raise ValueError(f"cannot train this cohort batched: {reason}")
    device = next(model.parameters()).device
    live = dict(model.named_parameters())
    clients = []
    for state, pid, rnd in jobs:
        adapters.check_state(state, {n: tuple(live[n].shape) for n in adapters.trainable_names(model)}, "adapter state")
        params = {
            n: torch.as_tensor(state[n]).to(device, live[n].dtype).clone().requires_grad_(True)
            for n in adapters.trainable_names(model)
        }
        loader = task.train_loader(task.client_rows(pid), rnd, pid)
        batches = itertools.islice(
            cycle_batches(loader), planned_steps(len(loader), cfg.train.local_steps, cfg.train.local_epochs)
        )
        optimizer = build_param_optimizer(list(params.values()), cfg.train)
        offset = None
        if cfg.train.logit_adjust != 0:
            rows = task.client_rows(pid)
            offset = cfg.train.logit_adjust * label_log_prior(rows.labels, len(rows.label_names)).to(device)
        clients.append(ClientRun(pid, rnd, state, params, optimizer, batches, logit_offset=offset))
    step = CohortStep()
    swaps = _cohort_modules(model, sites, clients, step)
    pad_id = task.tokenizer.pad_token_id or 0
    was_training = model.training
    with swapped_modules(model, swaps), torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "cohort-dropout", jobs[0][2], jobs[0][1]))
        model.train()
        try:
            while _train_step(model, clients, step, pad_id, device):
                pass
        finally:
            model.train(was_training)
    return clients


def _cohort_modules(model: nn.Module, sites: Sites, clients: list[ClientRun], step: CohortStep) -> dict:
    swaps: dict[str, nn.Module] = {}
    for path, a_name, b_name, scaling in sites.lora:
        base = model.get_submodule(path).base_layer
        a = [c.params[a_name] for c in clients]
        b = [c.params[b_name] for c in clients]
        swaps[path] = CohortLoraLinear(base, scaling, a, b, step)
    if sites.head is not None:
        path, w_name, b_name = sites.head
        bias = [c.params[b_name] for c in clients] if b_name else None
        swaps[path] = CohortHead([c.params[w_name] for c in clients], bias, step)
    return swaps


def _train_step(model: nn.Module, clients: list[ClientRun], step: CohortStep, pad_id: int, device) -> bool:
    """One forward/backward over the next batch of every client that has steps left."""
    batches = {i: b for i, c in enumerate(clients) if (b := next(c.batches, None)) is not None}
    if not batches:
        return False
    step.active = list(batches)
    counts = [int(b["labels"].shape[0]) for b in batches.values()]
    step.segments = Segments.from_counts(counts, device)
    batch = concat_batches(list(batches.values()), pad_id)
    for i in step.active:
        clients[i].optimizer.zero_grad(set_to_none=True)
    logits = forward_logits(model, batch)
    if clients[step.active[0]].logit_offset is not None:  # each row gets its own client's offset
        offsets = torch.stack([clients[i].logit_offset for i in step.active])
        logits = logits.float() + offsets[step.segments.client]
    per_row = F.cross_entropy(logits.float(), batch["labels"].to(logits.device), reduction="none")
    sums = per_row.new_zeros(len(counts)).index_add(0, step.segments.client, per_row)
    losses = sums / torch.tensor(counts, dtype=sums.dtype, device=sums.device)
    values = losses.tolist()
    for i, value in zip(step.active, values, strict=True):
        if not math.isfinite(value):
            raise FloatingPointError(
                f"local loss of partition {clients[i].partition_id} became {value} at step "
                f"{len(clients[i].losses)}; lower train.lr"
            )
    # Sum of per-client means: client k's tensors get exactly the gradient of its own mean loss.
    losses.sum().backward()
    for i, value, count in zip(step.active, values, counts, strict=True):
        clients[i].optimizer.step()
        clients[i].losses.append(value)
        clients[i].num_examples += count
    return True


def concat_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate tokenized batches, right-padding each to the longest (``input_ids`` with
    ``pad_id``, the attention mask and every other per-token field with 0)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key]
            if t.dim() == 2 and t.shape[1] < length:
                t = F.pad(t, (0, length - t.shape[1]), value=pad_id if key == "input_ids" else 0)
            parts.append(t)
        out[key] = torch.cat(parts)
    return out
