"""poolbroker.aio beyond queries, on a real PostgreSQL, Redis and broker:
prepare(), server-side cursors, LISTEN/NOTIFY listeners and Redis Pub/Sub
(asyncpg's and redis.asyncio's surfaces).  Every wait is bounded: a missed
wake-up fails a test instead of hanging it."""
import asyncio
import threading
import time

import pytest

import poolbroker
import poolbroker.aio as aio


async def settle_leased(env, pool, want=0, within=5.0):
    """Leased slots of pool per shmstat once it reaches want (or the last
    count seen after within seconds)."""
    deadline = time.monotonic() + within
    n = env.leased(pool)
    while n != want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        n = env.leased(pool)
    return n


# ------------------------------------------------------------ prepare

async def test_prepare_fetch_fetchrow_fetchval(env):
    conn = await aio.connect("main", socket=env.socket)
    st = await conn.prepare("SELECT g, g * $1::int AS x FROM generate_series(1, $2::int) g")
    assert isinstance(st, aio.PreparedStatement)
    assert st.get_query().startswith("SELECT g")
    assert st.get_statusmsg() is None
    rows = await st.fetch(10, 3)
    assert [tuple(r) for r in rows] == [(1, 10), (2, 20), (3, 30)]
    assert st.get_statusmsg() == "SELECT 3"
    assert (await st.fetchrow(2, 5))["x"] == 2
    assert await st.fetchrow(2, 0) is None
    assert await st.fetchval(7, 1, column="x") == 7
    assert await st.fetchval(7, 0) is None
    assert not conn.leased                      # a lease per run, as fetch
    assert await settle_leased(env, "main") == 0
    await conn.close()


async def test_prepare_reports_errors_at_prepare(env):
    conn = await aio.connect("main", socket=env.socket)
    with pytest.raises(poolbroker.ProgrammingError) as ei:
        await conn.prepare("SELECT nope FROM no_such_table_here")
    assert ei.value.sqlstate == "42P01"
    with pytest.raises(poolbroker.ProgrammingError) as ei:
        await conn.prepare("SELEKT 1")
    assert ei.value.sqlstate == "42601"
    # The check leaves nothing prepared behind (it would be session state).
    st = await conn.prepare("SELECT $1::int + 1;")
    assert await st.fetchval(1) == 2
    assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0
    await conn.close()


async def test_prepared_executemany_in_transaction(env):
    conn = await aio.connect("main", socket=env.socket)
    await conn.execute("DROP TABLE IF EXISTS aio_prep; CREATE TABLE aio_prep (a int PRIMARY KEY, b text)")
    st = await conn.prepare("INSERT INTO aio_prep VALUES ($1, $2)")
    await st.executemany([(i, f"v{i}") for i in range(20)])
    assert await conn.fetchval("SELECT count(*) FROM aio_prep") == 20
    with pytest.raises(poolbroker.IntegrityError):
        await st.executemany([(100, "x"), (1, "dup")])          # atomic: neither row
    assert await conn.fetchval("SELECT count(*) FROM aio_prep") == 20
    await conn.close()


# ------------------------------------------------------------ cursors

async def test_cursor_iteration_prefetch(env):
    conn = await aio.connect("main", socket=env.socket)
    with pytest.raises(poolbroker.InterfaceError, match="outside of a transaction"):
        async for _ in conn.cursor("SELECT 1"):
            pass
    async with conn.transaction():
        got = [r["g"] async for r in conn.cursor("SELECT g FROM generate_series(1, $1::int) g", 1234,
                                                 prefetch=100)]
        assert conn.leased                      # the transaction holds the lease
        # Exactly a multiple of prefetch: the last FETCH is empty.
        got2 = [r[0] async for r in conn.cursor("SELECT g FROM generate_series(1, 200) g", prefetch=100)]
    assert got == list(range(1, 1235))
    assert got2 == list(range(1, 201))
    assert not conn.leased
    assert await settle_leased(env, "main") == 0
    await conn.close()


