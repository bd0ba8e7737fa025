"""asyncio: PostgreSQL with asyncpg's names, Redis with redis-py's, through
poolbroker and without a thread per call.

::

    conn = await poolbroker.aio.connect(pool="main")
    n = await conn.fetchval("SELECT count(*) FROM t WHERE a > $1", 10)
    async with conn.transaction():
        await conn.execute("INSERT INTO t (a) VALUES ($1)", 1)

    r = poolbroker.aio.Redis(pool="cache")
    await r.incr("hits")

How it waits: each event loop (in each process) gets its own libpoolbroker
client (pb_client), whose notification fd (pb_client_fd) is registered with
``loop.add_reader`` from its first wait on.  Operations are the
library's non-blocking calls (pb_acquire_start/poll, pb_pg_send_params +
pb_is_busy + pb_pg_get_result, pb_redis_send_argv + pb_redis_poll_reply):
each await starts one, polls it once, and if it is not done parks a future
that the reader callback resolves.  The callback follows the library's
contract (include/poolbroker.h, "non-blocking use"): pb_client_consume once,
then poll EVERY operation in progress, since a notification consume reaped
is not delivered again.

Leases are held as the sync driver holds them: a Connection leases at its
first statement and gives the lease back after each statement outside a
transaction, so many Connection objects (one per task) share a small pool;
inside ``conn.transaction()`` it keeps the lease until COMMIT or ROLLBACK.

Cancellation (task.cancel(), asyncio.wait_for timeouts) is safe at every
await: a pending acquire is cancelled (pb_acquire_cancel: a slot granted
meanwhile goes back), a statement in flight is abandoned by releasing its
lease (the broker cancels it on the server and resets the connection), so
nothing stays leased.

After fork() a child gets a new client (per process and loop), so objects
made before a fork (gunicorn --preload) work in every child; a lease (an open
transaction) never crosses the fork.
"""

import asyncio
import itertools
import os
import weakref

from . import _common
from . import _pgtypes as T
from . import _poolbroker as _pb
from . import pg as _pg
from . import redis as _redis
from .pg import (  # noqa: F401  (the same exception classes as the sync driver)
    DatabaseError, DataError, Error, IntegrityError, InterfaceError, InternalError,
    NotSupportedError, OperationalError, ProgrammingError, QueryCanceledError,
    TransactionRollbackError)

__all__ = ["connect", "create_pool", "Connection", "Pool", "Transaction", "Record", "PreparedStatement",
           "CursorFactory", "Cursor", "Redis", "Pipeline", "PubSub",
           # the sync driver's exception classes, re-exported
           "DatabaseError", "DataError", "Error", "IntegrityError", "InterfaceError", "InternalError",
           "NotSupportedError", "OperationalError", "ProgrammingError", "QueryCanceledError",
           "TransactionRollbackError"]


# ------------------------------------------------------------ the loop's client

class _LoopClient:
    """The pb_client of one event loop in one process, and the operations in
    progress on it.  Only _on_readable consumes the client's notifications;
    every await goes through wait()."""

    def __init__(self, socket, loop):
        self.client = _pb.Client(socket)         # pb_connect: LibError if no broker
        self._loop = weakref.ref(loop)            # weak: _clients maps the loop weakly to us
        self.fd = None                            # registered with the loop from the first wait on (the
                                                  # fd is readable only after an armed operation moved,
                                                  # so it stays: no epoll_ctl pair per statement)
        self._pending = {}                        # future -> poll function
        self._watchers = {}                       # key -> poll function, run at every wake-up (listeners)
        self._kicked = False                      # a _poll_all is scheduled
        self.wakeups = 0                          # _on_readable calls (tests: no spinning)

    @property
    def loop(self):
        """The event loop this client belongs to."""
        return self._loop()

    def _reader_on(self):
        if self.fd is None:
            self.fd = self.client.fd()
            self.loop.add_reader(self.fd, self._on_readable)

    def watch(self, key, poll):
        """Run ``poll()`` (which delivers what it finds itself, never
        raises) at every wake-up until unwatch(key); the caller has polled
        once already, arming the notification."""
        self._watchers[key] = poll
        self._reader_on()

    def unwatch(self, key):
        self._watchers.pop(key, None)

    def kick(self):
        """Poll every operation and watcher soon, without a wake-up: for
        one that answered "not yet" without arming (it was blocked by
        another operation on its lease, which has now finished)."""
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._poll_all)

    async def wait(self, poll, on_abandon=None):
        """Run ``poll()`` until it reports done: it returns (done, value) and
        may raise.  Between polls the task waits on the client's fd.  If the
        task is cancelled after poll produced a value the caller will never
        see, ``on_abandon(value)`` disposes of it."""
        done, value = poll()
        if done:
            return value
        fut = self.loop.create_future()
        self._pending[fut] = poll
        self._reader_on()
        try:
            return await fut
        except asyncio.CancelledError:
            # The value may have arrived in the same loop iteration as the
            # cancellation: it is ours to dispose of.
            if on_abandon is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                on_abandon(fut.result())
            raise
        finally:
            self._pending.pop(fut, None)

    def _on_readable(self):
        self.wakeups += 1
        try:
            self.client.consume()
        except _common.LibError as e:             # cannot happen with a live client; say so loudly
            for fut in list(self._pending):
                if not fut.done():
                    fut.set_exception(e)
            return
        self._poll_all()

    def _poll_all(self):
        self._kicked = False
        for poll in list(self._watchers.values()):
            try:
                poll()
            except Exception as e:                # a watcher's bug must not stall the operations below
                self.loop.call_exception_handler({"message": "poolbroker.aio: a watcher failed",
                                                  "exception": e})
        for fut, poll in list(self._pending.items()):
            if fut.done():                        # cancelled: its task cleans up
                continue
            try:
                done, value = poll()
            except Exception as e:                # handed to the awaiting task
                fut.set_exception(e)
                continue
            if done:
                fut.set_result(value)

    async def acquire(self, pool):
        """A Lease of pool, waiting as long as it takes (the caller's timeout
        cancels).  Raises LibError."""
        first = self.client.acquire_start(pool)
        if isinstance(first, _pb.Lease):
            return first
        op = first

        def poll():
            lease = op.poll()
            return lease is not None, lease

        try:
            return await self.wait(poll, on_abandon=lambda lease: lease.release())
        finally:
            op.cancel()                           # no-op once it finished


