"""Whether a process is still alive: one answer for the deployment tooling and its tests.

A zombie (exited, not yet reaped) counts as dead; our own zombie child is reaped on the way.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (another user's process counts; a zombie does not)."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our zombie child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:  # gone since the kill, or a system without /proc (where the kill's answer stands)
        return not Path("/proc/self").exists()
