"""A tiny random Llama with SmolLM2's tokenizer, written once per process to a temporary folder.

2 layers, hidden 64, SmolLM2's 49,152-token vocabulary (so its chat template and label words
are the real ones); the weights are random (seeded), so it learns fast and runs in
milliseconds. The tokenizer comes from the converted embedded model when that cache exists
(fedpeft/causal_lm.py), else straight from the GGUF file (about 8 s).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from fedpeft.config import ExperimentConfig


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from fedpeft.causal_lm import EMBEDDED_GGUF, cache_root, embedded_gguf

    gguf = embedded_gguf()
    converted = cache_root() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=EMBEDDED_GGUF)


@lru_cache(maxsize=1)
def tiny_llama_folder() -> str:
    """The folder (``save_pretrained``) of the tiny Llama and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    folder = Path(tempfile.mkdtemp(prefix="fedpeft-tiny-llama-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def tiny_lm_config(**overrides) -> ExperimentConfig:
    """The causal-LM task on the tiny Llama: 3 clients, 2 rounds, 48 train / 24 test snippets, fp32."""
    flat = {
        "name": "tiny-lm",
        "task.kind": "causal-lm",
        "model.name": tiny_llama_folder(),
        "model.quantization": "none",
        "num-rounds": 2,
        "data.num-train-examples": 48,
        "data.num-test-examples": 24,
        "data.max-seq-len": 96,
        "partition.num-partitions": 3,
        "partition.min-partition-size": 4,
        "participation.model": "always",
        "train.local-steps": 2,
        "train.batch-size": 8,
        "train.eval-batch-size": 16,
        "train.lr": 0.01,
        "task.num-sample-generations": 2,
        "task.max-new-tokens": 4,
        "simulation.node-wait-s": 60.0,
    }
    flat.update(overrides)
    return ExperimentConfig.from_flat(flat)
