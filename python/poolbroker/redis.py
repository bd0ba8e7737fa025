"""Redis through poolbroker, with redis-py's names and return types.

``poolbroker.Redis(pool="cache")`` is a drop-in for the common part of
``redis.Redis``: every command leases a connection of the pool, runs, and
gives it back (one call into the library, the GIL released throughout), so
nothing is held between commands.  A pipeline holds one lease for its
``execute()``.  Return types follow redis-py 4: bytes (str with
``decode_responses=True``), int, bool where redis-py gives bool, float for
scores, dict for HGETALL, set for SMEMBERS, (cursor, list) for SCAN.

``pubsub()`` gives redis-py's PubSub: ``subscribe`` / ``psubscribe`` /
``ssubscribe`` lease a connection and hold it until ``close()``, and
``get_message(timeout=...)`` / ``listen()`` deliver messages as they
arrive (libpoolbroker's pb_redis_get_message).  Blocking commands (BLPOP,
...) work through execute_command but tie up a pool connection while they
wait.

Exceptions have redis-py's names; when redis-py is installed they also
subclass redis-py's classes, so ``except redis.exceptions.ResponseError``
keeps working after a port.
"""

import datetime as _dt
import time as _time

from . import _common
from . import _poolbroker as _pb

try:  # pragma: no cover - depends on the environment
    import redis.exceptions as _rx
except ImportError:  # redis-py is optional
    _rx = None


def _base(name):
    return (getattr(_rx, name),) if _rx is not None else ()


class RedisError(*_base("RedisError"), Exception):
    """Base of the Redis errors (redis-py's RedisError)."""


class ConnectionError(*_base("ConnectionError"), RedisError):  # noqa: A001
    """The broker, the pool or the Redis server could not be reached (PB_E* in .pb_code)."""

    pb_code = None


class TimeoutError(*_base("TimeoutError"), RedisError):  # noqa: A001
    """No connection within acquire_timeout_ms, or no reply within command_timeout_ms."""

    pb_code = None


class DataError(*_base("DataError"), RedisError):
    """An argument redis-py would refuse (bool, None, other types)."""


class ResponseError(*_base("ResponseError"), RedisError):
    """Redis answered with an error reply (message without its 'ERR ' prefix, as redis-py)."""


class ExecAbortError(*_base("ExecAbortError"), ResponseError):
    """EXECABORT: a MULTI block was discarded."""


class NoScriptError(*_base("NoScriptError"), ResponseError):
    """NOSCRIPT: EVALSHA of an unknown script."""


class ReadOnlyError(*_base("ReadOnlyError"), ResponseError):
    """READONLY: the pool points at a replica."""


class BusyLoadingError(*_base("BusyLoadingError"), ConnectionError):
    """LOADING: Redis is loading its dataset."""


class AuthenticationError(*_base("AuthenticationError"), ConnectionError):
    """NOAUTH or a bad password (the broker authenticates; see password_file)."""


class NoPermissionError(*_base("NoPermissionError"), ResponseError):
    """NOPERM: the ACL user lacks a permission."""


_ERROR_PREFIX = {
    "EXECABORT": ExecAbortError, "LOADING": BusyLoadingError, "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError, "NOAUTH": AuthenticationError, "NOPERM": NoPermissionError,
}


def _make_error(msg):
    """An error reply as redis-py's parser makes it (connection.py parse_error)."""
    code = msg.split(" ")[0]
    if code == "ERR":
        return ResponseError(msg[4:])
    cls = _ERROR_PREFIX.get(code)
    if cls is not None:
        return cls(msg[len(code) + 1:])
    return ResponseError(msg)


def _lib_error(e):
    code = e.args[0]
    cls = TimeoutError if code == _pb.PB_ETIMEDOUT else ConnectionError
    err = cls(_common.lib_message(e))
    err.pb_code = code
    return err


# ------------------------------------------------------------ reply callbacks (redis-py 4)

def _str(r):
    return r.decode("utf-8", "replace") if isinstance(r, bytes) else r


def _bool_ok(r, **o):
    return _str(r) == "OK"


def _float_or_none(r, **o):
    return None if r is None else float(r)


