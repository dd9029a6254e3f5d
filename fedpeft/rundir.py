"""Run folders are safe: a run never deletes or mixes an earlier run's results.

``fedpeft simulate`` refuses a folder that holds a ``results.json`` unless ``--overwrite``,
and refuses a non-empty folder that holds no run at all (it would mix files, and clearing
it could delete something that is not ours). :func:`check_run_dir` only inspects (it runs
with the config check, before anything is started); :func:`prepare_run_dir` clears and
creates the folder once every check has passed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fedpeft.config import ConfigError
from fedpeft.results import RESULTS_FILE


def check_run_dir(run_dir: str | Path, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Raise :class:`ConfigError` unless ``run_dir`` can take a new run; nothing is written.

    Parameters
    ----------
    run_dir : str or Path
        The run folder (``--out`` or the default ``runs/<name>/seed-<seed>``).
    overwrite : bool
        ``--overwrite``: a folder holding an earlier run (a ``results.json``) may be cleared.
    flag : str
        How the user named the folder, for the messages.
    """
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file, not a folder; pass a folder for the run's results")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} lies under the file {str(ancestor)!r}; pass a folder path")
    try:  # a probe, not os.access: root passes os.access everywhere, read-only file systems do not
        os.rmdir(tempfile.mkdtemp(prefix=".fedpeft-probe-", dir=ancestor))
    except OSError as err:
        raise ConfigError(
            f"{flag} {str(path)!r} cannot be created or written ({str(ancestor)!r}: {err.strerror}); "
            f"choose a writable {flag}"
        ) from None
    if not path.is_dir():
        return path
    entries = [p.name for p in path.iterdir()]
    if RESULTS_FILE in entries:
        if not overwrite:
            raise ConfigError(
                f"{flag} {str(path)!r} holds an earlier run ({RESULTS_FILE}); pass --overwrite to replace it "
                f"or choose another {flag}"
            )
    elif entries:
        raise ConfigError(
            f"{flag} {str(path)!r} is not empty and holds no fedpeft run ({', '.join(sorted(entries)[:5])}); "
            f"choose a new or empty folder for {flag}"
        )
    return path


def prepare_run_dir(run_dir: str | Path, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check ``run_dir`` again, clear an earlier run in it when ``overwrite``, create it; return it."""
    path = check_run_dir(run_dir, overwrite=overwrite, flag=flag)
    if overwrite and (path / RESULTS_FILE).is_file():
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag} {str(path)!r} cannot be created ({err.strerror})") from None
    return path


class RunDir:
    """One run's folder and every file name in it: the only place that spells them.

    >>> RunDir("runs/quickstart/seed-0").results
    PosixPath('runs/quickstart/seed-0/results.json')
    """

    RESULTS = RESULTS_FILE  # the source of truth: config, versions, every round (fedpeft/results.py)
    CHECKPOINT_META = "checkpoint.json"  # round, strategy state, byte ledger (simulations/resume.py)
    CHECKPOINT_ARRAYS = "checkpoint.npz"  # the global adapter and any strategy arrays
    ADAPTER = "adapter"  # the final adapter, exported with peft (fedpeft/adapters.py)
    FIGURE = "accuracy.png"  # accuracy per round, written after the run (fedpeft/plot.py)
    SWEEP = "sweep.json"  # a sweep folder's manifest of planned runs (simulations/experiments/sweep.py)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def results(self) -> Path:
        return self.path / self.RESULTS

    @property
    def checkpoint_meta(self) -> Path:
        return self.path / self.CHECKPOINT_META

    @property
    def checkpoint_arrays(self) -> Path:
        return self.path / self.CHECKPOINT_ARRAYS

    @property
    def adapter(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def figure(self) -> Path:
        return self.path / self.FIGURE

    @property
    def sweep(self) -> Path:
        return self.path / self.SWEEP

    @staticmethod
    def results_of(path: str | Path) -> Path:
        """``path`` itself when it is a results file, else the results file of the run folder ``path``."""
        path = Path(path)
        return path / RESULTS_FILE if path.is_dir() else path

    @staticmethod
    def find_results(root: str | Path) -> list[Path]:
        """Every results file under ``root`` (a sweep folder), sorted."""
        return sorted(Path(root).rglob(RESULTS_FILE))