async def test_cursor_object_fetch_fetchrow_forward(env):
    conn = await aio.connect("main", socket=env.socket)
    async with conn.transaction():
        cur = await conn.cursor("SELECT g, g::text AS t FROM generate_series(1, $1::int) g", 10)
        assert [r["t"] for r in await cur.fetch(3)] == ["1", "2", "3"]
        assert (await cur.fetchrow())["g"] == 4
        assert await cur.forward(4) == 4
        assert [r["g"] for r in await cur.fetch(5)] == [9, 10]
        assert await cur.fetchrow() is None
        assert await cur.forward(3) == 0
        st = await conn.prepare("SELECT g FROM generate_series(1, $1::int) g")
        assert [r[0] async for r in st.cursor(3)] == [1, 2, 3]
    with pytest.raises(poolbroker.InterfaceError):
        await cur.fetch(1)                      # its transaction is over
    await conn.close()


# ------------------------------------------------------------ LISTEN / NOTIFY

async def test_listener_receives_notifications(env):
    threads = threading.active_count()
    conn = await aio.connect("main", socket=env.socket)
    other = await aio.connect("main", socket=env.socket)
    got = []
    ev = asyncio.Event()

    def cb(c, pid, channel, payload):
        got.append((c, pid, channel, payload))
        if len(got) == 3:
            ev.set()

    await conn.add_listener("aio chan", cb)
    assert await settle_leased(env, "main", 1) == 1     # the listening lease is held
    lc = aio._loop_client(env.socket)
    async with other.transaction():                     # one backend sends all three, at COMMIT
        for i in range(3):
            await other.execute("SELECT pg_notify($1, $2)", "aio chan", f"p{i}")
        sender = await other.fetchval("SELECT pg_backend_pid()")
    w0 = lc.wakeups
    await asyncio.wait_for(ev.wait(), 10)
    assert [(g[2], g[3]) for g in got] == [("aio chan", "p0"), ("aio chan", "p1"), ("aio chan", "p2")]
    assert all(g[0] is conn and g[1] == sender for g in got)
    assert lc.wakeups - w0 <= 6                         # woken by the delivery, no polling
    # The connection still runs statements (on leases of their own).
    assert await conn.fetchval("SELECT 41 + 1") == 42
    await conn.remove_listener("aio chan", cb)
    assert await settle_leased(env, "main") == 0        # last listener gone: the lease went back
    await other.execute("NOTIFY \"aio chan\", 'late'")
    await asyncio.sleep(0.2)
    assert len(got) == 3
    assert threading.active_count() == threads
    await conn.close()
    await other.close()


async def test_listeners_two_channels_async_callback_unlisten(env):
    conn = await aio.connect("main", socket=env.socket)
    other = await aio.connect("main", socket=env.socket)
    a, b = [], []
    done = asyncio.Event()

    async def cb_a(c, pid, channel, payload):
        await asyncio.sleep(0)
        a.append(payload)
        done.set()

    def cb_b(c, pid, channel, payload):
        b.append(payload)

    def cb_b2(c, pid, channel, payload):
        b.append(payload + "!")

    await conn.add_listener("ch_a", cb_a)
    await conn.add_listener("ch_b", cb_b)
    await conn.add_listener("ch_b", cb_b2)
    await other.execute("NOTIFY ch_b, 'x'; NOTIFY ch_a, 'y'")
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(b) == ["x", "x!"] and a == ["y"]
    # ch_b's last callback removed: UNLISTEN ch_b, ch_a still heard.
    await conn.remove_listener("ch_b", cb_b)
    await conn.remove_listener("ch_b", cb_b2)
    await conn.remove_listener("ch_b", cb_b2)           # not added: nothing
    done.clear()
    await other.execute("NOTIFY ch_b, 'gone'; NOTIFY ch_a, 'z'")
    await asyncio.wait_for(done.wait(), 10)
    assert a == ["y", "z"] and sorted(b) == ["x", "x!"]
    assert env.leased("main") == 1
    await conn.close()                                  # drops the listening lease
    assert await settle_leased(env, "main") == 0
    await other.close()


