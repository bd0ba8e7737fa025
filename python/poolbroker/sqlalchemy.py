"""SQLAlchemy 1.4 dialect ``postgresql+poolbroker``.

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool
    engine = create_engine("postgresql+poolbroker:///?pool=main", poolclass=NullPool)
    # optional query arguments: socket=/run/poolbroker/poolbroker.sock,
    # acquire_timeout_ms=2000

Use NullPool: the broker is the pool.  A poolbroker Connection holds no
backend connection between transactions, so SQLAlchemy's own pool would
only keep Python objects around; with NullPool each checkout is a
``poolbroker.connect()`` (no I/O until the first statement).  Host, port,
user, password and database in the URL are refused: the broker's pool
configuration decides where connections go.

The dialect is registered as the entry point ``postgresql.poolbroker``
(``pip install ./python``) and by importing this module (for an in-place
build: ``import poolbroker.sqlalchemy`` before ``create_engine``; importing
``poolbroker`` does it too when SQLAlchemy is already imported).

Built on SQLAlchemy's PGDialect with the result types of its psycopg2
dialect (this driver, like psycopg2, returns Decimal for numeric, parsed
JSON and lists for arrays); uuid columns come back as uuid.UUID natively.
"""
from sqlalchemy import exc
from sqlalchemy import types as sqltypes
from sqlalchemy import util
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.base import PGDialect, PGExecutionContext, PGIdentifierPreparer
from sqlalchemy.dialects.postgresql.base import UUID
from sqlalchemy.dialects.postgresql.json import JSON, JSONB
# The psycopg2 dialect's result-type adaptations fit this driver as they are
# (numeric/float by OID, JSON already parsed, arrays cast with ::type, native
# UUID to str when as_uuid=False); they import nothing of psycopg2 itself.
from sqlalchemy.dialects.postgresql.psycopg2 import _PGARRAY, _PGJSON, _PGJSONB, _PGNumeric, _PGUUID

from . import _poolbroker as _pb


class PGExecutionContext_poolbroker(PGExecutionContext):
    pass


class PGDialect_poolbroker(PGDialect):
    """PostgreSQL through poolbroker (``postgresql+poolbroker://``)."""

    driver = "poolbroker"
    supports_statement_cache = True
    supports_unicode_statements = True
    supports_unicode_binds = True
    default_paramstyle = "pyformat"
    supports_sane_multi_rowcount = True      # executemany's rowcount is the total
    supports_server_side_cursors = False
    supports_native_decimal = True
    use_native_uuid = True
    execution_ctx_cls = PGExecutionContext_poolbroker
    preparer = PGIdentifierPreparer

    colspecs = util.update_copy(
        PGDialect.colspecs,
        {
            sqltypes.Numeric: _PGNumeric,
            JSON: _PGJSON,
            sqltypes.JSON: _PGJSON,
            JSONB: _PGJSONB,
            UUID: _PGUUID,
            sqltypes.ARRAY: _PGARRAY,
        },
    )

    _isolation_levels = ("AUTOCOMMIT", "READ COMMITTED", "READ UNCOMMITTED", "REPEATABLE READ", "SERIALIZABLE")

    @classmethod
    def dbapi(cls):
        import poolbroker
        return poolbroker

    def create_connect_args(self, url):
        """URL query -> poolbroker.connect(pool=, socket=, acquire_timeout_ms=)."""
        for part in ("host", "port", "username", "password", "database"):
            if getattr(url, part):
                raise exc.ArgumentError(
                    f"postgresql+poolbroker URLs take no {part}: the broker's pool configuration "
                    "decides the server; use postgresql+poolbroker:///?pool=NAME[&socket=PATH]")
        opts = dict(url.query)
        unknown = set(opts) - {"pool", "socket", "acquire_timeout_ms"}
        if unknown:
            raise exc.ArgumentError(f"unknown postgresql+poolbroker URL argument(s): {', '.join(sorted(unknown))}"
                                    " (known: pool, socket, acquire_timeout_ms)")
        if "acquire_timeout_ms" in opts:
            opts["acquire_timeout_ms"] = int(opts["acquire_timeout_ms"])
        opts.setdefault("pool", "main")
        return ([], opts)

    def set_isolation_level(self, connection, level):
        level = level.replace("_", " ")
        if level not in self._isolation_levels:
            raise exc.ArgumentError(
                f"Invalid value '{level}' for isolation_level. Valid isolation levels for {self.name} are "
                + ", ".join(self._isolation_levels))
        if level == "AUTOCOMMIT":
            connection.autocommit = True
        else:
            connection.autocommit = False
            connection.set_session(isolation_level=level)

    def get_isolation_level(self, connection):
        if connection.autocommit:
            return "AUTOCOMMIT"
        if connection.isolation_level:
            return connection.isolation_level
        return super().get_isolation_level(connection)

    def reset_isolation_level(self, dbapi_conn):
        dbapi_conn.autocommit = False
        dbapi_conn.set_session(isolation_level="DEFAULT")

    def set_readonly(self, connection, value):
        connection.set_session(readonly=value)

    def get_readonly(self, connection):
        return connection.readonly

    def set_deferrable(self, connection, value):
        connection.set_session(deferrable=value)

    def get_deferrable(self, connection):
        return connection.deferrable

    def is_disconnect(self, e, connection, cursor):
        """The broker or the backend went away (the next statement leases
        afresh), or the Connection was closed."""
        if isinstance(e, self.dbapi.InterfaceError) and "already closed" in str(e):
            return True
        return isinstance(e, self.dbapi.OperationalError) and e.pb_code in (
            _pb.PB_EBROKER, _pb.PB_EBACKEND, _pb.PB_ESTALE)


dialect = PGDialect_poolbroker

# For in-place use (no entry point installed).
registry.register("postgresql.poolbroker", "poolbroker.sqlalchemy", "PGDialect_poolbroker")
registry.register("poolbroker", "poolbroker.sqlalchemy", "PGDialect_poolbroker")