def _zset_pairs(r, **o):
    if not r or not o.get("withscores"):
        return r
    cast = o.get("score_cast_func", float)
    it = iter(r)
    return list(zip(it, map(cast, it)))


def _pairs_to_dict(r, **o):
    if not r:
        return {}
    it = iter(r)
    return dict(zip(it, it))


def _set(r, **o):
    return r and set(r) or set()


def _scan(r, **o):
    cursor, keys = r
    return int(cursor), keys


def _zadd(r, **o):
    if r is None:
        return None
    return float(r) if o.get("as_score") else int(r)


def _set_reply(r, **o):
    if o.get("get"):
        return r
    return r and _str(r) == "OK"


def _int_or_none(r, **o):
    return None if r is None else int(r)


def _cb(f):
    return lambda r, **o: f(r)


CALLBACKS = {}
for _n in ("COPY EXPIRE EXPIREAT PEXPIRE PEXPIREAT HEXISTS HMSET MOVE MSETNX PERSIST PSETEX "
           "RENAMENX SISMEMBER SMOVE SETEX SETNX").split():
    CALLBACKS[_n] = _cb(bool)
for _n in ("DECRBY DEL EXISTS HDEL HLEN INCRBY LLEN SADD SCARD SREM STRLEN UNLINK ZCARD ZREM").split():
    CALLBACKS[_n] = _cb(int)
for _n in ("INCRBYFLOAT", "HINCRBYFLOAT"):
    CALLBACKS[_n] = _cb(float)
for _n in ("LPUSH", "RPUSH"):
    CALLBACKS[_n] = lambda r, **o: isinstance(r, int) and r or _str(r) == "OK"
for _n in ("ZSCORE", "ZINCRBY"):
    CALLBACKS[_n] = _float_or_none
for _n in "FLUSHALL FLUSHDB LSET LTRIM MSET RENAME SELECT WATCH UNWATCH".split():
    CALLBACKS[_n] = _bool_ok
for _n in "SDIFF SINTER SMEMBERS SUNION".split():
    CALLBACKS[_n] = _set
for _n in "ZPOPMAX ZPOPMIN ZRANGE ZRANGEBYSCORE ZREVRANGE ZREVRANGEBYSCORE".split():
    CALLBACKS[_n] = _zset_pairs
for _n in ("ZRANK", "ZREVRANK"):
    CALLBACKS[_n] = _int_or_none
CALLBACKS.update({
    "HGETALL": _pairs_to_dict, "SCAN": _scan, "ZADD": _zadd, "SET": _set_reply,
    "PING": lambda r, **o: _str(r) == "PONG", "RANDOMKEY": lambda r, **o: r and r or None,
})


def _parse(command, response, options):
    cb = CALLBACKS.get(command)
    return cb(response, **options) if cb is not None else response


def _reply(args, reply, options):
    """A command's reply as the caller gets it: an error reply raised,
    anything else through redis-py's callback for the command (shared by
    Redis and poolbroker.aio.Redis)."""
    if isinstance(reply, ResponseError):
        raise reply
    return _parse(_command_name(args[0]), reply, options)


def _pipeline_commands(stack, transaction):
    """The argument lists a pipeline sends for its buffered stack (entries
    (encoded args, command name, options)), MULTI/EXEC around them when
    transaction."""
    cmds = [c for c, _, _ in stack]
    if transaction:
        cmds = [[b"MULTI"]] + cmds + [[b"EXEC"]]
    return cmds


def _pipeline_results(stack, replies, transaction, raise_on_error):
    """The results of a pipeline's execute() from the replies to
    _pipeline_commands(stack, transaction), as redis-py gives them (shared
    by Pipeline and poolbroker.aio.Pipeline)."""
    if transaction:
        queued_errors = [r for r in replies[1:-1] if isinstance(r, ResponseError)]
        exec_reply = replies[-1]
        if isinstance(exec_reply, ResponseError):
            raise (queued_errors[0] if queued_errors else exec_reply)
        if exec_reply is None:
            raise RedisError("transaction aborted (EXEC returned nil)")
        replies = exec_reply
    out = []
    for (args, name, options), r in zip(stack, replies):
        if isinstance(r, ResponseError):
            if raise_on_error:
                raise type(r)(f"Command # {len(out) + 1} ({' '.join(_str(a) for a in args)}) "
                              f"of pipeline caused error: {r}")
            out.append(r)
        else:
            out.append(_parse(name, r, options))
    return out


