"""Joining a Ray cluster that has token authentication on (``RAY_AUTH_MODE=token``).

Ray refuses a client without the cluster's token (or with a wrong one) in its own words, after
``ray.init`` has retried for 20 s; :func:`check_token` asks the cluster once beforehand and
:func:`refused` says in one line what to set (docs/cluster.md, "Authentication").
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys


def check_token(address: str) -> None:
    """Raise Ray's AuthenticationError now if the cluster at ``address`` refuses this client's
    token (missing or wrong), instead of after ``ray.init``'s 20 s of retries.

    Only a GCS address (host:port) that accepts TCP connections is asked, once; anything else
    (unreachable, Ray Client ``ray://``) is left to ``ray.init`` and its own errors.
    """
    try:  # Ray internals (as ray.init uses them); another Ray layout: ray.init alone decides
        from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
        from ray._raylet import GcsClient
    except ImportError:
        return
    from ray.exceptions import AuthenticationError

    ensure_token_if_auth_enabled(None, create_token_if_missing=False)  # token mode, no token here
    if _gcs_address(address) is None or not listening(address):
        return
    with _quiet_stderr():  # Ray's C++ client logs the refusal too, as a second line
        try:
            GcsClient(address=address)
        except AuthenticationError:
            raise
        except Exception:  # not this check's business: ray.init reports it
            return


def _gcs_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS ``host:port``; None for anything else (``auto``, ``ray://``)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def listening(address: str) -> bool:
    """Whether something accepts TCP connections at a GCS ``host:port``; True for what is not
    one (``auto``, ``ray://`` clients), which ray.init resolves and reports itself."""
    gcs = _gcs_address(address)
    if gcs is None:
        return True
    try:
        socket.create_connection(gcs, timeout=3).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


REFUSALS = ("AuthenticationError", "InvalidAuthToken")  # Ray's words for it, as text


def failure(err: BaseException | None) -> BaseException | None:
    """The AuthenticationError somewhere in ``err``'s chain (ray.init wraps it), if any."""
    from ray.exceptions import AuthenticationError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)  # ray.init's RuntimeError holds the refusal as traceback text
        if isinstance(err, AuthenticationError) or any(k in text for k in REFUSALS):
            return err
        err = err.__cause__ or err.__context__
    return None


def refused(address: str, err: BaseException) -> str:
    """The one-line error for a client the cluster at ``address`` refused (``err``: Ray's)."""
    text, mode = str(err), os.environ.get("RAY_AUTH_MODE", "unset")
    if "RAY_AUTH_TOKEN_PATH is set" in text:
        why = f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')} cannot be read or is empty"
    elif "no authentication token was found" in text or "couldn't find an authentication token" in text:
        why = "RAY_AUTH_MODE=token but no token was found here"
    elif mode.lower() != "token":
        why = f"it uses token authentication and RAY_AUTH_MODE is {mode} here, so no token was sent"
    else:
        why = "it uses token authentication and rejected this client's token"
    return (f"Ray cluster at {address!r} (RAY_ADDRESS or `ray start`) refused this client: {why}; "
            f"set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token and "
            f"RAY_AUTH_MODE=token (docs/cluster.md#authentication)")
