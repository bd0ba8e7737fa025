"""PEP 249 conformance of poolbroker's PostgreSQL driver, on a real broker."""
import datetime as dt

import pytest

import poolbroker


def test_module_globals():
    assert poolbroker.apilevel == "2.0"
    assert poolbroker.threadsafety == 1
    assert poolbroker.paramstyle == "pyformat"


def test_exception_hierarchy():
    P = poolbroker
    assert issubclass(P.Warning, Exception) and issubclass(P.Error, Exception)
    assert not issubclass(P.Warning, P.Error)
    assert issubclass(P.InterfaceError, P.Error) and issubclass(P.DatabaseError, P.Error)
    assert not issubclass(P.InterfaceError, P.DatabaseError)
    for name in ("DataError", "OperationalError", "IntegrityError", "InternalError", "ProgrammingError",
                 "NotSupportedError"):
        assert issubclass(getattr(P, name), P.DatabaseError), name
        assert getattr(P.Connection, name) is getattr(P, name)


def test_type_objects_and_constructors():
    P = poolbroker
    assert P.Date(2024, 2, 29) == dt.date(2024, 2, 29)
    assert P.Time(1, 2, 3) == dt.time(1, 2, 3)
    assert P.Timestamp(2024, 2, 29, 1, 2, 3) == dt.datetime(2024, 2, 29, 1, 2, 3)
    ticks = 1700000000
    assert P.DateFromTicks(ticks) == dt.date.fromtimestamp(ticks)
    assert P.TimestampFromTicks(ticks) == dt.datetime.fromtimestamp(ticks)
    assert P.TimeFromTicks(ticks) == dt.datetime.fromtimestamp(ticks).time()
    assert P.Binary(bytearray(b"\x00\x01")) == b"\x00\x01"
    assert P.NUMBER == 23 and P.NUMBER == 1700 and P.NUMBER != 25
    assert P.STRING == 25 and P.BINARY == 17 and P.DATETIME == 1184 and P.ROWID == 26


def test_description_rowcount_fetch(conn):
    cur = conn.cursor()
    assert cur.description is None and cur.rowcount == -1 and cur.arraysize == 1
    cur.execute("SELECT g AS n, g::text AS s FROM generate_series(1, 5) g")
    assert [d[0] for d in cur.description] == ["n", "s"]
    assert cur.description[0].type_code == poolbroker.NUMBER
    assert cur.description[1][1] == poolbroker.STRING
    assert all(len(d) == 7 for d in cur.description)
    assert cur.rowcount == 5
    assert cur.fetchone() == (1, "1")
    assert cur.fetchmany() == [(2, "2")]
    cur.arraysize = 2
    assert cur.fetchmany() == [(3, "3"), (4, "4")]
    assert cur.fetchall() == [(5, "5")]
    assert cur.fetchone() is None and cur.fetchmany(3) == [] and cur.fetchall() == []
    cur.execute("CREATE TEMP TABLE t (a int)")
    assert cur.description is None
    with pytest.raises(poolbroker.ProgrammingError):
        cur.fetchone()
    cur.execute("INSERT INTO t SELECT generate_series(1, 7)")
    assert cur.rowcount == 7 and cur.statusmessage == "INSERT 0 7"
    cur.execute("UPDATE t SET a = a + 1 WHERE a > %s", (4,))
    assert cur.rowcount == 3
    cur.execute("SELECT a FROM t ORDER BY a")
    assert list(cur) == [(i,) for i in (1, 2, 3, 4, 6, 7, 8)]
    conn.rollback()


def test_paramstyle_pyformat(conn):
    cur = conn.cursor()
    cur.execute("SELECT %s, %s, '100%%'", ("a", 2))
    assert cur.fetchone() == ("a", 2, "100%")
    cur.execute("SELECT %(x)s, %(y)s, %(x)s", {"x": 1, "y": "two"})
    assert cur.fetchone() == (1, "two", 1)
    # vars None: no placeholder processing at all (psycopg2), several statements allowed.
    cur.execute("SELECT '50%%'; SELECT '%s'")
    assert cur.fetchone() == ("%s",)
    # Values are parameters, never SQL: a quote cannot escape.
    evil = "x'); DROP TABLE nope; --"
    cur.execute("SELECT %s", (evil,))
    assert cur.fetchone() == (evil,)
    conn.rollback()


