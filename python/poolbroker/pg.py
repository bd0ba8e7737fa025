"""PostgreSQL through poolbroker: a DB-API 2.0 (PEP 249) driver.

``poolbroker.connect(pool="main")`` returns a :class:`Connection` that
behaves like a psycopg2 connection, with one difference that is the point of
poolbroker: it owns no backend connection.  It leases one from the broker's
pool at its first statement and gives it back at ``commit()``,
``rollback()`` and ``close()`` (in autocommit mode, after every statement),
so a Connection kept across a slow external call holds nothing.

Queries use psycopg2's ``pyformat`` paramstyle (``%s`` and ``%(name)s``,
``%%`` for a literal percent sign); the values travel as real parameters of
the extended protocol (``pb_pg_exec_params``), never interpolated into the
SQL.  Value conversion is by type OID (see ``poolbroker._pgtypes``).
"""

import collections
import collections.abc
import datetime as _dt
import re
import time as _time

from . import _common
from . import _pgtypes as T
from . import _poolbroker as _pb
from ._pgtypes import Json  # noqa: F401  (re-exported)

apilevel = "2.0"
# Threads may share the module, not connections (PEP 249 level 1).  Each
# thread attaches its own pb_client; calls on one are serialised by a lock.
threadsafety = 1
paramstyle = "pyformat"


# ------------------------------------------------------------ exceptions (PEP 249)

class Warning(Exception):  # noqa: A001  (the name PEP 249 requires)
    """PEP 249 Warning: important warnings (not raised by this driver today)."""


class Error(Exception):
    """Base of every error this driver raises (PEP 249).

    Attributes (None when not applicable):
      sqlstate  the five-character SQLSTATE of a server error ('23505');
                ``pgcode`` is the same, under psycopg2's name
      message   the primary message; ``pgerror`` is it with severity,
                detail and hint as psql prints them (psycopg2's name)
      detail, hint   the server's DETAIL and HINT fields
      diag      the object with every error field (psycopg2's Diagnostics
                names: severity, sqlstate, message_primary, message_detail,
                message_hint, statement_position, context, schema_name,
                table_name, column_name, datatype_name, constraint_name, ...)
      pb_code   the libpoolbroker error code (PB_E*, negative) when the error
                came from the library rather than the server
    """

    def __init__(self, *args, sqlstate=None, detail=None, hint=None, diag=None, pb_code=None):
        super().__init__(*args)
        self.message = args[0] if args else None
        self.sqlstate = sqlstate
        self.detail = detail
        self.hint = hint
        self.diag = diag if diag is not None else Diagnostics({})
        self.pb_code = pb_code
        self.cursor = None

    @property
    def pgcode(self):
        return self.sqlstate

    @property
    def pgerror(self):
        if self.sqlstate is None:
            return None
        s = f"{self.diag.severity or 'ERROR'}:  {self.message}\n"
        if self.detail:
            s += f"DETAIL:  {self.detail}\n"
        if self.hint:
            s += f"HINT:  {self.hint}\n"
        return s


class InterfaceError(Error):
    """Misuse of the driver: closed connection or cursor, bad arguments."""


class DatabaseError(Error):
    """An error of the database (or of reaching it through the broker)."""


class DataError(DatabaseError):
    """SQLSTATE class 22 (data exception), or a value that cannot be converted."""


class OperationalError(DatabaseError):
    """The database's operation failed: broker or backend unreachable, no
    connection free within acquire_timeout_ms, command_timeout_ms exceeded
    (SQLSTATE 57014), SQLSTATE classes 08, 26-28, 34, 53-58, HV."""


class IntegrityError(DatabaseError):
    """SQLSTATE class 23: integrity constraint violation (unique, foreign key, ...)."""


class InternalError(DatabaseError):
    """SQLSTATE classes 24, 25, 2B, 2D, 2F, 38, 39, 3B, F0, P0, XX; a protocol error."""


class ProgrammingError(DatabaseError):
    """SQLSTATE classes 20, 21, 3D, 3F, 42, 44; bad placeholders; unadaptable values."""


class NotSupportedError(DatabaseError):
    """SQLSTATE class 0A, or an optional DB-API method this driver does not offer."""


class TransactionRollbackError(OperationalError):
    """SQLSTATE class 40 (serialization failure, deadlock): retry the transaction (psycopg2's name)."""


