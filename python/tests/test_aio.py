"""poolbroker.aio on a real PostgreSQL, Redis and broker: many tasks on a
small pool in one thread, asyncpg's methods and types, transactions, errors,
cancellation (nothing left leased), Redis, fork, and a broker restart (last:
it replaces the module's broker)."""
import asyncio
import datetime as dt
import decimal
import os
import threading
import time
import uuid

import pytest

import poolbroker
import poolbroker.aio as aio
from poolbroker import redis as pbredis



async def settle_leased(env, pool, want=0, within=5.0):
    """Leased slots of pool per shmstat once it reaches want (or the last
    count seen after within seconds): a release reaches the segment
    before pb_release returns, a broker reset shortly after."""
    deadline = time.monotonic() + within
    n = env.leased(pool)
    while n != want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        n = env.leased(pool)
    return n


def stats_leased(env, pool):
    return sum(1 for s in poolbroker.stats(env.shm_name, pool)["slots"] if s.get("state") == "leased")


# ------------------------------------------------------------ many on few

@pytest.mark.asyncio
async def test_hundred_tasks_on_pool_of_four(env):
    threads = threading.active_count()
    conns = [await aio.connect("main", socket=env.socket) for _ in range(100)]

    async def one(i, conn):
        return await conn.fetchrow(
            "SELECT $1::int * 2 AS v, pg_backend_pid() AS pid, clock_timestamp() AS t0, "
            "pg_sleep(0.05) AS s, clock_timestamp() AS t1", i)

    lc = aio._loop_client(env.socket)
    wakeups0 = lc.wakeups
    t0 = time.monotonic()
    # Bounded: a missed notification fails the test instead of hanging it.
    rows = await asyncio.wait_for(asyncio.gather(*(one(i, c) for i, c in enumerate(conns))), 60)
    elapsed = time.monotonic() - t0
    assert [r["v"] for r in rows] == [i * 2 for i in range(100)]
    assert threading.active_count() == threads          # no thread per call, none at all
    assert len({r["pid"] for r in rows}) <= 4
    # Overlap from the server's own clock: how many statements ran at once.
    events = sorted([(r["t0"], 1) for r in rows] + [(r["t1"], -1) for r in rows])
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    assert 2 <= peak <= 4
    # 25 rounds of 50 ms at least (the pool has 4); generous upper bound.
    assert 1.2 <= elapsed < 30
    assert await settle_leased(env, "main") == 0
    assert not any(c.leased for c in conns)
    assert lc.client.fd_polls() is False          # io_uring: woken by events only ...
    wakeups = lc.wakeups - wakeups0
    # ... a grant and a reply per task at most, with room for replies in
    # pieces; a loop that spun would show thousands.
    print(f"100 tasks on a pool of 4: {wakeups} wake-ups, {elapsed:.2f} s")
    assert 0 < wakeups <= 400, wakeups


@pytest.mark.asyncio
async def test_timerfd_fallback_gives_the_same_results(env, monkeypatch):
    """POOLBROKER_ASYNC_NOTIFY=timer (what a kernel without io_uring futex
    waits gets): the fd polls, the results are the same."""
    monkeypatch.setenv("POOLBROKER_ASYNC_NOTIFY", "timer")
    monkeypatch.setattr(aio, "_clients", {})           # a new client reads the variable
    conns = [await aio.connect("main", socket=env.socket) for _ in range(20)]
    assert aio._loop_client(env.socket).client.fd_polls() is True
    vals = await asyncio.wait_for(asyncio.gather(*(c.fetchval("SELECT $1::int, pg_sleep(0.01)", i)
                                                   for i, c in enumerate(conns))), 60)
    assert vals == list(range(20))
    assert await settle_leased(env, "main") == 0


# ------------------------------------------------------------ methods and types

