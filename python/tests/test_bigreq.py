"""Requests larger than the pool's request buffer (64k by default) stream
through it (issue #18): a 1 MiB bytea parameter through the DB-API and an
8 MiB Redis value, each read back whole; over the pool's max_request_size
the error names the size and the limit."""
import os

import pytest

import poolbroker
from conftest import POOLS, env_for

# This module's broker has one more pool, with a 1 MiB limit.
CAPPED = """
[pool capped]
type = redis
host = 127.0.0.1
port = {redisport}
max_size = 1
max_request_size = 1m
acquire_timeout_ms = 20000
"""


@pytest.fixture(scope="module")
def env():
    yield from env_for(POOLS + CAPPED)


def test_big_bytea_parameter(env):
    blob = os.urandom(1 << 20)
    c = poolbroker.connect("main", socket=env.socket)
    cur = c.cursor()
    cur.execute("CREATE TABLE bigb (id int, b bytea)")
    cur.execute("INSERT INTO bigb VALUES (%s, %s)", (1, blob))
    c.commit()
    cur.execute("SELECT b, length(b) FROM bigb WHERE id = %s", (1,))
    got, n = cur.fetchone()
    assert n == len(blob)
    assert bytes(got) == blob
    c.close()
    assert env.leased("main") == 0


def test_big_redis_value(env):
    value = os.urandom(8 << 20)
    r = poolbroker.Redis(pool="cache", socket=env.socket)
    assert r.set("big", value) is True
    assert r.get("big") == value
    assert r.strlen("big") == len(value)


def test_over_max_request_size_says_why(env):
    r = poolbroker.Redis(pool="capped", socket=env.socket)
    with pytest.raises(poolbroker.redis.ConnectionError) as ei:
        r.set("big", b"x" * (2 << 20))
    msg = str(ei.value)
    assert "max_request_size of 1048576 bytes" in msg and "request of 2097" in msg
    assert r.set("small", b"x" * 1000) is True
