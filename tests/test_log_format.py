"""Logs: one format for fedpeft's and Flower's lines; the model line in words."""

import re
import subprocess
import sys
from pathlib import Path

from fedpeft.task import describe_model
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_flower_and_fedpeft_lines_share_one_format_and_flower_debug_stays_hidden():
    script = (
        "import logging, flwr.common.logger\n"
        "from simulations.quiet import use_one_log_format\n"
        "use_one_log_format()\n"
        "logging.getLogger('flwr').info('from flower')\n"
        "logging.getLogger('flwr').debug('flower debug')\n"
        "logging.getLogger('fedpeft').info('from fedpeft')\n"
    )
    err = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stderr
    lines = err.strip().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert len(lines) == 2, err
    assert re.fullmatch(rf"{stamp} INFO flwr: from flower", lines[0]), lines
    assert re.fullmatch(rf"{stamp} INFO fedpeft: from fedpeft", lines[1]), lines


def test_the_model_line_names_model_quantization_and_method_in_words():
    assert describe_model(tiny_config(), 2) == "embedded, NF4-quantized, LoRA r=8 on query,key,value,dense, 2 labels"
    cfg = tiny_config(**{"model.quantization": "none", "peft.method": "prompt", "peft.num-virtual-tokens": 4})
    assert describe_model(cfg, 3) == "embedded, not quantized, prompt tuning (4 virtual tokens), 3 labels"
    cfg = tiny_config(**{"model.quantization": "int8", "peft.method": "ia3"})
    assert describe_model(cfg, 2) == "embedded, int8-quantized, IA3, 2 labels"