_clients = {}          # (socket, pid) -> WeakKeyDictionary(loop -> _LoopClient)
_pid = os.getpid()     # this process's, kept current by the fork hook (no getpid() per call)
_last = (None, None, None)     # (weakref to loop, socket argument, _LoopClient): the last lookup


def _after_fork_in_child():
    global _pid, _last
    _pid = os.getpid()
    _last = (None, None, None)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _loop_client(socket):
    """The running loop's _LoopClient for the broker at socket (None:
    $POOLBROKER_SOCKET, else /run/poolbroker/poolbroker.sock), made on first
    use in each process (a forked child never uses its parent's).  The last
    answer is kept: a statement looks it up once or twice."""
    global _last
    loop = asyncio.get_running_loop()
    ref, arg, lc = _last
    if ref is not None and ref() is loop and arg == socket:
        return lc
    arg = socket
    if socket is None:
        socket = os.environ.get("POOLBROKER_SOCKET") or None
    pid = _pid
    per_loop = _clients.get((socket, pid))
    if per_loop is None:
        for key in [k for k in _clients if k[1] != pid]:
            del _clients[key]                     # a parent's; its pb_client copy is left to the library
        per_loop = _clients[(socket, pid)] = weakref.WeakKeyDictionary()
    lc = per_loop.get(loop)
    if lc is None:
        lc = per_loop[loop] = _LoopClient(socket, loop)
    _last = (weakref.ref(loop), arg, lc)
    return lc


# ------------------------------------------------------------ records

class Record:
    """One row, as asyncpg.Record: ``r[0]`` and ``r["name"]``, ``len(r)``,
    iteration over the values, ``keys()``, ``values()``, ``items()``,
    ``get(name, default)``; equal to another Record or tuple with the same
    values.  With two columns of one name, the name gives the first."""

    __slots__ = ("_values", "_names", "_index")

    def __init__(self, values, names, index):
        self._values = values                     # tuple of the converted values
        self._names = names                       # tuple of the column names, shared by a result's rows
        self._index = index                       # {name: first position}, shared too

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self._values[self._index[key]]
            except KeyError:
                raise KeyError(key) from None
        return self._values[key]

    def get(self, key, default=None):
        """The value of column key (a name), or default."""
        i = self._index.get(key)
        return default if i is None else self._values[i]

    def __len__(self):
        return len(self._values)

    def __iter__(self):
        return iter(self._values)

    def __contains__(self, name):
        return name in self._index

    def keys(self):
        """The column names, in order."""
        return iter(self._names)

    def values(self):
        """The values, in order."""
        return iter(self._values)

    def items(self):
        """(name, value) pairs, in order."""
        return zip(self._names, self._values)

    def __eq__(self, other):
        if isinstance(other, Record):
            return self._values == other._values
        if isinstance(other, tuple):
            return self._values == other
        return NotImplemented

    def __hash__(self):
        return hash(self._values)

    def __repr__(self):
        return "<Record " + " ".join(f"{k}={v!r}" for k, v in zip(self._names, self._values)) + ">"


def _records(res):
    _, fields, rows, _, _, _ = res
    names = tuple(name for name, _oid in fields)
    index = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    return [Record(row, names, index) for row in rows]


# ------------------------------------------------------------ PostgreSQL

def _query_text(query):
    """query as str (bytes: UTF-8); InterfaceError for anything else."""
    if isinstance(query, bytes):
        query = query.decode("utf-8")
    if not isinstance(query, str):
        raise InterfaceError(f"the query must be str, not {type(query).__name__}")
    return query