class QueryCanceledError(OperationalError):
    """SQLSTATE 57014: the statement was cancelled (command_timeout_ms) (psycopg2's name)."""


class Diagnostics:
    """Every field of a server error, by psycopg2's Diagnostics names."""

    _FIELDS = {
        "severity": "S", "severity_nonlocalized": "V", "sqlstate": "C", "message_primary": "M",
        "message_detail": "D", "message_hint": "H", "statement_position": "P",
        "internal_position": "p", "internal_query": "q", "context": "W", "schema_name": "s",
        "table_name": "t", "column_name": "c", "datatype_name": "d", "constraint_name": "n",
        "source_file": "F", "source_line": "L", "source_function": "R",
    }

    def __init__(self, fields):
        self._f = fields

    def __getattr__(self, name):
        try:
            return self._f.get(Diagnostics._FIELDS[name])
        except KeyError:
            raise AttributeError(name) from None


def _class_for_sqlstate(code):
    """psycopg2's mapping of SQLSTATE to exception class (psycopg/error_type.c)."""
    c0, c1 = code[:1], code[1:2]
    if c0 == "0" and c1 == "A":
        return NotSupportedError
    if c0 == "2":
        if c1 in "01":
            return ProgrammingError
        if c1 == "2":
            return DataError
        if c1 == "3":
            return IntegrityError
        if c1 in "45BDF":
            return InternalError
        if c1 in "678":
            return OperationalError
    if c0 == "3":
        if c1 == "4":
            return OperationalError
        if c1 in "89B":
            return InternalError
        if c1 in "DF":
            return ProgrammingError
    if c0 == "4":
        if c1 == "0":
            return TransactionRollbackError
        if c1 in "24":
            return ProgrammingError
    if c0 == "5":
        return QueryCanceledError if code == "57014" else OperationalError
    if c0 in "FPX":
        return InternalError
    if c0 == "H":
        return OperationalError
    return DatabaseError


def _server_error(fields):
    code = fields.get("C") or ""
    cls = _class_for_sqlstate(code)
    return cls(fields.get("M", "(no message)"), sqlstate=code or None, detail=fields.get("D"),
               hint=fields.get("H"), diag=Diagnostics(fields))


_LIB_CLASSES = {
    _pb.PB_EINVAL: InterfaceError, _pb.PB_ETYPE: InterfaceError, _pb.PB_EBUSY: InterfaceError,
    _pb.PB_EPROTO: InternalError,
}


def _lib_error(e):
    code = e.args[0]
    cls = _LIB_CLASSES.get(code, OperationalError)
    return cls(_common.lib_message(e), pb_code=code)


# ------------------------------------------------------------ types (PEP 249)

Date = _dt.date
Time = _dt.time
Timestamp = _dt.datetime


def DateFromTicks(ticks):
    """PEP 249: the local date of a POSIX time."""
    return Date(*_time.localtime(ticks)[:3])


def TimeFromTicks(ticks):
    """PEP 249: the local time of day of a POSIX time (whole seconds)."""
    return Time(*_time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks):
    """PEP 249: the local timestamp of a POSIX time (whole seconds)."""
    return Timestamp(*_time.localtime(ticks)[:6])


def Binary(data):
    """PEP 249: a value to send as bytea (bytes)."""
    return bytes(data)


class DBAPITypeObject:
    """PEP 249 type object: equal to each type OID it covers, so
    ``cursor.description[i].type_code == NUMBER`` works."""

    def __init__(self, name, *oids):
        self.name = name
        self.values = frozenset(oids)

    def __eq__(self, other):
        if isinstance(other, DBAPITypeObject):
            return self.values == other.values
        return other in self.values

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.values)

    def __repr__(self):
        return f"<DBAPITypeObject {self.name}>"


STRING = DBAPITypeObject("STRING", T.TEXT, T.VARCHAR, T.BPCHAR, T.NAME, T.CHAR, T.UNKNOWN, T.JSON, T.JSONB)
BINARY = DBAPITypeObject("BINARY", T.BYTEA)
NUMBER = DBAPITypeObject("NUMBER", T.INT2, T.INT4, T.INT8, T.FLOAT4, T.FLOAT8, T.NUMERIC, T.OID)
DATETIME = DBAPITypeObject("DATETIME", T.DATE, T.TIME, T.TIMETZ, T.TIMESTAMP, T.TIMESTAMPTZ, T.INTERVAL)
ROWID = DBAPITypeObject("ROWID", T.OID)

