"""What the PostgreSQL and Redis halves share: one libpoolbroker client
(pb_client) per thread and broker socket, and the library's error codes."""

import os
import threading

from . import _poolbroker as _pb

LibError = _pb.LibError

_local = threading.local()


def client_for(socket):
    """The calling thread's Client (pb_client) for the broker at socket
    (None: $POOLBROKER_SOCKET, else /run/poolbroker/poolbroker.sock).

    One per thread because a pb_client is not thread-safe; created on first
    use and kept.  Inherited across fork() it re-attaches in the child on
    first use (libpoolbroker does that), so a module imported and used before
    gunicorn --preload forks keeps working in every worker.  Raises LibError
    when the broker cannot be attached."""
    if socket is None:
        socket = os.environ.get("POOLBROKER_SOCKET") or None
    clients = getattr(_local, "clients", None)
    if clients is None:
        clients = _local.clients = {}
    c = clients.get(socket)
    if c is None:
        c = clients[socket] = _pb.Client(socket)
    return c


def lib_message(e):
    """'<what> failed: <pb_strerror> (PB_E...)' for a LibError."""
    code, text, what = e.args
    return f"cannot {what}: {text} ({ERROR_NAMES.get(code, code)})"


ERROR_NAMES = {getattr(_pb, n): n for n in dir(_pb) if n.startswith("PB_E")}