def test_placeholder_errors(conn):
    cur = conn.cursor()
    P = poolbroker
    with pytest.raises(P.ProgrammingError, match="more %s placeholders"):
        cur.execute("SELECT %s, %s", (1,))
    with pytest.raises(P.ProgrammingError, match="2 parameters given"):
        cur.execute("SELECT %s", (1, 2))
    with pytest.raises(P.ProgrammingError, match="no value for placeholder"):
        cur.execute("SELECT %(a)s", {"b": 1})
    with pytest.raises(P.ProgrammingError, match="unsupported placeholder"):
        cur.execute("SELECT %d", (1,))
    with pytest.raises(P.ProgrammingError, match="needs a mapping"):
        cur.execute("SELECT %(a)s", (1,))
    with pytest.raises(P.ProgrammingError, match="can't adapt type 'object'"):
        cur.execute("SELECT %s", (object(),))
    with pytest.raises(P.ProgrammingError, match="sequence or a mapping"):
        cur.execute("SELECT %s", "ab")
    assert not conn.leased      # nothing was sent, nothing leased


def test_executemany_pipelined(conn, env):
    cur = conn.cursor()
    cur.execute("CREATE TABLE em (id int PRIMARY KEY, v text)")
    cur.executemany("INSERT INTO em VALUES (%s, %s)", [(i, f"v{i}") for i in range(2500)])
    assert cur.rowcount == 2500
    conn.commit()
    assert env.psql("SELECT count(*), sum(id) FROM em") == f"2500|{sum(range(2500))}"
    # An error in the middle: raised, and the transaction rolls back as a whole.
    with pytest.raises(poolbroker.IntegrityError) as ei:
        cur.executemany("INSERT INTO em VALUES (%(id)s, 'x')", [{"id": 5000}, {"id": 1}, {"id": 5001}])
    assert ei.value.sqlstate == "23505"
    conn.rollback()
    assert env.psql("SELECT count(*) FROM em") == "2500"
    cur.executemany("INSERT INTO em VALUES (%s, 'x')", [])
    assert cur.rowcount == -1


def test_callproc(conn):
    cur = conn.cursor()
    cur.execute("CREATE FUNCTION pb_add(a int, b int) RETURNS int LANGUAGE sql AS 'SELECT a + b'")
    assert cur.callproc("pb_add", (2, 3)) == (2, 3)
    assert cur.fetchall() == [(5,)]
    cur.callproc("pb_add", {"a": 10, "b": 1})
    assert cur.fetchone() == (11,)
    with pytest.raises(poolbroker.ProgrammingError, match="bad function name"):
        cur.callproc("x; DROP TABLE y", ())
    conn.rollback()


def test_context_managers_and_close(env):
    with poolbroker.connect("main", socket=env.socket) as c:
        with c.cursor() as cur:
            cur.execute("CREATE TABLE cm (a int)")
            cur.execute("INSERT INTO cm VALUES (1)")
        assert cur.closed
    assert env.psql("SELECT count(*) FROM cm") == "1"    # committed on success
    with pytest.raises(ZeroDivisionError):
        with c:
            c.cursor().execute("INSERT INTO cm VALUES (2)")
            1 / 0
    assert env.psql("SELECT count(*) FROM cm") == "1"    # rolled back on exception
    assert not c.closed and not c.leased
    c.close()
    c.close()
    assert c.closed
    with pytest.raises(poolbroker.InterfaceError):
        c.cursor()
    cur = poolbroker.connect("main", socket=env.socket).cursor()
    cur.close()
    with pytest.raises(poolbroker.InterfaceError):
        cur.execute("SELECT 1")


def test_autocommit(env):
    c = poolbroker.connect("main", socket=env.socket, autocommit=True)
    cur = c.cursor()
    cur.execute("CREATE TABLE ac (a int)")
    cur.execute("INSERT INTO ac VALUES (%s)", (1,))
    assert not c.leased            # returned after each statement
    assert env.psql("SELECT count(*) FROM ac") == "1"
    c.autocommit = False
    cur.execute("INSERT INTO ac VALUES (2)")
    with pytest.raises(poolbroker.ProgrammingError):
        c.autocommit = True        # not inside a transaction
    c.rollback()
    assert env.psql("SELECT count(*) FROM ac") == "1"
    c.close()