Column = collections.namedtuple(
    "Column", "name type_code display_size internal_size precision scale null_ok")
Column.__doc__ = "One entry of cursor.description (PEP 249's 7 items; psycopg2's Column names)."


# ------------------------------------------------------------ placeholders

_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]*)\))?(?P<conv>.)?", re.S)


def _convert_query(query, params):
    """pyformat SQL -> ($n SQL, [values]).  Mapping params use %(name)s (a
    name used twice is one parameter), sequences use %s; %% is '%'."""
    named = isinstance(params, collections.abc.Mapping)
    out, values, index = [], [], {}
    pos = last = 0
    for m in _PLACEHOLDER.finditer(query):
        out.append(query[last:m.start()])
        last = m.end()
        name, conv = m.group("name"), m.group("conv")
        if conv == "%" and name is None:
            out.append("%")
            continue
        if conv != "s":
            raise ProgrammingError(f"unsupported placeholder {m.group(0)!r} at position {m.start()}: "
                                   "use %s, %(name)s or %% (pyformat)")
        if name is not None:
            if not named:
                raise ProgrammingError(f"placeholder %({name})s needs a mapping of parameters, "
                                       f"got {type(params).__name__}")
            if name not in index:
                if name not in params:
                    raise ProgrammingError(f"no value for placeholder %({name})s")
                values.append(params[name])
                index[name] = len(values)
            out.append(f"${index[name]}")
        else:
            if named:
                raise ProgrammingError("placeholder %s needs a sequence of parameters, got a mapping")
            if pos >= len(params):
                raise ProgrammingError(f"the query has more %s placeholders than the {len(params)} "
                                       "parameters given")
            values.append(params[pos])
            pos += 1
            out.append(f"${pos}")
    out.append(query[last:])
    if not named and pos != len(params):
        raise ProgrammingError(f"{len(params)} parameters given but the query has {pos} %s placeholders")
    return "".join(out), values


def _statement(query, params):
    """(sql, values, types, formats) for pg_exec_params / pg_pipeline."""
    if isinstance(query, bytes):
        query = query.decode("utf-8")
    if not isinstance(query, str):
        raise ProgrammingError(f"the query must be str or bytes, not {type(query).__name__}")
    if isinstance(params, (str, bytes)) or not isinstance(params, (collections.abc.Sequence,
                                                                    collections.abc.Mapping)):
        raise ProgrammingError(f"parameters must be a sequence or a mapping, not {type(params).__name__}")
    sql, values = _convert_query(query, params)
    vals, types, formats = [], [], []
    for i, v in enumerate(values):
        try:
            a, oid, fmt = T.adapt(v)
        except TypeError as e:
            raise ProgrammingError(f"parameter {i + 1}: {e}") from None
        vals.append(a)
        types.append(oid)
        formats.append(fmt)
    return sql, vals, types, formats


# ------------------------------------------------------------ connection

