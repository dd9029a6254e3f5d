"""``fedpeft config [KEY]``: every config key with its default, choices, range and help, as text.

Read off :data:`fedpeft.config.KEYS` (the dataclass fields' metadata), so the listing cannot drift
from the code: a new field shows up here with the help text it was declared with.
"""

from __future__ import annotations

import difflib
import textwrap

from fedpeft.config import KEYS, SECTIONS, ConfigError, Key

WIDTH = 100


def toml_value(value: object) -> str:
    """A default as it would be written in a config file (``"nf4"``, ``true``, ``1e-05``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _facts(key: Key) -> list[str]:
    facts = []
    if key.choices:
        facts.append(f"one of: {', '.join(key.choices)}")
    if key.rule:
        facts.append(f"range: {key.rule}")
    if key.modes:
        switch, modes = key.modes
        facts.append(f"only with {switch} = {' / '.join(modes)}")
    return facts


def describe_key(key: Key) -> str:
    """Two or more lines: ``key = default``, then its choices / range / modes and its help, indented."""
    body = "; ".join([key.help, *_facts(key)])
    return f"{key.name} = {toml_value(key.default)}\n" + textwrap.fill(
        body, WIDTH, initial_indent="    ", subsequent_indent="    "
    )


def describe(name: str | None = None) -> str:
    """Every key (``name`` None), one section's keys (``name`` = ``"dp"``) or one key.

    Raises
    ------
    ConfigError
        ``name`` is neither a key nor a section; the message names the close matches.
    """
    if name is None:
        keys = list(KEYS.values())
    elif name in KEYS:
        keys = [KEYS[name]]
    elif name in SECTIONS:
        keys = [k for k in KEYS.values() if k.name.startswith(f"{name}.")]
    else:
        close = difflib.get_close_matches(name, [*KEYS, *SECTIONS], n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown config key {name!r}; {hint}run `fedpeft config` to list all {len(KEYS)} keys")
    return "\n".join(describe_key(k) for k in keys)