def _command_name(a):
    """The reply-callback key of a command's first argument: a str name in
    any case ("get", "GET"); a bytes name matches no callback and its reply
    stays raw, as in redis-py (its callback table has str keys)."""
    return a.upper() if isinstance(a, str) else None


def _encode(v):
    """redis-py's Encoder.encode: bytes as is, int/float by repr, str as
    UTF-8; bool, None and anything else raise DataError."""
    if isinstance(v, bytes):
        return v
    if isinstance(v, memoryview):
        return v.tobytes()
    if isinstance(v, bool):
        raise DataError("Invalid input of type: 'bool'. Convert to a bytes, string, int or float first.")
    if isinstance(v, (int, float)):
        return repr(v).encode()
    if isinstance(v, str):
        return v.encode("utf-8")
    raise DataError(f"Invalid input of type: '{type(v).__name__}'. "
                    "Convert to a bytes, string, int or float first.")


def _seconds(t):
    return int(t.total_seconds()) if isinstance(t, _dt.timedelta) else t


def _millis(t):
    return int(t.total_seconds() * 1000) if isinstance(t, _dt.timedelta) else t


# ------------------------------------------------------------ commands

class _Commands:
    """redis-py's command methods, each built on execute_command(*args,
    **options); options are read by the reply callback (withscores, ...)."""

    # -- strings
    def get(self, name):
        """GET: bytes/str, or None if the key does not exist."""
        return self.execute_command("GET", name)

    def set(self, name, value, ex=None, px=None, nx=False, xx=False, keepttl=False, get=False,
            exat=None, pxat=None):
        """SET with EX seconds / PX milliseconds (int or timedelta), NX, XX,
        KEEPTTL, GET, EXAT, PXAT.  True if set; None if NX/XX prevented it;
        with get=True the old value (redis-py 4)."""
        args = ["SET", name, value]
        if sum(x is not None for x in (ex, px, exat, pxat)) + bool(keepttl) > 1:
            raise DataError("``ex``, ``px``, ``exat``, ``pxat`` and ``keepttl`` are mutually exclusive.")
        if nx and xx:
            raise DataError("``nx`` and ``xx`` are mutually exclusive.")
        if ex is not None:
            args += ["EX", _seconds(ex)]
        if px is not None:
            args += ["PX", _millis(px)]
        if exat is not None:
            args += ["EXAT", int(exat.timestamp()) if isinstance(exat, _dt.datetime) else exat]
        if pxat is not None:
            args += ["PXAT", int(pxat.timestamp() * 1000) if isinstance(pxat, _dt.datetime) else pxat]
        if keepttl:
            args.append("KEEPTTL")
        if nx:
            args.append("NX")
        if xx:
            args.append("XX")
        if get:
            args.append("GET")
        return self.execute_command(*args, get=get)

    def setex(self, name, time, value):
        return self.execute_command("SETEX", name, _seconds(time), value)

    def setnx(self, name, value):
        return self.execute_command("SETNX", name, value)

    def getset(self, name, value):
        return self.execute_command("GETSET", name, value)

    def mget(self, keys, *args):
        """MGET: list of values (None for missing keys)."""
        keys = list(keys) if isinstance(keys, (list, tuple)) else [keys]
        return self.execute_command("MGET", *keys, *args)

    def mset(self, mapping):
        """MSET from a dict: True."""
        items = []
        for k, v in mapping.items():
            items += [k, v]
        return self.execute_command("MSET", *items)

    def incr(self, name, amount=1):
        """INCRBY name amount (redis-py's incr): the new value (int)."""
        return self.incrby(name, amount)

    def incrby(self, name, amount=1):
        return self.execute_command("INCRBY", name, amount)

    def incrbyfloat(self, name, amount=1.0):
        return self.execute_command("INCRBYFLOAT", name, amount)

    def decr(self, name, amount=1):
        """DECRBY name amount (redis-py's decr): the new value (int)."""
        return self.decrby(name, amount)

    def decrby(self, name, amount=1):
        return self.execute_command("DECRBY", name, amount)

    def append(self, key, value):
        return self.execute_command("APPEND", key, value)

    def strlen(self, name):
        return self.execute_command("STRLEN", name)

    # -- keys
    def delete(self, *names):
        """DEL: how many keys were removed (int)."""
        return self.execute_command("DEL", *names)

    def unlink(self, *names):
        return self.execute_command("UNLINK", *names)

    def exists(self, *names):
        """EXISTS: how many of the names exist (int, as redis-py 4)."""
        return self.execute_command("EXISTS", *names)

    def _expire_opts(self, nx, xx, gt, lt):
        return [o for o, f in (("NX", nx), ("XX", xx), ("GT", gt), ("LT", lt)) if f]

    def expire(self, name, time, nx=False, xx=False, gt=False, lt=False):
        """EXPIRE seconds (int or timedelta): True if the timeout was set."""
        return self.execute_command("EXPIRE", name, _seconds(time), *self._expire_opts(nx, xx, gt, lt))

    def pexpire(self, name, time, nx=False, xx=False, gt=False, lt=False):
        """PEXPIRE milliseconds (int or timedelta): True if the timeout was set."""
        return self.execute_command("PEXPIRE", name, _millis(time), *self._expire_opts(nx, xx, gt, lt))

    def persist(self, name):
        return self.execute_command("PERSIST", name)

    def ttl(self, name):
        """TTL in seconds (int); -1 no expiry, -2 no key."""
        return self.execute_command("TTL", name)

    def pttl(self, name):
        return self.execute_command("PTTL", name)

    def type(self, name):
        return self.execute_command("TYPE", name)

    def rename(self, src, dst):
        return self.execute_command("RENAME", src, dst)

    def keys(self, pattern="*"):
        """KEYS pattern: list (avoid on big databases; see scan)."""
        return self.execute_command("KEYS", pattern)

    def scan(self, cursor=0, match=None, count=None, _type=None):
        """SCAN: (next cursor as int, list of keys); 0 ends the iteration."""
        args = ["SCAN", cursor]
        if match is not None:
            args += ["MATCH", match]
        if count is not None:
            args += ["COUNT", count]
        if _type is not None:
            args += ["TYPE", _type]
        return self.execute_command(*args)

    def scan_iter(self, match=None, count=None, _type=None):
        """Every key, SCAN by SCAN (each a separate lease)."""
        cursor = "0"
        while cursor != 0:
            cursor, data = self.scan(cursor=cursor, match=match, count=count, _type=_type)
            yield from data

    def dbsize(self):
        return self.execute_command("DBSIZE")

    def flushdb(self, asynchronous=False):
        return self.execute_command("FLUSHDB", *(["ASYNC"] if asynchronous else []))

    def ping(self):
        """PING: True."""
        return self.execute_command("PING")

    def publish(self, channel, message):
        """PUBLISH: how many subscribers received it (int)."""
        return self.execute_command("PUBLISH", channel, message)

    # -- hashes
    def hget(self, name, key):
        return self.execute_command("HGET", name, key)

    def hset(self, name, key=None, value=None, mapping=None, items=None):
        """HSET key value and/or a mapping (and items, a flat list): how many
        fields were added (int)."""
        if key is None and not mapping and not items:
            raise DataError("'hset' with no key value pairs")
        args = []
        if key is not None:
            args += [key, value]
        if items:
            args += list(items)
        if mapping:
            for k, v in mapping.items():
                args += [k, v]
        return self.execute_command("HSET", name, *args)

    def hmget(self, name, keys, *args):
        keys = list(keys) if isinstance(keys, (list, tuple)) else [keys]
        return self.execute_command("HMGET", name, *keys, *args)

    def hgetall(self, name):
        """HGETALL: dict of field -> value ({} for a missing key)."""
        return self.execute_command("HGETALL", name)

    def hdel(self, name, *keys):
        return self.execute_command("HDEL", name, *keys)

    def hexists(self, name, key):
        return self.execute_command("HEXISTS", name, key)

    def hincrby(self, name, key, amount=1):
        return self.execute_command("HINCRBY", name, key, amount)

    def hincrbyfloat(self, name, key, amount=1.0):
        return self.execute_command("HINCRBYFLOAT", name, key, amount)

    def hkeys(self, name):
        return self.execute_command("HKEYS", name)

    def hvals(self, name):
        return self.execute_command("HVALS", name)

    def hlen(self, name):
        return self.execute_command("HLEN", name)

    # -- lists
    def lpush(self, name, *values):
        return self.execute_command("LPUSH", name, *values)

    def rpush(self, name, *values):
        return self.execute_command("RPUSH", name, *values)

    def lpop(self, name, count=None):
        """LPOP: a value (None if empty), or with count a list (None if empty)."""
        return self.execute_command("LPOP", name, *([count] if count is not None else []))

    def rpop(self, name, count=None):
        return self.execute_command("RPOP", name, *([count] if count is not None else []))

    def lrange(self, name, start, end):
        return self.execute_command("LRANGE", name, start, end)

    def llen(self, name):
        return self.execute_command("LLEN", name)

    def lindex(self, name, index):
        return self.execute_command("LINDEX", name, index)

    def ltrim(self, name, start, end):
        return self.execute_command("LTRIM", name, start, end)

    def lrem(self, name, count, value):
        return self.execute_command("LREM", name, count, value)

    # -- sets
    def sadd(self, name, *values):
        return self.execute_command("SADD", name, *values)

    def srem(self, name, *values):
        return self.execute_command("SREM", name, *values)

    def smembers(self, name):
        """SMEMBERS: a set."""
        return self.execute_command("SMEMBERS", name)

    def sismember(self, name, value):
        """SISMEMBER: bool."""
        return self.execute_command("SISMEMBER", name, value)

    def scard(self, name):
        return self.execute_command("SCARD", name)

    # -- sorted sets
    def zadd(self, name, mapping, nx=False, xx=False, ch=False, incr=False, gt=False, lt=False):
        """ZADD from {member: score}: how many were added (int); with
        incr=True the new score (float)."""
        if not mapping:
            raise DataError("ZADD requires at least one element/score pair")
        if nx and xx:
            raise DataError("ZADD allows either 'nx' or 'xx', not both")
        if incr and len(mapping) != 1:
            raise DataError("ZADD option 'incr' only works when passing a single element/score pair")
        args = [o for o, f in (("NX", nx), ("XX", xx), ("GT", gt), ("LT", lt), ("CH", ch), ("INCR", incr))
                if f]
        for member, score in mapping.items():
            args += [score, member]
        return self.execute_command("ZADD", name, *args, as_score=incr)

    def zrange(self, name, start, end, desc=False, withscores=False, score_cast_func=float):
        """ZRANGE by rank (REV with desc): members, or with withscores a
        list of (member, score) tuples (score through score_cast_func)."""
        args = ["ZRANGE", name, start, end] + (["REV"] if desc else []) + (["WITHSCORES"] if withscores else [])
        return self.execute_command(*args, withscores=withscores, score_cast_func=score_cast_func)

    def zrevrange(self, name, start, end, withscores=False, score_cast_func=float):
        args = ["ZREVRANGE", name, start, end] + (["WITHSCORES"] if withscores else [])
        return self.execute_command(*args, withscores=withscores, score_cast_func=score_cast_func)

    def zrangebyscore(self, name, min, max, start=None, num=None, withscores=False, score_cast_func=float):
        args = ["ZRANGEBYSCORE", name, min, max]
        if start is not None and num is not None:
            args += ["LIMIT", start, num]
        if withscores:
            args.append("WITHSCORES")
        return self.execute_command(*args, withscores=withscores, score_cast_func=score_cast_func)

    def zscore(self, name, value):
        """ZSCORE: float, or None if the member is absent."""
        return self.execute_command("ZSCORE", name, value)

    def zincrby(self, name, amount, value):
        """ZINCRBY: the new score (float)."""
        return self.execute_command("ZINCRBY", name, amount, value)

    def zrem(self, name, *values):
        return self.execute_command("ZREM", name, *values)

    def zcard(self, name):
        return self.execute_command("ZCARD", name)

    def zrank(self, name, value):
        return self.execute_command("ZRANK", name, value)