class Connection:
    """A DB-API connection to pool ``pool`` of the broker at ``socket``.

    Holds no backend connection until its first statement (lazy lease); gives
    it back at commit(), rollback() and close(), and after each statement in
    autocommit mode.  Session state (SET, temporary tables, prepared
    statements) therefore lasts one transaction, not the Connection's life.

    Not autocommit (the default, as psycopg2): BEGIN is sent before the first
    statement; commit() sends COMMIT.  rollback() and close() just return the
    lease: the broker rolls back what is open before anyone else gets the
    connection.
    """

    # PEP 249 optional extension: the exceptions as attributes.
    Warning, Error, InterfaceError, DatabaseError = Warning, Error, InterfaceError, DatabaseError
    DataError, OperationalError, IntegrityError = DataError, OperationalError, IntegrityError
    InternalError, ProgrammingError, NotSupportedError = InternalError, ProgrammingError, NotSupportedError

    def __init__(self, pool="main", socket=None, acquire_timeout_ms=-1, autocommit=False):
        if not isinstance(pool, str) or not pool:
            raise InterfaceError("pool must be a non-empty str")
        if not isinstance(acquire_timeout_ms, int):
            raise InterfaceError("acquire_timeout_ms must be an int (milliseconds; < 0: the pool's)")
        self.pool = pool
        self.socket = socket
        self.acquire_timeout_ms = acquire_timeout_ms
        self._autocommit = bool(autocommit)
        self._lease = None
        self._in_tx = False
        self._closed = False
        self.isolation_level = None      # None: server default; else e.g. 'SERIALIZABLE'
        self.readonly = None
        self.deferrable = None
        self.notices = []                # psycopg2's: server notices, last 50

    # -- state ------------------------------------------------------------

    @property
    def closed(self):
        """True after close() (psycopg2 gives an int; truthiness is the same)."""
        return self._closed

    @property
    def autocommit(self):
        """True: every statement commits on its own (and the lease is returned
        after it).  Cannot change inside a transaction (ProgrammingError)."""
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value):
        self._check_open()
        if self._in_tx:
            raise ProgrammingError("set_session cannot be used inside a transaction")
        self._autocommit = bool(value)

    @property
    def leased(self):
        """True while this Connection holds a lease (between its first
        statement and commit/rollback/close).  poolbroker extension."""
        return self._lease is not None and not self._lease.released

    def set_session(self, isolation_level=None, readonly=None, deferrable=None, autocommit=None):
        """psycopg2's set_session: applied to each later BEGIN (BEGIN
        ISOLATION LEVEL ..., READ ONLY, DEFERRABLE), since the session itself
        lasts one lease."""
        self._check_open()
        if self._in_tx:
            raise ProgrammingError("set_session cannot be used inside a transaction")
        if isolation_level is not None:
            level = str(isolation_level).upper().replace("_", " ")
            if level not in ("READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE",
                             "DEFAULT"):
                raise ProgrammingError(f"bad isolation level: {isolation_level!r}")
            self.isolation_level = None if level == "DEFAULT" else level
        if readonly is not None:
            self.readonly = bool(readonly)
        if deferrable is not None:
            self.deferrable = bool(deferrable)
        if autocommit is not None:
            self.autocommit = autocommit

    def _check_open(self):
        if self._closed:
            raise InterfaceError("connection already closed")

    def _begin_sql(self):
        s = "BEGIN"
        if self.isolation_level:
            s += " ISOLATION LEVEL " + self.isolation_level
        if self.readonly is not None:
            s += " READ ONLY" if self.readonly else " READ WRITE"
        if self.deferrable is not None:
            s += " DEFERRABLE" if self.deferrable else " NOT DEFERRABLE"
        return s

    def _drop_lease(self):
        lease, self._lease = self._lease, None
        self._in_tx = False
        if lease is not None:
            lease.release()

    def _get_lease(self):
        self._check_open()
        lease = self._lease
        if lease is not None:
            if not lease.forked:
                return lease
            # Leases never cross a fork: the parent keeps its transaction.
            self._lease = None
            had_tx, self._in_tx = self._in_tx, False
            lease.release()
            if had_tx:
                raise OperationalError("this connection's transaction belongs to the process that "
                                       "forked; it cannot continue in the child (start a new one)")
        try:
            self._lease = _common.client_for(self.socket).acquire(self.pool, self.acquire_timeout_ms)
        except _common.LibError as e:
            raise _lib_error(e) from None
        return self._lease

    def _check_result(self, res):
        if res[0] == _pb.RES_ERROR:
            raise _server_error(res[5])
        return res

    def _run(self, stmts, raw=None):
        """Run raw SQL (simple protocol) or a list of statements (pipelined),
        beginning a transaction first when needed.  Returns the results of
        stmts (or [result of raw]); raises the first error."""
        lease = self._get_lease()
        conv = T.CONVERTERS
        try:
            try:
                begin = not self._autocommit and not self._in_tx
                if raw is not None:
                    if begin:
                        self._check_result(lease.pg_exec(self._begin_sql(), None))
                        self._in_tx = True
                    results = [lease.pg_exec(raw, conv)]
                else:
                    if begin:
                        stmts = [(self._begin_sql(), (), None, None)] + list(stmts)
                    if len(stmts) == 1:
                        s = stmts[0]
                        results = [lease.pg_exec_params(s[0], s[1], s[2], s[3], conv)]
                    else:
                        results = lease.pg_pipeline(stmts, conv)
                    if begin:
                        self._check_result(results.pop(0))
                        self._in_tx = True
            except _common.LibError as e:
                # No answer: the connection's state is unknown; give it back
                # (the broker resets it) and make the caller start over.
                self._take_notices(lease)
                self._drop_lease()
                raise _lib_error(e) from None
            except (T.ConversionError, UnicodeDecodeError) as e:
                self._take_notices(lease)
                raise DataError(str(e)) from None
            self._take_notices(lease)
            for r in results:
                self._check_result(r)
            return results
        finally:
            if self._autocommit:
                self._drop_lease()

    def _take_notices(self, lease):
        """Move the server's notices of the last call into self.notices
        (psycopg2: a list of "SEVERITY:  message\\n", the last 50 kept)."""
        new = lease.take_notices()
        if new:
            self.notices.extend(new)
            del self.notices[:-50]

    # -- PEP 249 ------------------------------------------------------------

    def cursor(self, name=None):
        """A new Cursor.  Named (server-side) cursors are not supported:
        a lease cannot outlive the transaction that would hold one."""
        self._check_open()
        if name is not None:
            raise NotSupportedError("named (server-side) cursors are not supported")
        return Cursor(self)

    def commit(self):
        """COMMIT the open transaction (if any) and give the lease back.
        Raises the server's error if COMMIT fails (e.g. a deferred constraint);
        the lease is returned either way."""
        self._check_open()
        if self._lease is None:
            return
        try:
            if self._in_tx and not self._lease.forked:
                try:
                    self._check_result(self._lease.pg_exec("COMMIT", None))
                except _common.LibError as e:
                    raise _lib_error(e) from None
        finally:
            self._drop_lease()

    def rollback(self):
        """Roll back the open transaction (if any) by giving the lease back:
        the broker rolls back before anyone else gets the connection, so this
        costs no round trip."""
        self._check_open()
        self._drop_lease()

    def close(self):
        """Give back the lease (rolling back, as rollback()) and make the
        Connection unusable.  Closing twice is a no-op."""
        if not self._closed:
            self._drop_lease()
            self._closed = True

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, exc_type, exc, tb):
        """As psycopg2: commit if the block succeeded, else roll back; the
        Connection stays open (and holds no lease afterwards)."""
        if self._closed:
            return False
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False

    def __del__(self):
        try:
            self._drop_lease()
        except Exception:
            pass

    def __repr__(self):
        return (f"<poolbroker.Connection pool={self.pool!r} socket={self.socket!r} "
                f"{'closed' if self._closed else 'leased' if self.leased else 'idle'}>")