@pytest.mark.asyncio
async def test_execute_fetch_fetchrow_fetchval(env):
    conn = await aio.connect("main", socket=env.socket)
    assert await conn.execute("DROP TABLE IF EXISTS aio_t; CREATE TABLE aio_t (a int PRIMARY KEY, b text)") \
        == "CREATE TABLE"
    assert await conn.execute("INSERT INTO aio_t VALUES ($1, $2)", 1, "one") == "INSERT 0 1"
    await conn.executemany("INSERT INTO aio_t VALUES ($1, $2)", [(2, "two"), (3, None)])
    assert await conn.execute("UPDATE aio_t SET b = b || '!' WHERE a < $1", 3) == "UPDATE 2"
    rows = await conn.fetch("SELECT a, b FROM aio_t ORDER BY a")
    assert [tuple(r) for r in rows] == [(1, "one!"), (2, "two!"), (3, None)]
    r = rows[0]
    assert r[0] == 1 and r["b"] == "one!" and r.get("zz", 7) == 7 and len(r) == 2
    assert list(r.keys()) == ["a", "b"] and list(r.items()) == [("a", 1), ("b", "one!")]
    assert r == (1, "one!") and "a" in r
    with pytest.raises(KeyError):
        r["nope"]
    assert repr(r) == "<Record a=1 b='one!'>"
    assert await conn.fetchrow("SELECT * FROM aio_t WHERE a = $1", 42) is None
    assert await conn.fetch("SELECT * FROM aio_t WHERE a = $1", 42) == []
    assert await conn.fetchval("SELECT count(*) FROM aio_t") == 3
    assert await conn.fetchval("SELECT a, b FROM aio_t WHERE a = 2", column=1) == "two!"
    assert await conn.fetchval("SELECT a FROM aio_t WHERE a > 99") is None
    assert not conn.leased and await settle_leased(env, "main") == 0
    await conn.close()
    assert conn.is_closed()
    with pytest.raises(poolbroker.InterfaceError):
        await conn.fetchval("SELECT 1")


@pytest.mark.asyncio
async def test_types_round_trip(env):
    conn = await aio.connect("main", socket=env.socket)
    ts = dt.datetime(2024, 2, 29, 12, 30, 45, 123456)
    tstz = dt.datetime(2024, 2, 29, 12, 30, 45, tzinfo=dt.timezone.utc)
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    values = (7, 2**40, 1.5, decimal.Decimal("12.340"), True, "héllo", b"\x00\xffab", ts, tstz,
              dt.date(2020, 1, 2), dt.timedelta(days=1, seconds=5), u, {"k": [1, 2]}, [1, 2, 3], None)
    row = await conn.fetchrow(
        "SELECT $1::int4, $2::int8, $3::float8, $4::numeric, $5::bool, $6::text, $7::bytea, "
        "$8::timestamp, $9::timestamptz, $10::date, $11::interval, $12::uuid, $13::jsonb, "
        "$14::int[], $15::text", *values)
    assert tuple(row) == values
    assert type(row[3]) is decimal.Decimal and type(row[6]) is bytes
    # The same converters as the sync driver (poolbroker._pgtypes).
    cur = poolbroker.connect("main", socket=env.socket).cursor()
    cur.execute("SELECT 1::int2, 'x'::varchar, '{a,b}'::text[], 'NaN'::float8")
    sync_row = cur.fetchone()
    cur.connection.close()
    arow = await conn.fetchrow("SELECT 1::int2, 'x'::varchar, '{a,b}'::text[], 'NaN'::float8")
    assert sync_row[:3] == tuple(arow)[:3] and arow[3] != arow[3]
    with pytest.raises(poolbroker.InterfaceError, match=r"\$1"):
        await conn.fetchval("SELECT $1", object())
    # A value Python cannot hold: DataError (as the sync driver), and the
    # transaction goes on: the other results were read to the end.
    await conn.execute("CREATE TABLE aio_conv (a int)")
    async with conn.transaction():
        with pytest.raises(poolbroker.DataError, match="infinity"):
            await conn.fetch("SELECT 'infinity'::timestamp FROM generate_series(1, 3)")
        await conn.execute("INSERT INTO aio_conv VALUES ($1)", 1)
        assert await conn.fetchval("SELECT 5") == 5
    assert await conn.fetchval("SELECT count(*) FROM aio_conv") == 1
    await conn.close()


# ------------------------------------------------------------ transactions