def test_transaction_semantics(conn, env):
    cur = conn.cursor()
    cur.execute("SELECT pg_sleep(0.01)")
    cur.execute("SELECT now() = statement_timestamp()")
    assert cur.fetchone() == (False,)       # inside BEGIN: now() is the transaction's start
    conn.rollback()
    conn.set_session(isolation_level="SERIALIZABLE", readonly=True)
    cur.execute("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')")
    assert cur.fetchone() == ("serializable", "on")
    with pytest.raises(poolbroker.InternalError) as ei:   # 25006 read_only_sql_transaction
        cur.execute("CREATE TABLE nope (a int)")
    assert ei.value.sqlstate == "25006"
    conn.rollback()
    conn.set_session(isolation_level="DEFAULT", readonly=False)
    # After an error the transaction is aborted until rollback (psycopg2).
    with pytest.raises(poolbroker.DataError):
        cur.execute("SELECT 1/0")
    with pytest.raises(poolbroker.InternalError) as ei:
        cur.execute("SELECT 1")
    assert ei.value.sqlstate == "25P02"
    conn.rollback()
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)
    conn.commit()


def test_named_cursor_and_nextset(conn):
    with pytest.raises(poolbroker.NotSupportedError):
        conn.cursor("named")
    cur = conn.cursor()
    cur.execute("SELECT 1")
    with pytest.raises(poolbroker.NotSupportedError):
        cur.nextset()
    cur.scroll(1, "absolute")
    assert cur.fetchone() is None
    cur.scroll(-1)
    assert cur.fetchone() == (1,)
    with pytest.raises(IndexError):
        cur.scroll(5)
    conn.rollback()


def test_bad_pool_and_broker(env, tmp_path):
    c = poolbroker.connect("nosuchpool", socket=env.socket)    # lazy: no error yet
    with pytest.raises(poolbroker.OperationalError) as ei:
        c.cursor().execute("SELECT 1")
    assert ei.value.pb_code == -2 and "PB_ENOPOOL" in str(ei.value)
    c = poolbroker.connect("main", socket=str(tmp_path / "none.sock"))
    with pytest.raises(poolbroker.OperationalError, match="PB_EBROKER"):
        c.cursor().execute("SELECT 1")
    with pytest.raises(poolbroker.InterfaceError):
        poolbroker.connect("")
    c = poolbroker.connect("cache", socket=env.socket)           # a Redis pool
    with pytest.raises(poolbroker.InterfaceError, match="PB_ETYPE"):
        c.cursor().execute("SELECT 1")
    c.close()


def test_pool_exhausted_is_operational_error(env):
    a = poolbroker.connect("tiny", socket=env.socket)
    a.cursor().execute("SELECT 1")          # holds tiny's only connection
    b = poolbroker.connect("tiny", socket=env.socket, acquire_timeout_ms=200)
    with pytest.raises(poolbroker.OperationalError, match="PB_ETIMEDOUT"):
        b.cursor().execute("SELECT 1")
    a.commit()
    b.acquire_timeout_ms = 10000      # the broker resets the connection first; it may be slow
    b.cursor().execute("SELECT 1")
    b.close()
    a.close()


def test_command_timeout_is_query_canceled(env):
    c = poolbroker.connect("tiny", socket=env.socket)
    with pytest.raises(poolbroker.OperationalError) as ei:
        c.cursor().execute("SELECT pg_sleep(5)")
    assert isinstance(ei.value, poolbroker.QueryCanceledError)
    assert ei.value.sqlstate == "57014"
    c.close()


def test_notices(conn):
    cur = conn.cursor()
    cur.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 1; RAISE WARNING 'careful'; END $$")
    assert conn.notices == ["NOTICE:  hello 1\n", "WARNING:  careful\n"]
    for i in range(60):
        cur.execute("DO $$ BEGIN RAISE NOTICE 'n%', %s; END $$".replace("%s", str(i)))
    assert len(conn.notices) == 50 and conn.notices[-1] == "NOTICE:  n59\n"
    conn.rollback()