def connect(pool="main", socket=None, acquire_timeout_ms=-1, autocommit=False):
    """Return a DB-API Connection to pool ``pool`` (a ``[pool NAME]`` of
    type postgres in the broker's configuration) of the broker listening on
    ``socket`` (None: $POOLBROKER_SOCKET, else
    /run/poolbroker/poolbroker.sock).

    Nothing is leased yet: the first statement leases (waiting up to
    ``acquire_timeout_ms`` milliseconds; < 0 means the pool's
    acquire_timeout_ms), and errors reaching the broker or the pool are
    raised there, as OperationalError."""
    return Connection(pool, socket, acquire_timeout_ms, autocommit)


# ------------------------------------------------------------ cursor

class Cursor:
    """PEP 249 cursor.  Results are read whole when execute() returns
    (as psycopg2's client-side cursors), so fetching needs no lease."""

    def __init__(self, connection):
        self.connection = connection
        self.arraysize = 1
        self._closed = False
        self._reset()

    def _reset(self):
        self.description = None
        self.rowcount = -1
        self.rownumber = None
        self.lastrowid = None
        self.statusmessage = None
        self.query = None
        self._rows = []
        self._pos = 0

    @property
    def closed(self):
        return self._closed or self.connection.closed

    def _check(self):
        if self._closed:
            raise InterfaceError("cursor already closed")
        if self.connection.closed:
            raise InterfaceError("connection already closed")

    def _set_result(self, res):
        status, fields, rows, cmd_status, cmd_tuples, _ = res
        self.statusmessage = cmd_status or None
        if status == _pb.RES_TUPLES_OK:
            self.description = tuple(Column(n, oid, None, None, None, None, None) for n, oid in fields)
            self._rows = rows
            self.rowcount = len(rows)
            self.rownumber = 0
        else:
            self.description = None
            self._rows = []
            self.rowcount = cmd_tuples
            self.rownumber = None
        self._pos = 0

    def execute(self, query, vars=None):
        """Run one statement.  vars None: the query is sent as it is (no
        placeholder processing, several statements allowed, simple query
        protocol — psycopg2 does the same); otherwise a sequence for %s or a
        mapping for %(name)s, sent as parameters (one statement).  Returns
        None.  Raises ProgrammingError for placeholder/parameter mismatches,
        the PEP 249 class of the SQLSTATE for server errors."""
        self._check()
        self._reset()
        if vars is None:
            if isinstance(query, bytes):
                query = query.decode("utf-8")
            if not isinstance(query, str):
                raise ProgrammingError(f"the query must be str or bytes, not {type(query).__name__}")
            self.query = query
            res = self.connection._run(None, raw=query)[0]
        else:
            stmt = _statement(query, vars)
            self.query = stmt[0]
            res = self.connection._run([stmt])[0]
        self._set_result(res)

    def executemany(self, query, vars_list):
        """Run query once per parameter set, pipelined: the statements go out
        together (pb_pg_send_params, each with its own Sync) and their results
        come back together, so N rows cost about one round trip, not N.
        rowcount is the total of rows affected.  The first error is raised
        (in a transaction the ones after it then fail with 25P02 and roll
        back with it)."""
        self._check()
        self._reset()
        stmts = [_statement(query, v) for v in vars_list]
        total = 0
        for i in range(0, len(stmts), 1000):        # bounded memory per round
            for res in self.connection._run(stmts[i:i + 1000]):
                total = total + res[4] if total >= 0 and res[4] >= 0 else -1
        self.rowcount = total if stmts else -1

    def callproc(self, procname, parameters=()):
        """Call a function as ``SELECT * FROM procname(%s, ...)`` (psycopg2's
        way); its rows are fetched as for execute().  Returns parameters
        unchanged (PostgreSQL functions have no OUT-by-reference)."""
        if not isinstance(procname, str) or not re.fullmatch(
                r'(?:[A-Za-z_][A-Za-z0-9_$]*|"[^"]+")(?:\.(?:[A-Za-z_][A-Za-z0-9_$]*|"[^"]+"))?', procname):
            raise ProgrammingError(f"bad function name {procname!r}")
        if isinstance(parameters, collections.abc.Mapping):
            args = ", ".join(f'"{k}" := %({k})s' for k in parameters)
        else:
            args = ", ".join(["%s"] * len(parameters))
        self.execute(f"SELECT * FROM {procname}({args})", parameters)
        return parameters

    def _need_rows(self):
        self._check()
        if self.description is None:
            raise ProgrammingError("no results to fetch")

    def fetchone(self):
        """The next row as a tuple, or None when there are no more."""
        self._need_rows()
        if self._pos >= len(self._rows):
            return None
        row = self._rows[self._pos]
        self._pos += 1
        self.rownumber = self._pos
        return row

    def fetchmany(self, size=None):
        """Up to size (default arraysize) next rows, as a list of tuples."""
        self._need_rows()
        n = self.arraysize if size is None else size
        rows = self._rows[self._pos:self._pos + n]
        self._pos += len(rows)
        self.rownumber = self._pos
        return rows

    def fetchall(self):
        """All remaining rows, as a list of tuples."""
        self._need_rows()
        rows = self._rows[self._pos:]
        self._pos = len(self._rows)
        self.rownumber = self._pos
        return rows

    def scroll(self, value, mode="relative"):
        """Move in the result (psycopg2): mode 'relative' or 'absolute';
        IndexError past either end (PEP 249)."""
        self._need_rows()
        if mode not in ("relative", "absolute"):
            raise ProgrammingError(f"scroll mode must be 'relative' or 'absolute', not {mode!r}")
        pos = self._pos + value if mode == "relative" else value
        if not 0 <= pos <= len(self._rows):
            raise IndexError("scroll out of result set range")
        self._pos = self.rownumber = pos

    def nextset(self):
        """Not supported: one execute() yields one result set."""
        raise NotSupportedError("nextset() is not supported")

    def setinputsizes(self, sizes):
        """Accepted and ignored (PEP 249 allows it)."""

    def setoutputsize(self, size, column=None):
        """Accepted and ignored (PEP 249 allows it)."""

    def close(self):
        """Make the cursor unusable; its rows are dropped.  No-op if closed."""
        self._closed = True
        self._rows = []

    def __iter__(self):
        while True:
            row = self.fetchone()
            if row is None:
                return
            yield row

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