async def test_listener_lease_lost_is_reported(env):
    conn = await aio.connect("main", socket=env.socket)
    killer = await aio.connect("main", socket=env.socket)
    reported = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda lp, ctx: reported.append(ctx))
    try:
        await conn.add_listener("doomed", lambda *a: None)
        pid = conn._listen_lease.backend_pid
        await killer.execute("SELECT pg_terminate_backend($1)", pid)
        deadline = time.monotonic() + 10
        while not reported and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert reported and "listeners on ['doomed'] were dropped" in reported[0]["message"]
        assert isinstance(reported[0]["exception"], poolbroker.OperationalError)
        assert conn._listeners == {}
        assert await settle_leased(env, "main") == 0
        # And it can listen again.
        await conn.add_listener("doomed", lambda *a: None)
        await conn.close()
    finally:
        loop.set_exception_handler(None)
    await killer.close()


# ------------------------------------------------------------ Redis Pub/Sub

async def test_redis_pubsub_get_message_and_listen(env):
    r = aio.Redis("cache", socket=env.socket, decode_responses=True)
    p = r.pubsub()
    await p.subscribe("news", "sport")
    await p.psubscribe("w*")
    assert p.subscribed
    m = await p.get_message(timeout=1)
    assert m == {"type": "subscribe", "pattern": None, "channel": "news", "data": 1}
    assert (await p.get_message())["channel"] == "sport"
    assert (await p.get_message())["type"] == "psubscribe"
    assert await p.get_message(timeout=0) is None       # nothing published yet
    assert await p.get_message(timeout=0.05) is None
    assert await r.publish("news", "hello") == 1
    assert await r.publish("weather", "rain") == 1
    m = await p.get_message(timeout=5)
    assert m == {"type": "message", "pattern": None, "channel": "news", "data": "hello"}
    m = await p.get_message(timeout=5)
    assert m == {"type": "pmessage", "pattern": "w*", "channel": "weather", "data": "rain"}

    async def publisher():
        for i in range(5):
            await asyncio.sleep(0.01)
            await r.publish("sport", str(i))
        await p.unsubscribe()
        await p.punsubscribe()

    task = asyncio.ensure_future(publisher())
    seen = []

    async def consume():
        async for m in p.listen():
            seen.append((m["type"], m["data"]))

    await asyncio.wait_for(consume(), 10)
    await task
    assert [d for t, d in seen if t == "message"] == ["0", "1", "2", "3", "4"]
    assert {t for t, d in seen} == {"message", "unsubscribe", "punsubscribe"}
    assert not p.subscribed
    await p.close()
    assert await settle_leased(env, "cache") == 0


async def test_redis_pubsub_waiter_while_subscribing_and_close(env):
    r = aio.Redis("cache", socket=env.socket)
    async with r.pubsub(ignore_subscribe_messages=True) as p:
        await p.subscribe("one")
        waiter = asyncio.ensure_future(p.get_message(timeout=None))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await p.subscribe("two")                        # while a task waits for a message
        await r.publish("two", b"2")
        m = await asyncio.wait_for(waiter, 5)
        assert m["channel"] == b"two" and m["data"] == b"2"
        # A waiter cancelled by its timeout loses nothing.
        assert await p.get_message(timeout=0.05) is None
        await r.publish("one", b"1")
        m = await p.get_message(timeout=5)
        assert m["data"] == b"1"
        # close() while a task waits ends its wait.
        waiter = asyncio.ensure_future(p.get_message(timeout=None))
        await asyncio.sleep(0.05)
    assert await asyncio.wait_for(waiter, 5) is None
    assert await settle_leased(env, "cache") == 0
