"""poolbroker: PostgreSQL and Redis for prefork Python servers, through the
poolbroker broker (one process owns every backend connection; workers lease
them through shared memory).

PostgreSQL: a DB-API 2.0 (PEP 249) driver with psycopg2's conventions::

    conn = poolbroker.connect(pool="main")          # leases nothing yet
    with conn:                                       # commit on success
        cur = conn.cursor()
        cur.execute("INSERT INTO t (a) VALUES (%s)", (1,))
    # the lease went back at commit

Redis: redis-py's names and return types::

    r = poolbroker.Redis(pool="cache")
    r.incr("hits")

asyncio: ``poolbroker.aio`` (asyncpg's ``connect``/``fetch``/``execute``/
``transaction()``, redis-py's asyncio ``Redis``), imported on first use.

Health: ``poolbroker.stats()`` is the segment as ``shmstat --json`` prints it.
SQLAlchemy: ``create_engine("postgresql+poolbroker:///?pool=main",
poolclass=NullPool)`` (``poolbroker.sqlalchemy``).
"""

import json as _json
import os as _os

from . import _poolbroker
from .pg import (  # noqa: F401  (the DB-API surface)
    BINARY, DATETIME, NUMBER, ROWID, STRING, Binary, Column, Connection, Cursor, DatabaseError,
    DataError, Date, DateFromTicks, Diagnostics, Error, IntegrityError, InterfaceError,
    InternalError, Json, NotSupportedError, OperationalError, ProgrammingError,
    QueryCanceledError, Time, TimeFromTicks, Timestamp, TimestampFromTicks,
    TransactionRollbackError, Warning, apilevel, connect, paramstyle, threadsafety)
from .redis import Redis  # noqa: F401

__version__ = "0.1.0"
libpoolbroker_version = _poolbroker.libpoolbroker_version


def stats(shm_name=None, pool=None):
    """The broker's shared-memory segment as a dict: exactly what
    ``shmstat --json`` prints ({"broker": {...}, "pools": [...], "slots":
    [...], "backends": [...]}, see shmstat(1)), read by the same code
    (common/shmview*.c).

    shm_name: the broker's shm_name (None: $POOLBROKER_SHM, else
    "/poolbroker").  pool: only that pool and its slots.  The segment is
    opened read-only by name, so this process needs read permission on it
    (the broker's shm_mode; same user or group).  Raises KeyError for an
    unknown pool, OSError when the segment cannot be opened or is not a
    poolbroker segment of this layout version."""
    if shm_name is None:
        shm_name = _os.environ.get("POOLBROKER_SHM") or "/poolbroker"
    return _json.loads(_poolbroker.stats_json(shm_name, pool))


def __getattr__(name):
    # poolbroker.aio is loaded when first used (poolbroker.aio.connect).
    if name == "aio":
        import importlib
        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_sqlalchemy():
    # Importing SQLAlchemy costs most of a second: register the dialect here
    # only when the application has imported it already (otherwise the
    # entry point, or `import poolbroker.sqlalchemy`, does).
    import sys
    if "sqlalchemy" in sys.modules:
        try:
            from sqlalchemy.dialects import registry
        except ImportError:
            return
        registry.register("postgresql.poolbroker", "poolbroker.sqlalchemy", "PGDialect_poolbroker")
        registry.register("poolbroker", "poolbroker.sqlalchemy", "PGDialect_poolbroker")


_register_sqlalchemy()
