"""Joining a Ray cluster (checked first, one-line errors) or starting a private local Ray instance.

Every Ray entry point of the project (the Tune search, supernet training, the scoring workers)
starts Ray through `init_ray`, so a search, a supernet and a fan-out of scoring reach a cluster
the same way: `--address`, else $RAY_ADDRESS, else a new local instance.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray

from search_spaces.errors import NasError

CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Fail fast (one line) when a cluster address does not answer, instead of Ray's long retries."""

    if address == "auto":
        if not (os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists()):
            raise NasError("--address auto: no running Ray cluster found on this machine (start one with `ray start "
                           "--head`, or give --address HOST:PORT)")
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise NasError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise NasError(f"--address {address}: cannot reach a Ray cluster there within {CONNECT_TIMEOUT_S:.0f} s "
                       f"({e.strerror or e})") from None


def init_ray(address: str | None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), checked first; else start a private local instance."""
    if ray.is_initialized():
        return
    env = {"PYTHONWARNINGS": "ignore"}
    address = address or os.environ.get("RAY_ADDRESS")  # set by Ray for a `ray job submit` entrypoint
    if address:
        _check_reachable(address)
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        # address="local": a new local instance even where another cluster runs on this machine (without
        # it Ray joins the cluster named in /tmp/ray/ray_current_cluster, and refuses num_cpus there)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env}, configure_logging=False)