def _quote_ident(name):
    """name as a PostgreSQL identifier in double quotes (" doubled)."""
    if "\0" in name:
        raise InterfaceError("an identifier cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


_names = itertools.count(1)    # unique suffixes for cursor and check-statement names


def _stmt(query, args):
    """(sql, values, types, formats) for $n SQL and positional args, through
    the sync driver's adapters (poolbroker._pgtypes.adapt)."""
    query = _query_text(query)
    vals, types, formats = [], [], []
    for i, v in enumerate(args):
        try:
            a, oid, fmt = T.adapt(v)
        except TypeError as e:
            raise InterfaceError(f"invalid input for query argument ${i + 1}: {e}") from None
        vals.append(a)
        types.append(oid)
        formats.append(fmt)
    return query, vals, types, formats


_BATCH = 1000          # statements per pipelined round in executemany (bounded memory)


class Connection:
    """A PostgreSQL connection with asyncpg's methods, to pool ``pool`` of
    the broker at ``socket``; made by :func:`connect`.

    It owns no backend connection: it leases one at its first statement and
    gives it back when the statement is done, unless a transaction is open
    (then at its end).  Like an asyncpg Connection it runs one operation at
    a time: a second task using it meanwhile gets InterfaceError.  Errors
    are the sync driver's classes (poolbroker.Error and subclasses, with
    ``sqlstate`` for server errors)."""

    def __init__(self, pool, socket):
        self._pool = pool
        self._socket = socket
        self._lease = None
        self._lease_lc = None          # the _LoopClient the lease came from
        self._prelude = []             # BEGIN / SAVEPOINT not sent yet: they go with the next statement
        self._tx = []                  # open Transactions, outermost first
        self._tx_lost = None           # why the open transaction is gone (lease dropped), or None
        self._busy = False
        self._closed = False
        self._listeners = {}           # channel -> [callback, ...] (add_listener)
        self._listen_lease = None      # the lease the LISTENs run on, held while any listener is added
        self._listen_lc = None
        self._listen_busy = False      # a LISTEN / UNLISTEN is in flight on it
        self._listen_lock = None       # asyncio.Lock: one add/remove_listener at a time

    # -- state

    def is_closed(self):
        """True after close() (asyncpg)."""
        return self._closed

    def is_in_transaction(self):
        """True inside a started transaction() (asyncpg)."""
        return bool(self._tx)

    @property
    def leased(self):
        """True while a lease is held (inside a transaction that has run a
        statement).  poolbroker extension."""
        return self._lease is not None

    def _check(self):
        if self._closed:
            raise InterfaceError("cannot perform operation: connection is closed")
        if self._busy:
            raise InterfaceError("cannot perform operation: another operation is in progress")

    def _drop_lease(self):
        lease, self._lease, self._lease_lc = self._lease, None, None
        if lease is not None:
            lease.release()

    def _lose_tx(self, why):
        """The lease went away mid-transaction: the server rolled it back."""
        self._drop_lease()
        self._prelude = []
        if self._tx:
            self._tx_lost = why

    # -- running statements

    async def _run(self, stmts, raw=None):
        """Send the prelude, then raw SQL (simple protocol) or stmts (a list
        of (sql, values, types, formats)), pipelined; wait for every result.
        Returns the statements' results (result tuples); raises the first
        error.  Leases first if needed; gives the lease back afterwards when
        no transaction is open."""
        self._check()
        if self._tx_lost:
            raise InterfaceError("cannot perform operation: the transaction was lost ("
                                 f"{self._tx_lost}); leave the transaction() block")
        self._busy = True
        try:
            lc = _loop_client(self._socket)
            if self._lease is not None and self._lease_lc is not lc:
                raise InterfaceError("cannot perform operation: this connection's transaction belongs "
                                     "to another event loop or process")
            if self._lease is None:
                try:
                    self._lease = await lc.acquire(self._pool)
                except _common.LibError as e:
                    raise _pg._lib_error(e) from None
                self._lease_lc = lc
            lease = self._lease
            prelude, self._prelude = self._prelude, []
            try:
                for sql in prelude:
                    lease.pg_send_query(sql)
                if raw is not None:
                    lease.pg_send_query(raw)
                else:
                    for s in stmts:
                        lease.pg_send_params(*s)
                results = []
                bad = []                   # conversion errors: the results are read to the end all the same
                conv = T.CONVERTERS

                def poll():
                    while True:
                        try:
                            ready, res = lease.pg_poll(conv)
                        except (T.ConversionError, UnicodeDecodeError) as e:
                            bad.append(e)
                            continue
                        if not ready:
                            return False, None
                        if res is None:
                            return True, results
                        results.append(res)

                results = await lc.wait(poll)
            except asyncio.CancelledError:
                # Abandon the statement: the broker cancels it on the server
                # and resets the connection before anyone else gets it.
                self._lose_tx("a statement in it was cancelled")
                raise
            except _common.LibError as e:
                self._lose_tx("no answer from the broker")
                raise _pg._lib_error(e) from None
            except BaseException:
                self._lose_tx("an operation on it failed")
                raise
            for r in results[:len(prelude)]:
                if r[0] == _pb.RES_ERROR:
                    self._lose_tx("BEGIN or SAVEPOINT failed")
                    raise _pg._server_error(r[5])
            results = results[len(prelude):]
            if not self._tx:
                self._drop_lease()
            if bad:
                raise DataError(f"cannot convert a value of the result: {bad[0]}") from None
            for r in results:
                if r[0] == _pb.RES_ERROR:
                    raise _pg._server_error(r[5])
            return results
        finally:
            self._busy = False

    async def _timed(self, coro, timeout):
        if timeout is None:
            return await coro
        return await asyncio.wait_for(coro, timeout)

    async def execute(self, query, *args, timeout=None):
        """Run a statement and return its status tag ("INSERT 0 1",
        "CREATE TABLE", ...), as asyncpg.  Without args the query goes as it
        is (simple protocol: several statements allowed, the last one's tag
        is returned); with args it is one statement whose ``$1, $2, ...``
        are sent as parameters (extended protocol), never interpolated.
        timeout: seconds (asyncio.TimeoutError), as asyncio.wait_for."""
        if args:
            res = await self._timed(self._run([_stmt(query, args)]), timeout)
        else:
            res = await self._timed(self._run(None, raw=_query_text(query)), timeout)
        return res[-1][3]

    async def executemany(self, command, args, *, timeout=None):
        """Run command once per argument tuple in args, pipelined (the
        statements go out together, ~one round trip per 1000).  Atomic as in
        asyncpg >= 0.22: outside a transaction the batch runs inside its own
        BEGIN/COMMIT, so either every row or none is applied.  Returns None;
        raises the first error."""
        stmts = [_stmt(command, a) for a in args]
        if not stmts:
            self._check()
            return None
        await self._timed(self._executemany(stmts), timeout)

    async def _executemany(self, stmts):
        if self._tx or len(stmts) == 1:
            for i in range(0, len(stmts), _BATCH):
                await self._run(stmts[i:i + _BATCH])
            return
        async with self.transaction():
            for i in range(0, len(stmts), _BATCH):
                await self._run(stmts[i:i + _BATCH])

    async def _fetch(self, query, args, timeout):
        return (await self._timed(self._run([_stmt(query, args)]), timeout))[-1]

    async def fetch(self, query, *args, timeout=None):
        """Run a query ($1, $2, ... parameters) and return its rows as a list
        of Record (asyncpg); [] for a statement without rows."""
        return _records(await self._fetch(query, args, timeout))

    async def fetchrow(self, query, *args, timeout=None):
        """The first row as a Record, or None if there is none (asyncpg)."""
        rows = _records(await self._fetch(query, args, timeout))
        return rows[0] if rows else None

    async def fetchval(self, query, *args, column=0, timeout=None):
        """The value of column (index, or name) of the first row, or None if
        there are no rows (asyncpg).  IndexError for a bad column index."""
        res = await self._fetch(query, args, timeout)
        rows = _records(res)
        if not rows:
            return None
        return rows[0][column]

    # -- prepared statements and cursors

    async def prepare(self, query, *, timeout=None):
        """Check query (``$1, $2, ...`` placeholders) on the server now and
        return a :class:`PreparedStatement` whose fetch / fetchrow / fetchval
        / executemany / cursor run it with arguments (asyncpg).  A syntax
        error, an unknown table or column, ... is raised here, as asyncpg
        raises it at prepare().

        Unlike asyncpg's, the statement is not kept prepared on a server
        connection: a Connection leases one per statement, so each execution
        sends the query in the same write as its arguments (the extended
        protocol's unnamed statement, one round trip, as ``fetch``).  The
        check costs one round trip (PREPARE and DEALLOCATE in one message)."""
        sql = _query_text(query)
        body = sql.rstrip().rstrip(";")
        name = f"pb_check_{next(_names)}"
        await self._timed(self._run(None, raw=f"PREPARE {name} AS {body}; DEALLOCATE {name}"), timeout)
        return PreparedStatement(self, sql)

    def cursor(self, query, *args, prefetch=None, timeout=None):
        """A server-side cursor over query's rows (asyncpg): ``async for row
        in conn.cursor(q, *args, prefetch=50)`` fetches prefetch rows per
        round trip, or ``cur = await conn.cursor(q, *args)`` gives a
        :class:`Cursor` with fetch(n), fetchrow() and forward(n).  Only inside
        a transaction (InterfaceError outside one), as asyncpg: the cursor is
        a DECLARE ... NO SCROLL CURSOR that lives until the transaction ends,
        on the lease the transaction holds."""
        return CursorFactory(self, _query_text(query), args, prefetch, timeout)

    # -- LISTEN / NOTIFY

    async def add_listener(self, channel, callback):
        """Listen on channel (LISTEN) and call ``callback(connection, pid,
        channel, payload)`` for each notification (asyncpg); a coroutine
        function is run as a task.  Exceptions in callbacks go to the loop's
        exception handler.

        LISTEN lasts as long as the server connection that ran it, so the
        first listener leases a connection of the pool and keeps it until the
        last one is removed (remove_listener) or close(): one of the pool's
        connections per listening Connection, whatever else it runs.  If that
        lease is lost (the broker or the server connection failed, or an
        add/remove_listener was cancelled mid-command) every listener of the
        Connection is dropped and the loop's exception handler is told."""
        if not isinstance(channel, str) or not channel:
            raise InterfaceError("channel must be a non-empty str")
        if not callable(callback):
            raise InterfaceError("callback must be callable")
        if self._closed:
            raise InterfaceError("cannot perform operation: connection is closed")
        async with self._listen_locked():
            if channel not in self._listeners:
                await self._listen_command("LISTEN " + _quote_ident(channel))
                self._listeners[channel] = []
            self._listeners[channel].append(callback)

    async def remove_listener(self, channel, callback):
        """Stop calling callback for channel (asyncpg); UNLISTEN once no
        callback is left for it, and give the lease back once no channel is
        listened to.  Removing what was never added does nothing."""
        cbs = self._listeners.get(channel)
        if not cbs or callback not in cbs:
            return
        async with self._listen_locked():
            cbs = self._listeners.get(channel)
            if not cbs or callback not in cbs:
                return
            cbs.remove(callback)
            if cbs:
                return
            del self._listeners[channel]
            if self._listeners:
                await self._listen_command("UNLISTEN " + _quote_ident(channel))
            else:
                self._drop_listen_lease()   # the broker's reset runs UNLISTEN *

    def _listen_locked(self):
        if self._listen_lock is None:
            self._listen_lock = asyncio.Lock()
        return self._listen_lock

    async def _listen_command(self, sql):
        """Run sql (LISTEN / UNLISTEN) on the listening lease, leasing it
        first if needed, then (re)start delivering notifications."""
        lc = _loop_client(self._socket)
        if self._listen_lease is not None and self._listen_lc is not lc:
            raise InterfaceError("cannot perform operation: this connection's listeners belong to another "
                                 "event loop or process")
        if self._listen_lease is None:
            try:
                self._listen_lease = await lc.acquire(self._pool)
            except _common.LibError as e:
                raise _pg._lib_error(e) from None
            self._listen_lc = lc
        lease = self._listen_lease
        self._listen_busy = True
        try:
            lease.pg_send_query(sql)
            results = []

            def poll():
                while True:
                    ready, res = lease.pg_poll(T.CONVERTERS)
                    if not ready:
                        return False, None
                    if res is None:
                        return True, results
                    results.append(res)

            await lc.wait(poll)
        except BaseException as e:
            self._listen_busy = False
            self._listeners_lost(e, report=False)
            if isinstance(e, _common.LibError):
                raise _pg._lib_error(e) from None
            raise
        self._listen_busy = False
        lc.watch(self, self._deliver_notifies)
        self._deliver_notifies()               # what came during the command; arms the fd
        for r in results:
            if r[0] == _pb.RES_ERROR:
                raise _pg._server_error(r[5])

    def _deliver_notifies(self):
        """Watcher: hand every queued notification to its callbacks (each
        call scheduled with loop.call_soon)."""
        lease = self._listen_lease
        if lease is None or self._listen_busy:
            return
        loop = self._listen_lc.loop
        while True:
            try:
                n = lease.pg_poll_notify()
            except _common.LibError as e:
                self._listeners_lost(e, report=True)
                return
            if n is None:
                return
            pid, channel, payload = n
            for cb in list(self._listeners.get(channel, ())):
                loop.call_soon(self._call_listener, cb, pid, channel, payload)

    def _call_listener(self, cb, pid, channel, payload):
        r = cb(self, pid, channel, payload)
        if asyncio.iscoroutine(r) or isinstance(r, asyncio.Future):
            asyncio.ensure_future(r)

    def _drop_listen_lease(self):
        lease, lc = self._listen_lease, self._listen_lc
        self._listen_lease = self._listen_lc = None
        self._listeners = {}
        if lc is not None:
            lc.unwatch(self)
        if lease is not None:
            lease.release()

    def _listeners_lost(self, exc, report):
        had = list(self._listeners)
        lc = self._listen_lc
        self._drop_listen_lease()
        if report and lc is not None:
            lc.loop.call_exception_handler({
                "message": f"poolbroker.aio: the listening connection was lost; listeners on {had} "
                           "were dropped",
                "exception": _pg._lib_error(exc) if isinstance(exc, _common.LibError) else exc,
                "connection": self})

    def transaction(self, *, isolation=None, readonly=False, deferrable=False):
        """A Transaction, for ``async with conn.transaction():`` (asyncpg):
        BEGIN at the start (sent with its first statement, so an empty
        transaction costs nothing), COMMIT when the block succeeds, ROLLBACK
        when it raises.  Nested ones are savepoints.  isolation:
        'read_committed', 'repeatable_read', 'serializable' (None: the
        server's default)."""
        return Transaction(self, isolation, readonly, deferrable)

    async def close(self, *, timeout=None):
        """Give back the lease (an open transaction is rolled back by the
        broker) and make the Connection unusable.  Closing twice is a no-op."""
        if not self._closed:
            self._drop_lease()
            self._drop_listen_lease()
            self._prelude = []
            self._tx = []
            self._closed = True

    def terminate(self):
        """As close(), without awaiting (asyncpg)."""
        if not self._closed:
            self._drop_lease()
            self._drop_listen_lease()
            self._closed = True

    def __del__(self):
        try:
            self._drop_lease()
            lease, self._listen_lease = self._listen_lease, None
            if lease is not None:
                lease.release()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self._closed else "leased" if self._lease is not None else "idle"
        return f"<poolbroker.aio.Connection pool={self._pool!r} socket={self._socket!r} {state}>"


class PreparedStatement:
    """A statement checked by :meth:`Connection.prepare` (asyncpg's
    PreparedStatement surface): run it with ``fetch(*args)``,
    ``fetchrow``, ``fetchval``, ``executemany``, or iterate ``cursor(*args)``
    inside a transaction.  Bound to its Connection (one operation at a time,
    as the Connection).  Each run sends the query with its arguments (see
    Connection.prepare)."""

    __slots__ = ("_conn", "_query", "_status")

    def __init__(self, conn, query):
        self._conn = conn
        self._query = query
        self._status = None

    def get_query(self):
        """The query text (asyncpg)."""
        return self._query

    def get_statusmsg(self):
        """The status tag of the last run ("SELECT 3"), None before one
        (asyncpg)."""
        return self._status

    async def _fetch(self, args, timeout):
        res = (await self._conn._timed(self._conn._run([_stmt(self._query, args)]), timeout))[-1]
        self._status = res[3]
        return res

    async def fetch(self, *args, timeout=None):
        """Its rows for args, a list of Record."""
        return _records(await self._fetch(args, timeout))

    async def fetchrow(self, *args, timeout=None):
        """Its first row for args as a Record, or None."""
        rows = _records(await self._fetch(args, timeout))
        return rows[0] if rows else None

    async def fetchval(self, *args, column=0, timeout=None):
        """Column (index or name) of its first row for args, or None."""
        rows = _records(await self._fetch(args, timeout))
        return rows[0][column] if rows else None

    async def executemany(self, args, *, timeout=None):
        """Run it once per argument tuple, pipelined and atomic as
        Connection.executemany."""
        await self._conn.executemany(self._query, args, timeout=timeout)

    def cursor(self, *args, prefetch=None, timeout=None):
        """A CursorFactory over its rows for args (Connection.cursor)."""
        return CursorFactory(self._conn, self._query, args, prefetch, timeout)

    def __repr__(self):
        return f"<poolbroker.aio.PreparedStatement {self._query!r}>"


class CursorFactory:
    """What Connection.cursor() returns (asyncpg): ``async for row in`` it
    (prefetch rows per FETCH, default 50), or ``await`` it for a
    :class:`Cursor`.  Nothing is sent until then."""

    def __init__(self, conn, query, args, prefetch, timeout):
        if prefetch is not None and (not isinstance(prefetch, int) or prefetch <= 0):
            raise InterfaceError("prefetch must be a positive int")
        self._conn = conn
        self._query = query
        self._args = args
        self._prefetch = prefetch or 50
        self._timeout = timeout

    def __await__(self):
        return self._open().__await__()

    async def _open(self):
        conn = self._conn
        if not conn._tx:
            raise InterfaceError("cursor cannot be created outside of a transaction")
        name = f"pb_cursor_{next(_names)}"
        sql = f"DECLARE {name} NO SCROLL CURSOR FOR {self._query}"
        if self._args:
            await conn._timed(conn._run([_stmt(sql, self._args)]), self._timeout)
        else:
            await conn._timed(conn._run(None, raw=sql), self._timeout)
        return Cursor(conn, name, self._timeout)

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        cur = await self._open()
        while True:
            rows = await cur.fetch(self._prefetch)
            for r in rows:
                yield r
            if len(rows) < self._prefetch:
                return


class Cursor:
    """An open server-side cursor (asyncpg's Cursor): ``fetch(n)``,
    ``fetchrow()``, ``forward(n)``.  It lives until its transaction ends."""

    def __init__(self, conn, name, timeout):
        self._conn = conn
        self._name = name
        self._timeout = timeout

    async def _do(self, sql, timeout):
        conn = self._conn
        if not conn._tx:
            raise InterfaceError("cursor cannot be used outside of its transaction")
        t = self._timeout if timeout is None else timeout
        return (await conn._timed(conn._run(None, raw=sql), t))[-1]

    async def fetch(self, n, *, timeout=None):
        """The next n rows (fewer at the end), a list of Record."""
        if not isinstance(n, int) or n <= 0:
            raise InterfaceError("n must be a positive int")
        return _records(await self._do(f"FETCH FORWARD {n} FROM {self._name}", timeout))

    async def fetchrow(self, *, timeout=None):
        """The next row as a Record, None at the end."""
        rows = _records(await self._do(f"FETCH NEXT FROM {self._name}", timeout))
        return rows[0] if rows else None

    async def forward(self, n, *, timeout=None):
        """Skip n rows; returns how many were skipped."""
        if not isinstance(n, int) or n <= 0:
            raise InterfaceError("n must be a positive int")
        res = await self._do(f"MOVE FORWARD {n} FROM {self._name}", timeout)
        return res[4] if res[4] >= 0 else 0

    def __repr__(self):
        return f"<poolbroker.aio.Cursor {self._name}>"


_ISOLATION = {"read_committed": "READ COMMITTED", "repeatable_read": "REPEATABLE READ",
              "serializable": "SERIALIZABLE", "read_uncommitted": "READ UNCOMMITTED"}


class Transaction:
    """A transaction (or, nested, a savepoint) of a Connection, as asyncpg's:
    ``async with conn.transaction():`` or start() / commit() / rollback().
    The BEGIN (SAVEPOINT) is sent with the first statement inside it; the
    lease is held from that statement to commit() or rollback()."""

    def __init__(self, conn, isolation, readonly, deferrable):
        if isolation is not None and isolation not in _ISOLATION:
            raise ValueError(f"isolation must be one of {sorted(_ISOLATION)} or None, not {isolation!r}")
        self._conn = conn
        self._isolation = isolation
        self._readonly = bool(readonly)
        self._deferrable = bool(deferrable)
        self._state = "new"            # new -> started -> committed | rolledback | failed
        self._savepoint = None

    async def start(self):
        """Begin: BEGIN, or SAVEPOINT inside another transaction."""
        conn = self._conn
        conn._check()
        if self._state != "new":
            raise InterfaceError(f"cannot start; the transaction is already {self._state}")
        if conn._tx_lost:
            raise InterfaceError("cannot start a transaction: the enclosing one was lost")
        if conn._tx:
            if self._isolation or self._readonly or self._deferrable:
                raise InterfaceError("a nested transaction (savepoint) cannot set isolation, readonly "
                                     "or deferrable")
            self._savepoint = f"pb_savepoint_{len(conn._tx)}"
            conn._prelude.append(f"SAVEPOINT {self._savepoint}")
        else:
            sql = "BEGIN"
            if self._isolation:
                sql += " ISOLATION LEVEL " + _ISOLATION[self._isolation]
            if self._readonly:
                sql += " READ ONLY"
            if self._deferrable:
                sql += " DEFERRABLE"
            conn._prelude.append(sql)
        conn._tx.append(self)
        self._state = "started"

    def _check_top(self, what):
        conn = self._conn
        if self._state != "started":
            raise InterfaceError(f"cannot {what}; the transaction is {self._state}")
        if not conn._tx or conn._tx[-1] is not self:
            raise InterfaceError(f"cannot {what}; a nested transaction is still open")

    def _pop(self, state):
        conn = self._conn
        conn._tx.pop()
        self._state = state
        if not conn._tx:
            conn._tx_lost = None
            conn._prelude = []
            conn._drop_lease()

    async def commit(self):
        """COMMIT (RELEASE SAVEPOINT).  Raises the server's error if it fails
        (the transaction is then rolled back), and OperationalError if the
        transaction was lost (its lease dropped by a cancellation or a broker
        failure)."""
        self._check_top("commit")
        conn = self._conn
        conn._check()                  # not while another task's statement uses the lease
        if conn._tx_lost:
            why = conn._tx_lost
            self._pop("failed")
            raise OperationalError(f"cannot commit: the transaction was lost ({why}); nothing was committed")
        opening = f"SAVEPOINT {self._savepoint}" if self._savepoint else None
        if conn._prelude and (opening is None or conn._prelude[-1] == opening):
            # Nothing ran inside it: nothing to send.
            conn._prelude.pop()
            self._pop("committed")
            return
        sql = f"RELEASE SAVEPOINT {self._savepoint}" if self._savepoint else "COMMIT"
        try:
            res = await conn._run(None, raw=sql)
        except BaseException:
            if conn._tx and conn._tx[-1] is self:
                self._pop("failed")
            raise
        self._pop("committed")
        if not self._savepoint and res[-1][3] == "ROLLBACK":
            # COMMIT of a failed transaction answers ROLLBACK, not an error.
            raise InternalError("the transaction was rolled back: a statement in it failed",
                                sqlstate="25P02")

    async def rollback(self):
        """ROLLBACK (ROLLBACK TO SAVEPOINT).  Outermost: the lease is given
        back and the broker rolls back, no round trip."""
        self._check_top("rollback")
        conn = self._conn
        conn._check()
        opening = f"SAVEPOINT {self._savepoint}" if self._savepoint else None
        if self._savepoint is None or conn._tx_lost:
            self._pop("rolledback")
            return
        if conn._prelude and conn._prelude[-1] == opening:
            conn._prelude.pop()
            self._pop("rolledback")
            return
        try:
            await conn._run(None, raw=f"ROLLBACK TO SAVEPOINT {self._savepoint}; "
                                      f"RELEASE SAVEPOINT {self._savepoint}")
        finally:
            if conn._tx and conn._tx[-1] is self:
                self._pop("rolledback")

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if self._state != "started":
            return False
        if exc_type is None:
            await self.commit()
        else:
            await self.rollback()
        return False

    def __repr__(self):
        return f"<poolbroker.aio.Transaction {self._state}>"


async def connect(pool="main", socket=None):
    """Return a :class:`Connection` (asyncpg's methods) to PostgreSQL pool
    ``pool`` (a ``[pool NAME]`` of type postgres) of the broker listening
    on ``socket`` (None: $POOLBROKER_SOCKET, else
    /run/poolbroker/poolbroker.sock).

    Attaches this loop's client to the broker if it is not yet (raising
    OperationalError if there is no broker) but leases nothing: an unknown
    pool, a backend that is down, ... are raised by the first statement."""
    if not isinstance(pool, str) or not pool:
        raise InterfaceError("pool must be a non-empty str")
    try:
        _loop_client(socket)
    except _common.LibError as e:
        raise _pg._lib_error(e) from None
    return Connection(pool, socket)


class Pool:
    """asyncpg.Pool's surface, for ports: the broker is the pool, so this
    holds no connections.  ``acquire()`` hands out a new Connection (which
    leases at its first statement, as any), ``release()`` closes it (an open
    transaction is rolled back), and ``fetch``/``fetchrow``/``fetchval``/
    ``execute``/``executemany`` run one statement on a Connection of their
    own.  Made by :func:`create_pool`; ``await`` it or ``async with`` it."""

    def __init__(self, pool, socket):
        if not isinstance(pool, str) or not pool:
            raise InterfaceError("pool must be a non-empty str")
        self._pool = pool
        self._socket = socket
        self._closed = False

    async def _attach(self):
        try:
            _loop_client(self._socket)
        except _common.LibError as e:
            raise _pg._lib_error(e) from None
        return self

    def __await__(self):
        return self._attach().__await__()

    async def __aenter__(self):
        return await self._attach()

    async def __aexit__(self, *exc):
        await self.close()
        return False

    def _connection(self):
        if self._closed:
            raise InterfaceError("pool is closed")
        return Connection(self._pool, self._socket)

    def acquire(self):
        """A Connection: ``conn = await pool.acquire()`` (then
        ``await pool.release(conn)``) or ``async with pool.acquire() as
        conn:`` (released at the end of the block)."""
        return _PoolAcquire(self)

    async def release(self, connection):
        """Close connection (its lease, if any, goes back; an open
        transaction is rolled back)."""
        if not isinstance(connection, Connection):
            raise InterfaceError(f"release() takes a Connection, not {type(connection).__name__}")
        await connection.close()

    async def _one(self, method, *args, **kw):
        conn = self._connection()
        try:
            return await getattr(conn, method)(*args, **kw)
        finally:
            await conn.close()

    async def execute(self, query, *args, timeout=None):
        """Connection.execute on a Connection of its own."""
        return await self._one("execute", query, *args, timeout=timeout)

    async def executemany(self, command, args, *, timeout=None):
        """Connection.executemany on a Connection of its own."""
        return await self._one("executemany", command, args, timeout=timeout)

    async def fetch(self, query, *args, timeout=None):
        """Connection.fetch on a Connection of its own."""
        return await self._one("fetch", query, *args, timeout=timeout)

    async def fetchrow(self, query, *args, timeout=None):
        """Connection.fetchrow on a Connection of its own."""
        return await self._one("fetchrow", query, *args, timeout=timeout)

    async def fetchval(self, query, *args, column=0, timeout=None):
        """Connection.fetchval on a Connection of its own."""
        return await self._one("fetchval", query, *args, column=column, timeout=timeout)

    async def close(self):
        """Refuse further acquire() calls; Connections handed out keep
        working until they are released."""
        self._closed = True

    def terminate(self):
        """As close(), without awaiting."""
        self._closed = True

    def __repr__(self):
        return f"<poolbroker.aio.Pool pool={self._pool!r} socket={self._socket!r}>"


class _PoolAcquire:
    """What Pool.acquire() returns: awaitable and an async context manager."""

    def __init__(self, pool):
        self._pool = pool
        self._conn = None

    def __await__(self):
        return self._get().__await__()

    async def _get(self):
        return self._pool._connection()

    async def __aenter__(self):
        self._conn = self._pool._connection()
        return self._conn

    async def __aexit__(self, *exc):
        await self._pool.release(self._conn)
        return False


def create_pool(pool="main", socket=None):
    """A :class:`Pool` (asyncpg.create_pool's surface) for ``pool`` of the
    broker at ``socket``: ``pool = await create_pool(...)`` or ``async with
    create_pool(...) as pool:``.  Awaiting it attaches this loop's client
    (OperationalError if there is no broker).  Sizes, timeouts and
    connection settings are the broker's ``[pool NAME]`` configuration, so
    asyncpg's min_size, max_size, ... are not accepted."""
    return Pool(pool, socket)


# ------------------------------------------------------------ Redis

class Redis(_redis._Commands):
    """redis-py's asyncio client (redis.asyncio.Redis) for pool ``pool``
    (type redis) of the broker at ``socket`` (None: $POOLBROKER_SOCKET, else
    /run/poolbroker/poolbroker.sock): every command method of
    poolbroker.Redis (the same table, poolbroker/redis.py), awaited, with
    the same return types and exceptions (poolbroker.redis.ResponseError,
    ConnectionError, ...).

    decode_responses: str instead of bytes (UTF-8), as redis-py.  Each
    command leases a connection, runs and gives it back, so nothing is held
    between commands; a command waits for a free connection as long as it
    takes (bound it with asyncio.wait_for).  Nothing is attached until the
    first command."""

    def __init__(self, pool="cache", socket=None, decode_responses=False):
        if not isinstance(pool, str) or not pool:
            raise _redis.DataError("pool must be a non-empty str")
        self.pool = pool
        self.socket = socket
        self.decode_responses = bool(decode_responses)

    async def _run(self, cmds):
        """Send cmds (lists of encoded arguments) on one lease and return
        their replies in order (error replies as ResponseError instances)."""
        try:
            lc = _loop_client(self.socket)
            lease = await lc.acquire(self.pool)
        except _common.LibError as e:
            raise _redis._lib_error(e) from None
        try:
            for c in cmds:
                lease.redis_send(c)
            replies = []
            decode = self.decode_responses

            def poll():
                while len(replies) < len(cmds):
                    ready, rep = lease.redis_poll(decode, _redis._make_error)
                    if not ready:
                        return False, None
                    replies.append(rep)
                return True, replies

            return await lc.wait(poll)
        except _common.LibError as e:
            raise _redis._lib_error(e) from None
        finally:
            # Done, failed or cancelled: a command still in flight is
            # abandoned (the broker resets the connection).
            lease.release()

    async def execute_command(self, *args, **options):
        """Run one command (arguments encoded as redis-py does: bytes, str,
        int, float) and return its reply through redis-py's callback for it.
        Raises ResponseError (or a subclass) for an error reply,
        ConnectionError when no answer came."""
        if not args:
            raise _redis.DataError("execute_command needs the command name")
        cmd = [_redis._encode(a) for a in args]
        replies = await self._run([cmd])
        return _redis._reply(args, replies[0], options)

    async def scan_iter(self, match=None, count=None, _type=None):
        """Every key, SCAN by SCAN (an async iterator, as redis.asyncio)."""
        cursor = "0"
        while cursor != 0:
            cursor, data = await self.scan(cursor=cursor, match=match, count=count, _type=_type)
            for k in data:
                yield k

    def pipeline(self, transaction=True, shard_hint=None):
        """A Pipeline: buffer commands, then ``await pipe.execute()``
        (MULTI/EXEC around them unless transaction=False)."""
        return Pipeline(self, transaction)

    def pubsub(self, ignore_subscribe_messages=False):
        """A :class:`PubSub` (redis.asyncio's): its first subscribe leases a
        connection and keeps it until close()."""
        return PubSub(self, ignore_subscribe_messages)

    async def close(self):
        """Nothing to close (no connection is held); for redis-py parity."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def __repr__(self):
        return f"<poolbroker.aio.Redis pool={self.pool!r} socket={self.socket!r}>"


class Pipeline(_redis.Pipeline):
    """redis.asyncio's Pipeline: command methods buffer (and return the
    pipeline, so calls chain); ``await execute()`` sends them on one lease
    and returns their results in order."""

    async def execute(self, raise_on_error=True):
        """Send the buffered commands and return their results (redis-py's
        types); errors as poolbroker.Redis's Pipeline.execute."""
        stack, self.command_stack = self.command_stack, []
        if not stack:
            return []
        replies = await self.client._run(_redis._pipeline_commands(stack, self.transaction))
        return _redis._pipeline_results(stack, replies, self.transaction, raise_on_error)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.reset()
        return False


