"""poolbroker.Redis against real redis-py: the same calls on the same
server, through the broker and directly, must give equal values of equal
types (bytes/str per decode_responses, int, bool, float, list, dict, set,
tuple)."""
import datetime as dt

import pytest
import redis as redispy

import poolbroker
import poolbroker.redis as pbr


def same(a, b):
    """Equal values and equal types, recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, set):
        return a == b and {type(x) for x in a} == {type(x) for x in b}
    return a == b


def script(c):
    """Calls people make, in order; returns their results."""
    out = []
    f = out.append
    f(c.set("s", "v1")); f(c.get("s")); f(c.get("missing"))
    f(c.set("s", "v2", nx=True)); f(c.set("s", "v3", xx=True)); f(c.set("n", 5, ex=100))
    f(c.set("p", "x", px=dt.timedelta(seconds=50))); f(c.set("s", "v4", get=True))
    f(c.ttl("n")); f(c.ttl("s")); f(c.ttl("missing")); f(0 < c.pttl("p") <= 50000)
    f(c.mset({"m1": "a", "m2": b"\xff\x00"})); f(c.mget(["m1", "missing"]))
    f(c.mget("m1", "s"))
    f(c.incr("cnt")); f(c.incrby("cnt", 10)); f(c.decr("cnt")); f(c.decr("cnt", 3))
    f(c.incrbyfloat("fl", 1.5)); f(c.append("s", "!")); f(c.strlen("s"))
    f(c.setnx("s", "no")); f(c.setex("se", 10, "v")); f(c.getset("s", "new"))
    f(c.exists("s", "m1", "missing")); f(c.delete("m1", "m2", "missing"))
    f(c.expire("s", 100)); f(c.expire("missing", 100)); f(c.pexpire("s", 100000)); f(c.persist("s"))
    f(c.type("s"))
    f(c.hset("h", "f1", "1")); f(c.hset("h", mapping={"f2": 2, "f3": 3.5})); f(c.hget("h", "f1"))
    f(c.hget("h", "nope")); f(c.hgetall("h")); f(c.hgetall("missing")); f(c.hmget("h", ["f1", "x"]))
    f(c.hincrby("h", "f2", 5)); f(c.hincrbyfloat("h", "f3", 1)); f(c.hexists("h", "f1"))
    f(c.hdel("h", "f1", "nope")); f(sorted(c.hkeys("h"))); f(c.hlen("h"))
    f(c.lpush("l", "a", "b")); f(c.rpush("l", "c", 1)); f(c.lrange("l", 0, -1)); f(c.llen("l"))
    f(c.lpop("l")); f(c.rpop("l")); f(c.lpop("l", 2)); f(c.lpop("l")); f(c.lpop("empty", 2))
    f(c.lindex("l", 0))
    f(c.sadd("st", "a", "b", "c")); f(c.srem("st", "c", "z")); f(c.smembers("st")); f(c.smembers("none"))
    f(c.sismember("st", "a")); f(c.sismember("st", "z")); f(c.scard("st"))
    f(c.zadd("z", {"a": 1, "b": 2.5})); f(c.zadd("z", {"a": 3}, xx=True, ch=True))
    f(c.zadd("z", {"c": 1}, incr=True)); f(c.zadd("z", {"c": 1}, nx=True, incr=True))
    f(c.zrange("z", 0, -1)); f(c.zrange("z", 0, -1, withscores=True)); f(c.zrange("z", 0, 0, desc=True))
    f(c.zrange("z", 0, -1, withscores=True, score_cast_func=lambda s: round(float(s))))
    f(c.zrevrange("z", 0, -1, withscores=True)); f(c.zrangebyscore("z", 2, "+inf", withscores=True))
    f(c.zscore("z", "b")); f(c.zscore("z", "nope")); f(c.zincrby("z", 2, "b")); f(c.zrem("z", "a", "q"))
    f(c.zcard("z")); f(c.zrank("z", "b")); f(c.zrank("z", "nope"))
    f(sorted(c.keys("m*"))); f(sorted(c.keys()))
    cur, keys = c.scan(0, match="*", count=1000)
    f((cur, sorted(keys))); f(sorted(c.scan_iter(match="h*")))
    f(c.publish("chan", "msg")); f(c.ping()); f(c.dbsize())
    f(c.execute_command("SET", "raw", "1")); f(c.execute_command("GET", "raw"))
    f(c.execute_command(b"set", "raw2", "2")); f(c.execute_command(b"SISMEMBER", "st", "a"))
    f(c.execute_command("STRLEN", "raw"))
    p = c.pipeline(transaction=False)
    p.set("pa", 1).incr("pa").get("pa").hgetall("h").zscore("z", "b").smembers("st").sismember("st", "a")
    f(p.execute())
    p = c.pipeline()        # transaction=True by default, as redis-py
    p.incr("tx").incr("tx").expire("tx", 10).get("tx")
    f(p.execute())
    f(c.flushdb())
    return out


@pytest.mark.parametrize("decode", [False, True])
def test_return_type_parity_with_redis_py(env, decode):
    ref = redispy.Redis(host="127.0.0.1", port=env.redis_port, db=1, decode_responses=decode)
    ref.flushdb()
    mine = poolbroker.Redis(pool="cache", socket=env.socket, decode_responses=decode)
    mine.flushdb()
    want = script(ref)
    got = script(mine)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert same(g, w), f"call #{i}: poolbroker gave {g!r}, redis-py gave {w!r}"
    ref.close()


def test_errors_match_redis_py(env, r):
    r.set("str", "x")
    with pytest.raises(pbr.ResponseError) as ei:
        r.hget("str", "f")
    assert str(ei.value).startswith("WRONGTYPE")
    assert isinstance(ei.value, redispy.exceptions.ResponseError)     # a port keeps its except clauses
    with pytest.raises(redispy.exceptions.ResponseError, match="^unknown command"):
        r.execute_command("NOSUCHCOMMAND")
    with pytest.raises(pbr.DataError, match="Invalid input of type: 'bool'"):
        r.set("k", True)
    with pytest.raises(pbr.DataError, match="Invalid input of type: 'NoneType'"):
        r.set("k", None)
    p = r.pipeline(transaction=False)
    p.set("a", 1).hget("str", "f").get("a")
    with pytest.raises(pbr.ResponseError, match="Command # 2"):
        p.execute()
    p.set("a", 1).hget("str", "f").get("a")
    res = p.execute(raise_on_error=False)
    assert res[0] is True and isinstance(res[1], pbr.ResponseError) and res[2] == b"1"
    # A command Redis refuses to queue aborts the transaction: EXECABORT.
    p = r.pipeline()
    p.set("a", 2).execute_command("SET", "onlyonearg")
    with pytest.raises(pbr.ResponseError):
        p.execute()
    assert r.get("a") == b"1"


def test_unknown_pool_and_broker(env, tmp_path):
    with pytest.raises(pbr.ConnectionError) as ei:
        poolbroker.Redis(pool="nosuch", socket=env.socket).get("x")
    assert ei.value.pb_code == -2
    with pytest.raises(redispy.exceptions.ConnectionError):
        poolbroker.Redis(socket=str(tmp_path / "none.sock")).get("x")


def test_no_lease_held_between_commands(env, r):
    for i in range(50):
        r.incr("c")
    p = r.pipeline()
    for i in range(50):
        p.incr("c")
    assert p.execute()[-1] == 100
    assert env.leased("cache") == 0


def pubsub_script(client, publisher):
    """Subscribe, publish, read: the messages a PubSub gives, in order."""
    out = []
    ps = client.pubsub()
    ps.subscribe("pbchan", "other")
    ps.psubscribe("pb*")
    for _ in range(3):
        out.append(ps.get_message(timeout=5))
    out.append(ps.get_message(timeout=0))                 # nothing yet
    publisher.publish("pbchan", "hello")
    publisher.publish("other", "ünï\x00code")
    for _ in range(3):
        out.append(ps.get_message(timeout=5))
    ps.unsubscribe("other")
    out.append(ps.get_message(timeout=5))
    publisher.publish("other", "unheard")
    publisher.publish("pbchan", "last")
    out.append(ps.get_message(ignore_subscribe_messages=True, timeout=5))
    out.append(ps.get_message(timeout=5))
    ps.close()
    return out


@pytest.mark.parametrize("decode", [False, True])
def test_pubsub_like_redis_py(env, decode):
    ref = redispy.Redis(host="127.0.0.1", port=env.redis_port, db=1, decode_responses=decode)
    mine = poolbroker.Redis(pool="cache", socket=env.socket, decode_responses=decode)
    want = pubsub_script(ref, ref)
    got = pubsub_script(mine, mine)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert same(g, w), f"message #{i}: poolbroker gave {g!r}, redis-py gave {w!r}"
    assert got[4]["type"] == "message" and got[4]["data"] in (b"hello", "hello")
    ref.close()


def test_pubsub_holds_one_lease_until_close(env, r):
    ps = r.pubsub(ignore_subscribe_messages=True)
    assert ps.get_message() is None                        # nothing subscribed, nothing leased
    assert env.leased("cache") == 0
    ps.subscribe("held")
    assert env.leased("cache") == 1
    assert ps.get_message(timeout=0.2) is None             # only the confirmation, ignored
    r.publish("held", "x")
    m = ps.get_message(timeout=5)
    assert m["channel"] == b"held" and m["data"] == b"x"
    ps.close()
    assert env.leased("cache") == 0
    # The connection came back unsubscribed: nobody hears the channel.
    assert r.execute_command("PUBSUB", "NUMSUB", "held") == [b"held", 0]
    with r.pubsub() as ps2:
        ps2.subscribe("loop")
        r.publish("loop", "1")
        r.publish("loop", "2")
        seen = []
        for m in ps2.listen():
            seen.append(m["data"])
            if len(seen) == 3:
                break
        assert seen == [1, b"1", b"2"]
    assert env.leased("cache") == 0
