"""Instruction examples from a local file or an HF dataset: Alpaca columns or HF chat messages.

Alpaca layout: ``data.instruction-column``, an optional ``data.input-column`` (joined after a
blank line, as Alpaca's prompt does) and ``data.response-column``. Chat layout, used when the
response column is absent: ``data.messages-column`` holds a list of ``{"role", "content"}``
turns whose last assistant turn is the response. Files are read by fedpeft.data's reader (the
classifier's: UTF-8 and empty-file checks); every bad row raises a :class:`ConfigError` naming
its row and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError, DataConfig
from fedpeft.instruct import ROLES, Example


def load_file_examples(cfg: DataConfig) -> list[Example]:
    """Examples from a local file or an HF dataset, Alpaca columns or a messages column."""
    table = _read_table(cfg)
    columns = list(table.column_names)
    name = cfg.dataset
    if len(table) == 0:
        raise ConfigError(f"data.dataset={name!r} has no data rows; give a file with rows")
    groups = [""] * len(table)
    if cfg.group_column:
        groups = [_text(g).strip() for g in _column(table, cfg.group_column, "group", columns, name)]
        if "" in groups:
            raise ConfigError(
                f"{name}: column {cfg.group_column!r} (data.group-column) is empty in data row "
                f"{groups.index('') + 1}; fill or delete that row"
            )
    if cfg.messages_column and cfg.messages_column in columns and cfg.response_column not in columns:
        rows = table[cfg.messages_column]
        return [_from_messages(name, i, raw, g) for i, (raw, g) in enumerate(zip(rows, groups, strict=True))]
    if cfg.response_column not in columns:
        raise ConfigError(
            f"data.response-column={cfg.response_column!r} is not a column of {name!r}; columns are {columns}; "
            f"set data.response-column (with data.instruction-column) to the reply's column, or "
            f"data.messages-column to a column of chat messages"
        )
    instructions = _column(table, cfg.instruction_column, "instruction", columns, name)
    responses = table[cfg.response_column]
    inputs = [""] * len(table)
    if cfg.input_column and cfg.input_column in columns:
        inputs = table[cfg.input_column]
    elif cfg.input_column and cfg.input_column != DataConfig.input_column:
        raise ConfigError(
            f"data.input-column={cfg.input_column!r} is not a column of {name!r}; columns are {columns}; "
            'set it to one of them, or to "" for none'
        )
    examples = []
    for i, (ins, extra, resp, group) in enumerate(zip(instructions, inputs, responses, groups, strict=True)):
        ins, extra, resp = _text(ins), _text(extra), _text(resp)
        if not resp.strip():
            raise ConfigError(
                f"{name}: column {cfg.response_column!r} is empty in data row {i + 1}; fill or delete that row"
            )
        if not ins.strip() and not extra.strip():
            raise ConfigError(
                f"{name}: columns {cfg.instruction_column!r} and {cfg.input_column!r} are both empty in data row "
                f"{i + 1}; fill or delete that row"
            )
        # Alpaca's layout: the instruction, then its input (if any) after a blank line, as one user turn.
        content = "\n\n".join(part for part in (ins.strip(), extra.strip()) if part)
        examples.append(Example(messages=({"role": "user", "content": content},), response=resp.strip(), group=group))
    return examples


def _read_table(cfg: DataConfig):
    """A ``datasets.Dataset`` from a local file (fedpeft.data's reader) or from the HF hub."""
    from fedpeft.data import LOCAL_SUFFIXES, _load_local_table

    path = Path(cfg.dataset).expanduser()
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(
            f"data.dataset={cfg.dataset!r} has the unknown extension {path.suffix!r}; "
            f"save it as one of {', '.join(LOCAL_SUFFIXES)}"
        )
    if path.suffix in LOCAL_SUFFIXES:
        try:
            return _load_local_table(path, cfg.dataset)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
    import datasets

    try:
        return datasets.load_dataset(cfg.dataset, split=cfg.split)
    except Exception as err:  # the hub's errors have many types (offline, not found, gated, bad split)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"data.dataset={cfg.dataset!r} is not a local file ({', '.join(LOCAL_SUFFIXES)}) and could not be loaded "
            f"from the HF hub ({type(err).__name__}: {first}); check the name, data.split and the internet "
            "connection, or give a local file"
        ) from None


def _column(table, column: str, role: str, columns: list[str], name: str) -> list:
    if column not in columns:
        raise ConfigError(
            f"data.{role}-column={column!r} is not a column of {name!r}; columns are {columns}; "
            f"set data.{role}-column to one of them"
        )
    return list(table[column])


def _text(value: Any) -> str:
    """A cell as text; None and NaN are empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _from_messages(name: str, row: int, raw: Any, group: str) -> Example:
    """An example from one HF chat-format list: the last assistant turn is the response.

    Turns after the last assistant turn have nothing to answer them and are dropped. A cell
    holding a JSON string (a CSV file) is parsed first.
    """
    where = f"{name}: data row {row + 1}"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: the messages cell is not a JSON list of chat turns; fix that row") from None
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} turns")
    turns = []
    for turn in raw:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ConfigError(
                f"{where}: turn {turn!r} is not {{'role': one of {list(ROLES)}, 'content': text}}; fix that row"
            )
        turns.append({"role": turn["role"], "content": turn["content"]})
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=-1)
    if last < 0:
        raise ConfigError(f"{where}: the messages hold no assistant turn, so there is no response; fix that row")
    if not turns[last]["content"].strip():
        raise ConfigError(f"{where}: the last assistant turn (the response) is empty; fill or delete that row")
    if not any(t["role"] == "user" for t in turns[:last]):
        raise ConfigError(f"{where}: no user turn comes before the last assistant turn; fix that row")
    return Example(messages=tuple(turns[:last]), response=turns[last]["content"].strip(), group=group)