class Redis(_Commands):
    """A redis-py-style client for pool ``pool`` (type redis) of the broker
    at ``socket`` (None: $POOLBROKER_SOCKET, else
    /run/poolbroker/poolbroker.sock).

    decode_responses: as redis-py, str instead of bytes (UTF-8).
    acquire_timeout_ms: how long a command waits for a free connection (< 0:
    the pool's acquire_timeout_ms), then TimeoutError.
    Nothing is attached or leased until the first command."""

    def __init__(self, pool="cache", socket=None, decode_responses=False, acquire_timeout_ms=-1):
        if not isinstance(pool, str) or not pool:
            raise DataError("pool must be a non-empty str")
        self.pool = pool
        self.socket = socket
        self.decode_responses = bool(decode_responses)
        self.acquire_timeout_ms = int(acquire_timeout_ms)

    def execute_command(self, *args, **options):
        """Run one command (arguments encoded as redis-py does) on a fresh
        lease and return its reply through redis-py's callback for it.
        Raises ResponseError (or a subclass) for an error reply,
        ConnectionError / TimeoutError when no answer came."""
        cmd = [_encode(a) for a in args]
        try:
            reply = _common.client_for(self.socket).redis_command(
                self.pool, self.acquire_timeout_ms, cmd, self.decode_responses, _make_error)
        except _common.LibError as e:
            raise _lib_error(e) from None
        return _reply(args, reply, options)

    def pipeline(self, transaction=True, shard_hint=None):
        """A Pipeline (redis-py's default transaction=True wraps the commands
        in MULTI/EXEC)."""
        return Pipeline(self, transaction)

    def pubsub(self, ignore_subscribe_messages=False):
        """A PubSub, as redis-py's: it leases a connection of the pool at its
        first subscribe and keeps it until close()."""
        return PubSub(self, ignore_subscribe_messages)

    def close(self):
        """Nothing to close (no connection is held); for redis-py parity."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __repr__(self):
        return f"<poolbroker.Redis pool={self.pool!r} socket={self.socket!r}>"


class Pipeline(_Commands):
    """Buffers commands (each method returns the pipeline, so calls chain)
    and sends them in one write on one lease at execute(), which returns
    their results in order.  transaction=True wraps them in MULTI/EXEC."""

    def __init__(self, client, transaction=True):
        self.client = client
        self.transaction = transaction
        self.command_stack = []

    def __len__(self):
        return len(self.command_stack)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reset()
        return False

    def reset(self):
        """Drop the buffered commands."""
        self.command_stack = []

    def multi(self):
        """Turn on transaction mode for the commands that follow (redis-py)."""
        if self.command_stack:
            raise RedisError("Commands without an initial WATCH have already been issued")
        self.transaction = True

    def execute_command(self, *args, **options):
        self.command_stack.append(([_encode(a) for a in args], _command_name(args[0]), options))
        return self

    def execute(self, raise_on_error=True):
        """Send the buffered commands on one lease and return their results
        (redis-py's types).  With raise_on_error the first error reply is
        raised (in a transaction: the others still ran); otherwise error
        replies are returned in place.  The buffer is emptied either way."""
        stack, self.command_stack = self.command_stack, []
        if not stack:
            return []
        cmds = _pipeline_commands(stack, self.transaction)
        c = self.client
        try:
            lease = _common.client_for(c.socket).acquire(c.pool, c.acquire_timeout_ms)
            try:
                replies = lease.redis_pipeline(cmds, c.decode_responses, _make_error)
            finally:
                lease.release()
        except _common.LibError as e:
            raise _lib_error(e) from None
        return _pipeline_results(stack, replies, self.transaction, raise_on_error)


_SUBSCRIBE = {"subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe", "sunsubscribe"}


class PubSub:
    """redis-py's PubSub on one lease.  The first (p|s)subscribe leases a
    connection of the client's pool; it stays leased, subscribed, until
    close() (or the end of a ``with`` block), which releases it: the broker
    unsubscribes it (RESET) before anyone else gets it.

    Messages are dicts as redis-py gives them: {"type": "message" |
    "pmessage" | "smessage" | "subscribe" | ..., "pattern": pattern or None,
    "channel": ..., "data": payload or subscription count}.  Handlers
    (``subscribe(ch=func)``) and ``run_in_thread`` are not supported."""

    _SLICE_MS = 100                 # longest single wait, so Ctrl-C is seen

    def __init__(self, client, ignore_subscribe_messages=False):
        self.client = client
        self.ignore_subscribe_messages = bool(ignore_subscribe_messages)
        self._lease = None
        self._pending = []          # subscription confirmations not yet returned
        self.channels = set()
        self.patterns = set()
        self.shard_channels = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at interpreter exit
            pass

    @property
    def subscribed(self):
        """True while any channel, pattern or shard channel is subscribed."""
        return bool(self.channels or self.patterns or self.shard_channels)

    def close(self):
        """Release the lease (the broker unsubscribes the connection)."""
        lease, self._lease = self._lease, None
        self._pending = []
        self.channels, self.patterns, self.shard_channels = set(), set(), set()
        if lease is not None and not lease.released:
            lease.release()

    reset = close

    def _command(self, name, names):
        if not names:
            if name.startswith(("un", "pun", "sun")):
                # The broker refuses a bare UNSUBSCRIBE (docs/protocol.md):
                # name what is subscribed.
                names = list({"unsubscribe": self.channels, "punsubscribe": self.patterns,
                              "sunsubscribe": self.shard_channels}[name])
                if not names:
                    return
            else:
                raise DataError(f"{name} needs at least one channel or pattern")
        c = self.client
        try:
            if self._lease is None:
                self._lease = _common.client_for(c.socket).acquire(c.pool, c.acquire_timeout_ms)
            args = [name.upper()] + [_encode(n) for n in names]
            replies = self._lease.redis_exec(args, len(names), c.decode_responses, _make_error)
        except _common.LibError as e:
            raise _lib_error(e) from None
        for r in replies:
            if isinstance(r, Exception):
                raise r
            self._track(r)
            self._pending.append(self._message(r))

    def _track(self, r):
        kind, name = _str(r[0]).lower(), r[1]
        sets = {"subscribe": self.channels, "unsubscribe": self.channels, "psubscribe": self.patterns,
                "punsubscribe": self.patterns, "ssubscribe": self.shard_channels,
                "sunsubscribe": self.shard_channels}
        if kind in sets:
            (sets[kind].add if not kind.startswith(("un", "pun", "sun")) else sets[kind].discard)(name)

    @staticmethod
    def _message(r):
        kind = _str(r[0])
        if kind.lower() == "pmessage":
            return {"type": kind, "pattern": r[1], "channel": r[2], "data": r[3]}
        return {"type": kind, "pattern": None, "channel": r[1], "data": r[2]}

    def subscribe(self, *channels):
        self._command("subscribe", _flatten(channels))

    def psubscribe(self, *patterns):
        self._command("psubscribe", _flatten(patterns))

    def ssubscribe(self, *channels):
        self._command("ssubscribe", _flatten(channels))

    def unsubscribe(self, *channels):
        self._command("unsubscribe", _flatten(channels))

    def punsubscribe(self, *patterns):
        self._command("punsubscribe", _flatten(patterns))

    def sunsubscribe(self, *channels):
        self._command("sunsubscribe", _flatten(channels))

    def get_message(self, ignore_subscribe_messages=False, timeout=0.0):
        """The next message, or None if none came within timeout seconds
        (0: do not wait; None: wait for ever).  Subscription confirmations
        come first, unless ignored (here or in pubsub())."""
        ignore = ignore_subscribe_messages or self.ignore_subscribe_messages
        while self._pending:
            m = self._pending.pop(0)
            if not (ignore and _str(m["type"]).lower() in _SUBSCRIBE):
                return m
        if self._lease is None or not self.subscribed:
            return None
        deadline = None if timeout is None else _time.monotonic() + max(0.0, float(timeout))
        while True:
            left = self._SLICE_MS if deadline is None else int(max(0.0, deadline - _time.monotonic()) * 1000)
            try:
                r = self._lease.redis_get_message(min(left, self._SLICE_MS), self.client.decode_responses,
                                                  _make_error)
            except _common.LibError as e:
                raise _lib_error(e) from None
            if r is not None:
                return self._message(r)
            if deadline is not None and _time.monotonic() >= deadline:
                return None

    def listen(self):
        """Yield messages for as long as something is subscribed."""
        while self.subscribed or self._pending:
            m = self.get_message(timeout=None if not self._pending else 0)
            if m is not None:
                yield m


def _flatten(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, (list, tuple, set)) else [a])
    return out