@pytest.mark.asyncio
async def test_transaction_commit_and_rollback(env):
    conn = await aio.connect("main", socket=env.socket)
    await conn.execute("DROP TABLE IF EXISTS aio_tx; CREATE TABLE aio_tx (a int)")
    async with conn.transaction():
        assert conn.is_in_transaction()
        await conn.execute("INSERT INTO aio_tx VALUES ($1)", 1)
        assert conn.leased and env.leased("main") == 1          # held for the transaction
        # Not visible outside until COMMIT.
        assert env.psql("SELECT count(*) FROM aio_tx") == "0"
        await conn.execute("INSERT INTO aio_tx VALUES ($1)", 2)
    assert not conn.is_in_transaction() and not conn.leased
    assert env.psql("SELECT sum(a) FROM aio_tx") == "3"

    with pytest.raises(RuntimeError, match="boom"):
        async with conn.transaction():
            await conn.execute("INSERT INTO aio_tx VALUES (100)")
            raise RuntimeError("boom")
    assert not conn.leased and env.psql("SELECT sum(a) FROM aio_tx") == "3"

    # A SQL error inside: the block raises it and nothing is committed.
    with pytest.raises(poolbroker.IntegrityError):
        async with conn.transaction():
            await conn.execute("INSERT INTO aio_tx VALUES (50)")
            await conn.execute("ALTER TABLE aio_tx ADD PRIMARY KEY (a); INSERT INTO aio_tx VALUES (50)")
    assert env.psql("SELECT count(*) FROM aio_tx WHERE a = 50") == "0"

    # Nested: a savepoint.
    async with conn.transaction(isolation="serializable"):
        assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
        await conn.execute("INSERT INTO aio_tx VALUES (10)")
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute("INSERT INTO aio_tx VALUES (20)")
                1 / 0
        async with conn.transaction():
            await conn.execute("INSERT INTO aio_tx VALUES (30)")
    assert env.psql("SELECT string_agg(a::text, ',' ORDER BY a) FROM aio_tx") == "1,2,10,30"

    # executemany outside a transaction is atomic (asyncpg >= 0.22).
    await conn.execute("CREATE TABLE aio_em (a int PRIMARY KEY)")
    with pytest.raises(poolbroker.IntegrityError) as ei:
        await conn.executemany("INSERT INTO aio_em VALUES ($1)", [(1,), (2,), (1,), (3,)])
    assert ei.value.sqlstate == "23505"
    assert await conn.fetchval("SELECT count(*) FROM aio_em") == 0
    await conn.executemany("INSERT INTO aio_em VALUES ($1)", [(i,) for i in range(1500)])
    assert await conn.fetchval("SELECT count(*) FROM aio_em") == 1500

    # An empty transaction leases nothing.
    async with conn.transaction():
        pass
    with pytest.raises(ValueError):
        conn.transaction(isolation="bogus")
    assert await settle_leased(env, "main") == 0
    await conn.close()


@pytest.mark.asyncio
async def test_one_operation_at_a_time(env):
    conn = await aio.connect("main", socket=env.socket)
    t = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(0.3)"))
    await asyncio.sleep(0.05)
    with pytest.raises(poolbroker.InterfaceError, match="another operation is in progress"):
        await conn.fetchval("SELECT 1")
    await t
    assert await conn.fetchval("SELECT 2") == 2


@pytest.mark.asyncio
async def test_create_pool_surface(env):
    async with aio.create_pool("main", socket=env.socket) as pool:
        assert await pool.fetchval("SELECT $1::int * 3", 5) == 15
        assert [tuple(r) for r in await pool.fetch("SELECT 1, 'a'")] == [(1, "a")]
        assert await pool.execute("SELECT 1") == "SELECT 1"
        async with pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT 1")
                assert conn.leased
        assert conn.is_closed() and not conn.leased
        conn = await pool.acquire()
        await conn.execute("BEGIN; SELECT 1")          # a transaction left open ...
        await pool.release(conn)                       # ... is rolled back with the lease
        results = await asyncio.wait_for(asyncio.gather(*(pool.fetchval("SELECT $1::int", i)
                                                          for i in range(40))), 60)
        assert results == list(range(40))
        with pytest.raises(poolbroker.InterfaceError):
            await pool.release("not a connection")
    with pytest.raises(poolbroker.InterfaceError, match="closed"):
        await pool.acquire()
    assert stats_leased(env, "main") == 0


# ------------------------------------------------------------ errors

