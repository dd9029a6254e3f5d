"""Which Ray cluster a ``fedpeft simulate`` run attaches to, said in its log before Ray starts.

Flower's Ray backend calls ``ray.init()`` without an address, and Ray then attaches to a
running cluster when it finds one (``RAY_ADDRESS``, or the address file ``ray start
--head`` writes under Ray's temp folder) and otherwise starts a private instance for the
run. The run's log says which, so a run meant for a cluster that silently ran alone (or
the reverse) shows up in its first lines.
"""

from __future__ import annotations

import logging

log = logging.getLogger("fedpeft")


def ray_target() -> str | None:
    """The ``host:port`` of the cluster ``ray.init()`` would attach to now, or None for a new local instance."""
    from ray._private.services import canonicalize_bootstrap_address  # what ray.init(address=None) calls

    try:
        return canonicalize_bootstrap_address(None)
    except (ValueError, ConnectionError, OSError) as err:  # an address that is set but unusable
        log.warning("Ray: the cluster address in RAY_ADDRESS or Ray's address file is unusable (%s)", err)
        return None


def log_ray_target() -> str | None:
    """Log where this run's clients will run; return the cluster address (None: a local instance)."""
    target = ray_target()
    if target:
        log.info("Ray: attaching to the running cluster at %s (clients run on its nodes)", target)
    else:
        log.info("Ray: no running cluster found; starting a local Ray instance for this run")
    return target
