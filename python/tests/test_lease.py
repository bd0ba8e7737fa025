"""Lazy leasing, release at commit/rollback/close (checked in the segment
with shmstat and stats()), fork safety (gunicorn --preload), threads."""
import os
import threading

import pytest

import poolbroker


def wait_children(pids):
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    return codes


def in_child(fn):
    """Fork; the child runs fn() and exits 0 if it returned, 1 (printing the
    exception) if it raised.  Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def test_lease_is_lazy_and_returned_at_commit_rollback_close(env):
    c = poolbroker.connect("main", socket=env.socket)
    cur = c.cursor()
    assert not c.leased and env.leased("main") == 0
    cur.execute("CREATE TABLE lz (a int)")
    assert c.leased and env.leased("main") == 1
    c.commit()
    assert not c.leased and env.leased("main") == 0
    cur.execute("INSERT INTO lz VALUES (1)")
    assert env.leased("main") == 1
    c.rollback()
    assert env.leased("main") == 0
    assert env.psql("SELECT count(*) FROM lz") == "0"
    cur.execute("INSERT INTO lz VALUES (1)")
    c.close()
    assert env.leased("main") == 0
    assert env.psql("SELECT count(*) FROM lz") == "0"      # close rolls back


def test_stats_matches_shmstat(env):
    c = poolbroker.connect("main", socket=env.socket)
    c.cursor().execute("SELECT 1")
    s = poolbroker.stats(env.shm_name)
    ref = env.shmstat()
    assert s.keys() == ref.keys() == {"broker", "pools", "slots", "backends"}
    assert [p["name"] for p in s["pools"]] == [p["name"] for p in ref["pools"]] == ["main", "tiny", "cache"]
    # Session-mode pools: no transaction-mode backend rows.
    assert [p["pool_mode"] for p in s["pools"]] == ["session"] * 3 and s["backends"] == ref["backends"] == []
    assert s["broker"]["pid"] == env.broker.pid and s["broker"]["alive"] is True
    leased = [x for x in s["slots"] if x["state"] == "leased"]
    assert len(leased) == 1 and leased[0]["pool"] == "main" and leased[0]["owner_pid"] == os.getpid()
    c.commit()
    assert not [x for x in poolbroker.stats(env.shm_name)["slots"] if x["state"] == "leased"]
    only = poolbroker.stats(env.shm_name, pool="cache")
    assert [p["name"] for p in only["pools"]] == ["cache"]
    with pytest.raises(KeyError, match="nosuch"):
        poolbroker.stats(env.shm_name, pool="nosuch")
    with pytest.raises(OSError, match="cannot open shared memory segment"):
        poolbroker.stats("/pbpytest-no-such-segment")
    os.environ["POOLBROKER_SHM"] = env.shm_name
    try:
        assert poolbroker.stats()["broker"]["pid"] == env.broker.pid
    finally:
        del os.environ["POOLBROKER_SHM"]


def test_idle_connection_holds_nothing(env):
    """Pool tiny has one connection: a committed Connection kept alive
    does not stop another from getting it (if it held the lease, b would
    time out: tiny's acquire_timeout_ms is 300)."""
    a = poolbroker.connect("tiny", socket=env.socket)
    b = poolbroker.connect("tiny", socket=env.socket, acquire_timeout_ms=10000)
    for _ in range(5):
        a.cursor().execute("SELECT 1")
        a.commit()
        b.cursor().execute("SELECT 2")
        b.rollback()
    a.close()
    b.close()


def test_preload_then_fork(env):
    """gunicorn --preload: the module is imported, a client attached and a
    Connection and a Redis created (and used) in the parent; every child
    uses them as its own."""
    conn = poolbroker.connect("main", socket=env.socket)
    cur = conn.cursor()
    cur.execute("CREATE TABLE fk_rows (pid int, n int)")
    conn.commit()                  # the parent's client is attached, nothing leased
    r = poolbroker.Redis(socket=env.socket)
    r.set("forks", 0)

    def child():
        for i in range(20):
            cur.execute("INSERT INTO fk_rows VALUES (%s, %s)", (os.getpid(), i))
            r.incr("forks")
        conn.commit()
        c2 = poolbroker.connect("main", socket=env.socket)
        c2.cursor().execute("SELECT 1")
        c2.close()

    pids = [in_child(child) for _ in range(6)]
    assert wait_children(pids) == [0] * 6
    assert env.psql("SELECT count(*), count(DISTINCT pid) FROM fk_rows") == "120|6"
    assert r.get("forks") == b"120"
    assert env.leased() == 0
    # The parent's own Connection still works after its children went.
    cur.execute("SELECT count(*) FROM fk_rows")
    assert cur.fetchone() == (120,)
    conn.commit()


def test_open_transaction_does_not_cross_fork(env):
    conn = poolbroker.connect("main", socket=env.socket)
    cur = conn.cursor()
    cur.execute("CREATE TABLE fk_tx (a int)")
    cur.execute("INSERT INTO fk_tx VALUES (1)")       # open transaction, lease held

    def child():
        with pytest.raises(poolbroker.OperationalError, match="belongs to the process that forked"):
            cur.execute("INSERT INTO fk_tx VALUES (2)")
        # ... after which the Connection starts afresh in the child.
        cur.execute("SELECT count(*) FROM pg_class WHERE relname = 'fk_tx'")
        assert cur.fetchone() == (0,)                 # the parent's CREATE is not committed
        conn.commit()

    assert wait_children([in_child(child)]) == [0]
    cur.execute("INSERT INTO fk_tx VALUES (3)")       # the parent's transaction goes on
    conn.commit()
    assert env.psql("SELECT string_agg(a::text, ',' ORDER BY a) FROM fk_tx") == "1,3"
    assert env.leased() == 0


def test_threads_each_with_a_connection(env):
    setup = poolbroker.connect("main", socket=env.socket, autocommit=True)
    setup.cursor().execute("CREATE TABLE th (t int, i int)")
    errors = []

    def work(t):
        try:
            c = poolbroker.connect("main", socket=env.socket)
            for i in range(25):
                c.cursor().execute("INSERT INTO th VALUES (%s, %s)", (t, i))
                c.commit()
            c.close()
        except Exception as e:       # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert env.psql("SELECT count(*), count(DISTINCT t) FROM th") == "200|8"
    assert env.leased() == 0