@pytest.mark.asyncio
async def test_sql_errors_have_sync_classes_and_sqlstate(env):
    conn = await aio.connect("main", socket=env.socket)
    with pytest.raises(poolbroker.DataError) as ei:
        await conn.fetchval("SELECT 1 / $1::int", 0)
    assert ei.value.sqlstate == "22012" and "division by zero" in str(ei.value)
    with pytest.raises(poolbroker.ProgrammingError) as ei:
        await conn.execute("SELEC 1")
    assert ei.value.sqlstate == "42601"
    with pytest.raises(poolbroker.ProgrammingError) as ei:
        await conn.fetch("SELECT * FROM no_such_table_aio")
    assert ei.value.sqlstate == "42P01" and ei.value.diag.severity == "ERROR"
    assert await conn.fetchval("SELECT 'still fine'") == "still fine"
    bad = await aio.connect("no_such_pool", socket=env.socket)
    with pytest.raises(poolbroker.OperationalError) as ei:
        await bad.fetchval("SELECT 1")
    assert ei.value.pb_code == poolbroker._poolbroker.PB_ENOPOOL
    assert await settle_leased(env, "main") == 0


# ------------------------------------------------------------ cancellation

@pytest.mark.asyncio
async def test_cancel_while_waiting_for_a_slot(env):
    holder = await aio.connect("tiny", socket=env.socket)
    waiter = await aio.connect("tiny", socket=env.socket)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1")                      # holds tiny's only connection
    assert stats_leased(env, "tiny") == 1
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(waiter.fetchval("SELECT 2"), 0.3)
    t = asyncio.ensure_future(waiter.fetchval("SELECT 3"))
    await asyncio.sleep(0.1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await tx.commit()
    assert stats_leased(env, "tiny") == 0
    # The cancelled waiters took nothing: the slot serves the next ones.
    assert await asyncio.wait_for(waiter.fetchval("SELECT 4"), 10) == 4
    assert await asyncio.wait_for(holder.fetchval("SELECT 5"), 10) == 5
    assert stats_leased(env, "tiny") == 0


@pytest.mark.asyncio
async def test_cancel_mid_statement(env):
    conn = await aio.connect("main", socket=env.socket)
    t0 = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(conn.fetch("SELECT pg_sleep(5)"), 0.2)
    assert time.monotonic() - t0 < 4
    assert not conn.leased and stats_leased(env, "main") == 0
    # The broker cancels the statement on the server.
    deadline = time.monotonic() + 10
    while env.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' "
                   "AND state = 'active'") != "0":
        assert time.monotonic() < deadline, "the abandoned statement still runs"
        await asyncio.sleep(0.1)
    assert await conn.fetchval("SELECT 41 + 1") == 42

    # Inside a transaction: the transaction is gone, and says so.
    with pytest.raises(poolbroker.OperationalError, match="lost"):
        async with conn.transaction():
            await conn.execute("SELECT 1")
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("SELECT pg_sleep(5)", timeout=0.2)
            with pytest.raises(poolbroker.InterfaceError, match="lost"):
                await conn.execute("SELECT 1")
    assert not conn.leased
    assert await settle_leased(env, "main") == 0
    assert await conn.fetchval("SELECT 1") == 1


# ------------------------------------------------------------ Redis

@pytest.mark.asyncio
async def test_redis_basics(env):
    r = aio.Redis(pool="cache", socket=env.socket)
    await r.flushdb()
    assert await r.set("k", "v") is True
    assert await r.get("k") == b"v"
    assert await r.get("missing") is None
    assert await r.incr("n") == 1 and await r.incrby("n", 4) == 5
    assert await r.hset("h", mapping={"a": 1, "b": "x"}) == 2
    assert await r.hgetall("h") == {b"a": b"1", b"b": b"x"}
    assert await r.exists("k", "h", "nope") == 2
    assert await r.expire("k", 100) is True and 0 < await r.ttl("k") <= 100
    assert await r.sadd("s", "a", "b") == 2 and await r.smembers("s") == {b"a", b"b"}
    assert await r.execute_command("PING") is True
    assert await r.delete("k") == 1
    with pytest.raises(pbredis.ResponseError):
        await r.execute_command("INCR", "h")                 # WRONGTYPE
    rd = aio.Redis(pool="cache", socket=env.socket, decode_responses=True)
    assert await rd.hgetall("h") == {"a": "1", "b": "x"}
    async with r.pipeline() as p:
        p.set("p1", "1").incr("p1").get("p1")
        assert await p.execute() == [True, 2, b"2"]
    assert sorted([k async for k in rd.scan_iter(match="p*")]) == ["p1"]
    with pytest.raises(pbredis.DataError):
        await r.set("k", None)
    with pytest.raises(pbredis.ConnectionError):
        await aio.Redis(pool="nope", socket=env.socket).get("k")
    assert stats_leased(env, "cache") == 0
    # A command abandoned mid-flight (a blocking pop, timed out by the
    # caller) gives its lease back; the pool keeps serving.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(r.execute_command("BLPOP", "empty-list", 5), 0.2)
    assert stats_leased(env, "cache") == 0
    assert sorted(await asyncio.wait_for(asyncio.gather(*(r.incr("after") for _ in range(8))), 30)) \
        == list(range(1, 9))