class PubSub(_redis.PubSub):
    """redis.asyncio's PubSub on one lease: ``await p.subscribe(...)``
    (psubscribe, ssubscribe, unsubscribe, ...), ``await
    p.get_message(timeout=...)``, ``async for m in p.listen()``, ``await
    p.close()`` (or ``async with``).  The first subscribe leases a connection
    of the client's pool and keeps it, subscribed, until close(), which
    gives it back (the broker unsubscribes it).  Messages are the sync
    PubSub's dicts (redis-py's).  One task may wait in get_message() while
    another subscribes or unsubscribes.  Handlers are not supported."""

    def __init__(self, client, ignore_subscribe_messages=False):
        super().__init__(client, ignore_subscribe_messages)
        self._lc = None             # _pending: confirmations and messages read, in arrival order
        self._cmd_busy = False      # a (un)subscribe's replies are owed: messages wait
        self._cmd_lock = None

    def _release(self):
        lease, self._lease = self._lease, None
        self._pending = []
        self.channels, self.patterns, self.shard_channels = set(), set(), set()
        if lease is not None and not lease.released:
            lease.release()
        if self._lc is not None:
            self._lc.kick()          # a get_message() waiting sees the close
        self._lc = None

    def __del__(self):
        try:
            self._release()
        except Exception:  # noqa: BLE001 - nothing to report to at interpreter exit
            pass

    async def close(self):
        """Give the lease back (the broker unsubscribes the connection)."""
        self._release()

    reset = close
    aclose = close

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
        return False

    async def _command(self, name, names):
        if not names:
            if name.startswith(("un", "pun", "sun")):
                # The broker refuses a bare UNSUBSCRIBE (docs/protocol.md):
                # name what is subscribed.
                names = list({"unsubscribe": self.channels, "punsubscribe": self.patterns,
                              "sunsubscribe": self.shard_channels}[name])
                if not names:
                    return
            else:
                raise _redis.DataError(f"{name} needs at least one channel or pattern")
        if self._cmd_lock is None:
            self._cmd_lock = asyncio.Lock()
        c = self.client
        async with self._cmd_lock:
            try:
                lc = _loop_client(c.socket)
                if self._lease is not None and self._lc is not lc:
                    raise _redis.ConnectionError("this PubSub's connection belongs to another event loop "
                                                 "or process")
                if self._lease is None:
                    self._lease = await lc.acquire(c.pool)
                    self._lc = lc
                lease = self._lease
                self._cmd_busy = True
                lease.redis_send([name.upper()] + [_redis._encode(n) for n in names])
                replies = []

                def poll():
                    while len(replies) < len(names):
                        ready, rep = lease.redis_poll(c.decode_responses, _redis._make_error)
                        if not ready:
                            return False, None
                        replies.append(rep)
                    return True, replies

                await lc.wait(poll)
            except _common.LibError as e:
                self._release()
                raise _redis._lib_error(e) from None
            except BaseException:
                self._release()      # replies owed on an abandoned command: the lease is unusable
                raise
            finally:
                self._cmd_busy = False
            lc.kick()                # a get_message() waiting meanwhile polls again
        # Messages that arrived during the command came before its replies.
        while self._take():
            pass
        for r in replies:
            if isinstance(r, Exception):
                raise r
            self._track(r)
            self._pending.append(self._message(r))

    async def subscribe(self, *channels):
        """SUBSCRIBE; the confirmations come from get_message()."""
        await self._command("subscribe", _redis._flatten(channels))

    async def psubscribe(self, *patterns):
        """PSUBSCRIBE."""
        await self._command("psubscribe", _redis._flatten(patterns))

    async def ssubscribe(self, *channels):
        """SSUBSCRIBE."""
        await self._command("ssubscribe", _redis._flatten(channels))

    async def unsubscribe(self, *channels):
        """UNSUBSCRIBE (all channels when none is named)."""
        await self._command("unsubscribe", _redis._flatten(channels))

    async def punsubscribe(self, *patterns):
        """PUNSUBSCRIBE (all patterns when none is named)."""
        await self._command("punsubscribe", _redis._flatten(patterns))

    async def sunsubscribe(self, *channels):
        """SUNSUBSCRIBE (all shard channels when none is named)."""
        await self._command("sunsubscribe", _redis._flatten(channels))

    def _take(self):
        """Move one message from the lease to _pending, without waiting:
        True if one was moved."""
        if self._cmd_busy or self._lease is None:
            return False
        try:
            ready, m = self._lease.redis_poll_message(self.client.decode_responses, _redis._make_error)
        except _common.LibError as e:
            if e.args[0] == _pb.PB_EINVAL:
                # Nothing queued, and the server's last (un)subscribe reply
                # left nothing subscribed (self.subscribed catches up when
                # _command tracks that reply): nothing will come.
                return False
            raise _redis._lib_error(e) from None
        if ready:
            self._pending.append(self._message(m))
        return ready

    async def get_message(self, ignore_subscribe_messages=False, timeout=0.0):
        """The next message, or None if none came within timeout seconds (0:
        do not wait; None: wait for ever).  Subscription confirmations come
        in order with the messages, unless ignored (here or in pubsub())."""
        ignore = ignore_subscribe_messages or self.ignore_subscribe_messages
        deadline = None if timeout is None else self._now() + max(0.0, float(timeout))

        def poll():
            # Done when there is something to return, or nothing can come.
            return (self._lease is None or not self.subscribed or bool(self._pending)
                    or self._take()), None

        while True:
            while self._pending or self._take():
                m = self._pending.pop(0)
                if not (ignore and _redis._str(m["type"]).lower() in _redis._SUBSCRIBE):
                    return m
            if self._lease is None or not self.subscribed:
                return None
            left = None if deadline is None else deadline - self._now()
            if left is not None and left <= 0:
                return None
            wait = self._lc.wait(poll)
            try:
                await (wait if left is None else asyncio.wait_for(wait, left))
            except asyncio.TimeoutError:
                return None

    @staticmethod
    def _now():
        return asyncio.get_running_loop().time()

    async def listen(self):
        """Yield messages for as long as something is subscribed (an async
        iterator)."""
        while self.subscribed or self._pending:
            m = await self.get_message(timeout=None if not self._pending else 0)
            if m is not None:
                yield m