@pytest.mark.asyncio
async def test_redis_fifty_concurrent_incrs(env):
    threads = threading.active_count()
    r = aio.Redis(pool="cache", socket=env.socket, decode_responses=True)
    await r.delete("ctr")
    got = await asyncio.wait_for(asyncio.gather(*(r.incr("ctr") for _ in range(50))), 60)
    assert sorted(got) == list(range(1, 51))
    assert await r.get("ctr") == "50"
    await asyncio.gather(*(r.set(f"g{i}", i) for i in range(50)))
    assert await asyncio.gather(*(r.get(f"g{i}") for i in range(50))) == [str(i) for i in range(50)]
    assert threading.active_count() == threads
    assert stats_leased(env, "cache") == 0


# ------------------------------------------------------------ fork

def test_fork_after_use_in_parent(env):
    """A Connection made and used before fork (gunicorn --preload) works in
    each child, which gets its own client; the parent's keeps working."""
    conn = asyncio.run(aio.connect("main", socket=env.socket))
    assert asyncio.run(conn.fetchval("SELECT 1")) == 1
    r = aio.Redis(pool="cache", socket=env.socket)
    pids = []
    for k in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                async def work():
                    vals = await asyncio.gather(*(conn.fetchval("SELECT $1::int + 1", i) for i in range(1)))
                    others = [await aio.connect("main", socket=env.socket) for _ in range(10)]
                    vals += await asyncio.gather(*(c.fetchval("SELECT $1::int + 1", i)
                                                   for i, c in enumerate(others)))
                    await r.incr("forked")
                    return vals
                if asyncio.run(work()) == [1] + list(range(1, 11)):
                    code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    assert codes == [0, 0]
    assert asyncio.run(conn.fetchval("SELECT 3")) == 3
    assert asyncio.run(r.get("forked")) == b"2"
    asyncio.run(r.delete("forked"))


# ------------------------------------------------------------ broker restart (last)

@pytest.mark.asyncio
async def test_broker_restart_clear_error_then_recovery(env):
    conn = await aio.connect("main", socket=env.socket)
    r = aio.Redis(pool="cache", socket=env.socket)
    assert await conn.fetchval("SELECT 1") == 1
    running = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(10)"))
    await asyncio.sleep(0.3)
    env.broker.kill()
    env.broker.wait()
    t0 = time.monotonic()
    with pytest.raises(poolbroker.OperationalError) as ei:
        await asyncio.wait_for(running, 10)
    assert time.monotonic() - t0 < 8
    assert ei.value.pb_code == poolbroker._poolbroker.PB_EBROKER
    with pytest.raises(poolbroker.OperationalError):
        await asyncio.wait_for(conn.fetchval("SELECT 2"), 10)
    with pytest.raises(pbredis.ConnectionError):
        await asyncio.wait_for(r.get("x"), 10)
    env.start_broker()
    assert await asyncio.wait_for(conn.fetchval("SELECT 3"), 20) == 3
    assert await asyncio.wait_for(r.set("x", "y"), 20) is True
    vals = await asyncio.wait_for(asyncio.gather(*(conn2.fetchval("SELECT $1::int", i) for i, conn2 in
                                                   enumerate([await aio.connect("main", socket=env.socket)
                                                              for _ in range(20)]))), 30)
    assert vals == list(range(20))
