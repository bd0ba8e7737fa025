#!/usr/bin/env python3
"""mkcorpus.py — (re)generate the seed corpora under tests/fuzz/corpus/.

The PostgreSQL and Redis replies are captured from real servers (the bytes
are exactly what a backend sent), so this needs a running PostgreSQL (trust
auth, user postgres) and a Redis started with --enable-debug-command yes
(for DEBUG PROTOCOL, which emits every RESP3 type):

    bash tools/pg-start /tmp/pbcap/pg
    bash tools/redis-start /tmp/pbcap/redis --enable-debug-command yes
    python3 tests/fuzz/mkcorpus.py --pg-sock /tmp/pbcap/pg/pgsock --pg-port PGPORT \\
        --redis-port REDISPORT

Input formats of the targets (see each tests/fuzz/fuzz_*.c):
    fuzz_pg_request, fuzz_resp:  2 bytes (big-endian split point) + payload
    fuzz_pg_reply:               4 bytes (chunking seed) + backend byte stream
    fuzz_conf:                   config text
    fuzz_shm:                    op stream (see fuzz_shm.c); seeds are random
    fuzz_attach:                 mode byte + request, answer or layout (see
                                 fuzz_attach.c); struct sizes from a cc probe
"""
import argparse
import hashlib
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def split_prefix(payload, frac=0.5):
    return struct.pack(">H", int(len(payload) * frac) & 0xFFFF) + payload


# ------------------------------------------------------------ PostgreSQL

def msg(t, body):
    return t + struct.pack(">I", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def fe_query(sql):
    return msg(b"Q", cstr(sql))


def fe_parse(name, sql, types=()):
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack(">H", len(types)) +
               b"".join(struct.pack(">I", t) for t in types))


def fe_bind(portal, stmt, params, result_format=0, param_formats=()):
    b = cstr(portal) + cstr(stmt)
    b += struct.pack(">H", len(param_formats)) + b"".join(struct.pack(">H", f) for f in param_formats)
    b += struct.pack(">H", len(params))
    for p in params:
        if p is None:
            b += struct.pack(">i", -1)
        else:
            b += struct.pack(">I", len(p)) + p
    b += struct.pack(">HH", 1, result_format)
    return msg(b"B", b)


def fe_describe(kind, name):
    return msg(b"D", kind + cstr(name))


def fe_execute(portal, max_rows=0):
    return msg(b"E", cstr(portal) + struct.pack(">I", max_rows))


def fe_close(kind, name):
    return msg(b"C", kind + cstr(name))


FE_SYNC = msg(b"S", b"")


def lib_name(sql, types=()):
    """pb_pg_prepare's server-side name for sql (pb_stmt_hash_*, include/pb_shm.h)."""
    h = 1469598103934665603
    for b in sql.encode():
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    for t in types:
        h = ((h ^ t) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ len(types)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    if h <= 2:
        h += 3
    return "pb_%016x" % h
FE_FLUSH = msg(b"H", b"")


def pg_read_until(s, nz, stop_on_copy_in=False):
    """Read backend messages until nz ReadyForQuery (or CopyInResponse)."""
    buf = b""
    out = b""
    seen = 0
    while True:
        while len(buf) >= 5:
            t = buf[0:1]
            (ln,) = struct.unpack(">I", buf[1:5])
            if len(buf) < 1 + ln:
                break
            m, buf = buf[:1 + ln], buf[1 + ln:]
            out += m
            if t == b"Z":
                seen += 1
                if seen == nz:
                    return out
            if t == b"G" and stop_on_copy_in:
                return out
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("postgres closed the connection")
        buf += chunk


def pg_connect(sockdir, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(sockdir, ".s.PGSQL.%d" % port))
    params = b"user\0postgres\0database\0postgres\0application_name\0mkcorpus\0\0"
    s.sendall(struct.pack(">II", len(params) + 8, 196608) + params)
    startup = pg_read_until(s, 1)
    return s, startup


def pg_corpus(sockdir, port):
    s, startup = pg_connect(sockdir, port)
    # The client decoder never sees the startup phase (libpq handles it in
    # the broker); keep its ParameterStatus/BackendKeyData/RFQ, minus 'R'.
    pos, rest = 0, b""
    while pos < len(startup):
        (ln,) = struct.unpack(">I", startup[pos + 1:pos + 5])
        m = startup[pos:pos + 1 + ln]
        if m[0:1] != b"R":
            rest += m
        pos += 1 + ln
    replies = {"startup_params": rest}
    requests = {}

    def run(name, req, nz=1, copy_in=None):
        requests[name] = req
        s.sendall(req)
        if copy_in is not None:
            out = pg_read_until(s, 1, stop_on_copy_in=True)
            s.sendall(copy_in)
            requests[name + "_copydata"] = copy_in
            out += pg_read_until(s, nz)
        else:
            out = pg_read_until(s, nz)
        replies[name] = out

    run("select1", fe_query("SELECT 1"))
    run("select_cols", fe_query("SELECT 1 AS one, 'two' AS two, NULL::text AS three, 1.5::float8 AS f"))
    run("series", fe_query("SELECT n, repeat('x', n * 10) FROM generate_series(1, 8) AS n"))
    run("error_div0", fe_query("SELECT 1/0"))
    run("empty_query", fe_query(""))
    run("multi_stmt", fe_query("BEGIN; SELECT 1; INSERT INTO pg_temp.nope VALUES (1); COMMIT"))
    run("txn_begin", fe_query("BEGIN"))
    run("txn_fail", fe_query("SELECT nosuchcolumn"))
    run("txn_rollback", fe_query("ROLLBACK"))
    run("notice", fe_query("DO $$BEGIN RAISE NOTICE 'hello %', 42; END$$"))
    run("listen_notify", fe_query("LISTEN chan; NOTIFY chan, 'payload here'"))
    run("set_param", fe_query("SET application_name = 'fuzzseed'"))
    run("ext_select", fe_parse("", "SELECT $1::int + 1 AS answer", (23,)) + fe_bind("", "", [b"41"]) +
        fe_describe(b"P", "") + fe_execute("") + FE_SYNC)
    run("ext_binary", fe_parse("s1", "SELECT $1::int4, now(), NULL::int", (23,)) +
        fe_bind("p1", "s1", [struct.pack(">i", 7)], 1, (1,)) + fe_describe(b"P", "p1") +
        fe_execute("p1") + fe_close(b"P", "p1") + fe_close(b"S", "s1") + FE_SYNC)
    run("ext_describe_stmt", fe_parse("s2", "SELECT $1::text, $2::int8") + fe_describe(b"S", "s2") + FE_SYNC)
    run("ext_parse_error", fe_parse("", "SELEC 1") + fe_bind("", "", []) + fe_execute("") + FE_SYNC)
    run("ext_suspended", fe_parse("", "SELECT generate_series(1, 5)") + fe_bind("", "", []) +
        fe_execute("", 2) + fe_execute("", 2) + FE_SYNC)
    run("ext_nodata", fe_parse("", "SET search_path = public") + fe_bind("", "", []) +
        fe_describe(b"P", "") + fe_execute("") + FE_SYNC)
    run("ext_null_param", fe_parse("", "SELECT $1::text IS NULL") + fe_bind("", "", [None]) +
        fe_execute("") + FE_SYNC + FE_FLUSH)
    # a library-named statement (the broker tracks it), run twice: the second
    # Parse is the one the broker would drop
    lib = lib_name("SELECT $1::int4 * 2", (23,))
    run("lib_stmt", (fe_parse(lib, "SELECT $1::int4 * 2", (23,)) + fe_bind("", lib, [b"21"]) +
                     fe_execute("") + FE_SYNC) * 2, nz=2)
    run("copy_out", fe_query("COPY (SELECT i, 'row ' || i FROM generate_series(1, 3) i) TO STDOUT"))
    run("mk_table", fe_query("CREATE TEMP TABLE t (a int, b text)"))
    run("copy_in", fe_query("COPY t FROM STDIN"),
        copy_in=msg(b"d", b"1\tone\n2\ttwo\n") + msg(b"c", b""))
    run("copy_in_fail", fe_query("COPY t FROM STDIN"), copy_in=msg(b"f", cstr("client gave up")))
    run("insert", fe_query("INSERT INTO t VALUES (3, 'three'), (4, NULL)"))
    run("update_returning", fe_query("UPDATE t SET b = upper(b) WHERE a < 3 RETURNING *"))
    run("show_all", fe_query("SHOW ALL"))
    s.sendall(msg(b"X", b""))
    s.close()

    # Two more whole streams: several commands' replies back to back.
    replies["pipeline"] = replies["select1"] + replies["error_div0"] + replies["select_cols"]
    for name, data in replies.items():
        write("fuzz_pg_reply", "be_" + name, struct.pack(">I", 0x01000000 | (len(data) & 0xFFFF)) + data)
        write("fuzz_pg_request", "be_" + name, split_prefix(data, 0.37))
    requests["terminate"] = msg(b"X", b"")          # refused by the whitelist
    requests["flush"] = FE_FLUSH
    requests["function_call"] = msg(b"F", struct.pack(">I", 1598) + b"\0\0\0\0\0\1")   # refused
    for name, data in requests.items():
        write("fuzz_pg_request", "fe_" + name, split_prefix(data, 0.5))


# ----------------------------------------------------------------- Redis

def resp_cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def resp_parse(buf, pos):
    """Return the end of one complete RESP2/RESP3 value at pos, or None."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return None
    t, line = buf[pos:pos + 1], buf[pos + 1:nl]
    pos = nl + 2
    if t in b"+-:,#_(":
        return pos
    n = int(line)
    if t in b"$!=":
        if n < 0:
            return pos
        return pos + n + 2 if len(buf) >= pos + n + 2 else None
    if n < 0:
        return pos
    count = n * 2 if t in b"%|" else n
    for _ in range(count):
        pos = resp_parse(buf, pos)
        if pos is None:
            return None
    if t == b"|":                   # an attribute is followed by the real value
        return resp_parse(buf, pos)
    return pos


def redis_read(s, nreplies):
    buf = b""
    while True:
        pos, got = 0, 0
        while got < nreplies:
            e = resp_parse(buf, pos)
            if e is None:
                break
            pos, got = e, got + 1
        if got == nreplies:
            return buf[:pos]
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("redis closed the connection")
        buf += chunk


def redis_corpus(port):
    s = socket.create_connection(("127.0.0.1", port))
    s2 = socket.create_connection(("127.0.0.1", port))
    reqs, reps = {}, {}

    def run(name, cmds, nreplies=None, sock=s):
        req = b"".join(resp_cmd(*c) for c in cmds)
        reqs[name] = req
        sock.sendall(req)
        reps[name] = redis_read(sock, nreplies if nreplies is not None else len(cmds))

    run("ping", [("PING",)])
    run("set_get", [("SET", "k", "v"), ("GET", "k"), ("GET", "missing")])
    run("incr", [("INCR", "n"), ("INCRBY", "n", "-5")])
    run("error", [("NOSUCHCOMMAND", "x")])
    run("wrongtype", [("LPUSH", "l", "a", "b", "c"), ("GET", "l")])
    run("lrange", [("LRANGE", "l", "0", "-1"), ("LRANGE", "nolist", "0", "-1")])
    run("hash2", [("HSET", "h", "f1", "v1", "f2", "v2"), ("HGETALL", "h")])
    run("nested", [("EVAL", "return {1, {2, {3, 'x', {}}}, redis.call('ping')}", "0")])
    run("mget", [("MGET", "k", "missing", "n")])
    big = "B" * 70000
    run("bigvalue", [("SET", "big", big), ("GET", "big")])
    run("multi_exec", [("MULTI",), ("SET", "a", "1"), ("INCR", "a"), ("EXEC",)])
    run("subscribe2", [("SUBSCRIBE", "c1", "c2")], 2)
    s2.sendall(resp_cmd("PUBLISH", "c1", "hello"))
    redis_read(s2, 1)
    reps["sub_message"] = redis_read(s, 1)
    run("unsubscribe2", [("UNSUBSCRIBE", "c1", "c2")], 2)
    run("client_reply", [("CLIENT", "REPLY", "SKIP"), ("PING",), ("CLIENT", "REPLY", "ON"), ("PING",)], 2)
    # RESP3
    run("hello3", [("HELLO", "3")])
    run("map", [("HGETALL", "h")])
    run("set3", [("SADD", "s", "a", "b"), ("SMEMBERS", "s")])
    for t in ("string", "integer", "double", "bignum", "null", "array", "set", "map", "attrib",
              "push", "verbatim", "true", "false"):
        # "push" sends an out-of-band push, then the real (bulk) reply
        run("debug_" + t, [("DEBUG", "PROTOCOL", t)], 2 if t == "push" else 1)
    run("resp3_subscribe", [("SUBSCRIBE", "c3")], 1)
    s2.sendall(resp_cmd("PUBLISH", "c3", "pushed"))
    redis_read(s2, 1)
    reps["resp3_push_message"] = redis_read(s, 1)
    run("resp3_unsubscribe", [("UNSUBSCRIBE", "c3")], 1)
    run("tracking", [("CLIENT", "TRACKING", "on"), ("GET", "k")])
    s2.sendall(resp_cmd("SET", "k", "changed"))
    redis_read(s2, 1)
    reps["tracking_invalidate_push"] = redis_read(s, 1)
    s.close()
    s2.close()

    # Synthetic RESP3 the server does not produce on demand.
    reps["blob_error"] = b"!21\r\nSYNTAX invalid syntax\r\n"
    reps["streamed_like_nested"] = b"*3\r\n%1\r\n+k\r\n~2\r\n:1\r\n:2\r\n>2\r\n+p\r\n$1\r\nx\r\n_\r\n"
    reps["attr_then_reply"] = b"|1\r\n+ttl\r\n:3600\r\n*2\r\n:1\r\n:2\r\n"
    reps["big_bulk_header"] = b"$536870912\r\n" + b"x" * 64
    reps["deep"] = b"*1\r\n" * 63 + b":1\r\n"
    reqs["monitor"] = resp_cmd("MONITOR")                  # refused
    reqs["subscribe_many"] = resp_cmd("SUBSCRIBE", "a", "b", "c") + resp_cmd("PING")
    reqs["unsubscribe_all"] = resp_cmd("UNSUBSCRIBE")      # refused: count unknowable
    reqs["client_reply_off"] = resp_cmd("CLIENT", "REPLY", "OFF") + resp_cmd("SET", "a", "b") + \
        resp_cmd("CLIENT", "REPLY", "ON")
    reqs["binary_arg"] = resp_cmd("SET", b"k\r\n\0", b"\xff\x00\r\n")
    reqs["inline_cmd"] = b"PING\r\n"                       # refused: not an array
    for name, data in reqs.items():
        write("fuzz_resp", "req_" + name, split_prefix(data, 0.5))
    for name, data in reps.items():
        write("fuzz_resp", "rep_" + name, split_prefix(data, 0.41))


# ---------------------------------------------------------------- config

CONF_FULL = """\
; a full poolbroker.conf (every key)
[broker]
socket = /run/poolbroker/poolbroker.sock
socket_mode = 0660
shm_name = /poolbroker
shm_mode = 0600
allowed_uids = 33, 1000
allowed_gids = 33
log_level = info             ; debug | info | warn | error
log_target = stderr
shutdown_timeout_ms = 30000
metrics_listen = 127.0.0.1:9187
io_backend = auto
max_clients = 1024

[pool main]
type = postgres
conninfo = host=/var/run/postgresql dbname=app user=app password=a;b
min_size = 2
max_size = 20
acquire_timeout_ms = 5000
command_timeout_ms = 30000
max_lifetime_s = 3600
idle_timeout_s = 300
max_uses = 50000
validate_after_idle_ms = 30000
reset = discard_all
leak_threshold_ms = 10000
max_lease_ms = 60000
request_buffer = 64k
reply_buffer = 256k

[pool reports]
type = postgres
conninfo = postgresql://app:secret@db.example:5432/app?sslmode=disable
reset = SELECT pg_advisory_unlock_all(); RESET ALL
max_size = 4
reply_buffer = 1m

[pool cache]
type = redis
host = 127.0.0.1
port = 6379
password_file = /tmp/poolbroker-fuzz-conf.pw
user = default
db = 3
min_size = 1
max_size = 8

[pool sessions]
type = redis
unix_socket = /run/redis/redis.sock
max_size = 2
request_buffer = 1k
reply_buffer = 4k
"""

CONF_MIN = """\
[pool main]
type = postgres
conninfo = dbname=app
"""

CONF_ERRORS = [
    "[broker]\nsocket_mode = 0999\n",
    "[pool x]\ntype = redis\nconninfo = dbname=a\n",
    "[pool main]\ntype = postgres\nconninfo = host=x password=VerySecret\nmin_size = 30\nmax_size = 2\n",
    "[pool a]\ntype = postgres\nconninfo = x\n[pool a]\ntype = postgres\nconninfo = y\n",
    "[broker]\nshm_name = nope\nallowed_uids = root, nobody, 99999999999\n",
    "[pool r]\ntype = redis\npassword_file = relative/nowhere\n",
    "key = value outside a section\n",
    "[pool bad name!]\n",
    "[broker]\nmetrics_listen = [::1]:99999\nmax_clients = 0\n",
    "[pool p]\ntype = postgres\nconninfo = a\nrequest_buffer = 64g\nreply_buffer = 3000\n",
]


def conf_corpus():
    write("fuzz_conf", "full.conf", CONF_FULL.encode())
    write("fuzz_conf", "min.conf", CONF_MIN.encode())
    write("fuzz_conf", "crlf.conf", CONF_MIN.replace("\n", "\r\n").encode())
    for i, t in enumerate(CONF_ERRORS):
        write("fuzz_conf", "err%02d.conf" % i, t.encode())


# ------------------------------------------------------------------- shm

def shm_corpus():
    # [u16 cap][u32 seed][u8 density] then ops (see fuzz_shm.c):
    # 0 take(state u8, owner u24)  1 put(u16)  2 repair  3 slot word(u16, u64)
    # 4 map word(u8, u64)  5 hist(u64, u8)  6 macros(u64, u64)  7 release(u16)
    def hdr(cap, seed, density):
        raw = cap - 1 if cap <= 130 else 0x8000 | (cap - 1)   # see fuzz_shm.c
        return struct.pack(">HIB", raw, seed, density)
    take_leased = bytes([0, 3, 0, 0, 1])
    take_resetting = bytes([0, 5, 0, 0, 0])
    write("fuzz_shm", "take_all8", hdr(8, 1, 255) + take_leased * 9 + bytes([2]) + take_resetting * 2)
    write("fuzz_shm", "release_repair", hdr(64, 7, 0) + bytes([2]) + take_leased * 3 +
          b"".join(bytes([7, 0, i]) for i in range(10)) + bytes([2]) + take_leased * 2)
    write("fuzz_shm", "bits_past_cap", hdr(100, 3, 255) + take_leased * 120 + bytes([1, 0, 99, 2]))
    write("fuzz_shm", "scribble", hdr(4096, 9, 128) + bytes([3, 0, 5]) + struct.pack(">Q", 0x02FFFFFFFFFFFFFF) +
          bytes([4, 63]) + struct.pack(">Q", 0xFFFFFFFFFFFFFFFF) + take_leased * 4 + bytes([2]))
    write("fuzz_shm", "macros_hist", hdr(1, 0, 0) + bytes([6]) + struct.pack(">QQ", 0x0123456789ABCDEF, 2**64 - 1) +
          b"".join(bytes([5]) + struct.pack(">QB", v, 0) for v in (0, 15, 16, 17, 262143, 262144, 2**63, 2**64 - 1)))
    rng = random.Random(1234)
    for i in range(4):
        n = rng.choice([64, 256, 1024])
        write("fuzz_shm", "random%d" % i, bytes(rng.getrandbits(8) for _ in range(n)))


# ---------------------------------------------------------------- attach

ATTACH_PROBE = r'''
#include <stdio.h>
#include "pb_shm.h"
int main(void)
{
    printf("%zu %zu %zu %zu\n", sizeof(pb_shm_header), sizeof(pb_shm_pool), sizeof(pb_shm_client),
           sizeof(pb_shm_slot));
    return 0;
}
'''


def layout_sizes():
    # The segment seed needs the struct sizes of this build: ask the compiler.
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "probe.c"), os.path.join(d, "probe")
        with open(src, "w") as f:
            f.write(ATTACH_PROBE)
        subprocess.run(["cc", "-std=c11", "-I", os.path.join(HERE, "..", "..", "include"), src, "-o", exe],
                       check=True)
        return [int(x) for x in subprocess.run([exe], check=True, capture_output=True, text=True).stdout.split()]


def attach_corpus():
    # Byte 0: mode (bits 0-1: 0 broker, 1 answer, 2 layout) | flags << 2, the
    # flags stamping this build's magic (1), version (2), fingerprint (4) in
    # place, so the seeds survive a layout change; 8: answer with n = -1;
    # 16: shm_size = the furthest thing the layout claims + a signed byte;
    # 32: layout offsets are deltas from the packed layout (0 = valid, every
    # boundary exact, whatever the struct sizes).
    def mode(m, flags):
        return bytes([m | flags << 2])
    STAMP, RECV_FAIL, AT_END, REL = 7, 8, 16, 32
    A_MAGIC = 0x50424154
    MAX_CLIENTS = (1 << 12) - 1
    uid = 1000
    # broker: [nuids][ngids][euid][uid][gid] uids gids, then the request
    creds = struct.pack("<BBIII", 0, 0, uid, uid, uid)
    req = struct.pack("<IIIi", A_MAGIC, 0, 0, 4242)
    write("fuzz_attach", "req_valid", mode(0, STAMP) + creds + req)
    write("fuzz_attach", "req_lists", mode(0, STAMP) + struct.pack("<BBIII", 2, 1, 0, 1001, 50) +
          struct.pack("<III", 7, 1001, 50) + req)
    write("fuzz_attach", "req_bad_magic", mode(0, 6) + creds + struct.pack("<IIIi", 0x54414250, 0, 0, 1))
    write("fuzz_attach", "req_short", mode(0, STAMP) + creds + req[:12])
    write("fuzz_attach", "req_other_layout", mode(0, 1) + creds + struct.pack("<IIIi", A_MAGIC, 2, 0x12345678, 1))
    write("fuzz_attach", "req_refused", mode(0, STAMP) + struct.pack("<BBIII", 0, 0, 0, uid, uid) + req)

    # The layout as broker/shm.c's shm_create() computes it: tables on cache
    # lines in the order pools (room for 64), clients, slots; buffers from
    # the next page.  Struct sizes of this build from a compiler probe.
    hdr_size, pool_size, client_size, slot_size = layout_sizes()
    def up(x, a):
        return (x + a - 1) // a * a
    def shm_layout(max_clients, nslots, buf_per_slot=4096 + 4096):
        pool_off = up(hdr_size, 64)
        client_off = pool_off + up(64 * pool_size, 64)
        slot_off = client_off + up(max_clients * client_size, 64)
        buf_off = up(slot_off + up(nslots * slot_size, 64), 4096)
        total = up(buf_off + nslots * buf_per_slot, 4096)
        return [pool_off, client_off, slot_off, buf_off, max_clients, nslots], total
    def pack_layout(L):
        return struct.pack("<QQQQII", *L)
    M64 = (1 << 64) - 1
    def neg(x):                     # a negative delta, mod 2^64
        return -x & M64

    # answer: pb_attach_resp (header fields, then the layout)
    def resp(status, client_id=(1 << 12) | 1, size=0, L=(0, 0, 0, 0, 0, 0), version=0, finger=0):
        return struct.pack("<IiIIIIQ", A_MAGIC, status, version, finger, client_id, 3, size) + pack_layout(L)
    L, total = shm_layout(2, 4)
    ok = resp(0, size=total, L=L)
    write("fuzz_attach", "resp_valid", mode(1, STAMP) + ok)
    # Packed, shm_size exactly at buf_off: every boundary exact, still valid.
    write("fuzz_attach", "resp_valid_packed", mode(1, STAMP | REL | AT_END) + resp(0, L=(0, 0, 0, 0, 3, 5),
                                                                                client_id=(1 << 12) | 3))
    write("fuzz_attach", "resp_big_segment", mode(1, STAMP) + resp(0, size=1 << 40, L=L))
    write("fuzz_attach", "resp_max_clients", mode(1, STAMP | REL | AT_END) +
          resp(0, client_id=(9 << 12) | MAX_CLIENTS, L=(0, 0, 0, 0, MAX_CLIENTS, 1)))
    write("fuzz_attach", "resp_too_many_clients", mode(1, STAMP | REL | AT_END) +
          resp(0, client_id=(9 << 12) | 1, L=(0, 0, 0, 0, MAX_CLIENTS + 1, 1)))
    write("fuzz_attach", "resp_misaligned", mode(1, STAMP) + resp(0, size=total, L=[L[0] + 8] + L[1:]))
    write("fuzz_attach", "resp_eperm", mode(1, STAMP) + resp(-13))
    write("fuzz_attach", "resp_bad_status", mode(1, STAMP) + resp(7))
    # A version 1 broker: 32 bytes, no layout: PB_EVERSION, or its refusal.
    write("fuzz_attach", "resp_v1", mode(1, 1) + resp(0, size=total, version=1, finger=0x12345678)[:32])
    write("fuzz_attach", "resp_v1_eperm", mode(1, 1) + resp(-13, version=1, finger=0x12345678)[:32])
    write("fuzz_attach", "resp_other_fingerprint", mode(1, 1 | 2) + resp(0, size=total, L=L, finger=0x12345678))
    # Lengths around the checks: up to the fingerprint (a refusal is read,
    # PB_OK is not), one byte less, one byte short of the whole answer.
    write("fuzz_attach", "resp_eperm_16", mode(1, STAMP) + resp(-13)[:16])
    write("fuzz_attach", "resp_eperm_15", mode(1, STAMP) + resp(-13)[:15])
    write("fuzz_attach", "resp_short", mode(1, STAMP) + ok[:20])
    write("fuzz_attach", "resp_one_short", mode(1, STAMP) + ok[:-1])
    write("fuzz_attach", "resp_recv_fail", mode(1, STAMP | RECV_FAIL) + ok)
    write("fuzz_attach", "resp_bad_magic", mode(1, 6) + b"HTTP/1.1 400 Bad Request\r\n\r\n".ljust(32, b"\0"))

    # layout: [u32 size][u32 client_id] then the pb_shm_layout
    def lay(name, flags, size, client_id, L):
        write("fuzz_attach", "lay_" + name, mode(2, flags) + struct.pack("<II", size, client_id) + pack_layout(L))
    L, total = shm_layout(2, 4)
    P, C, S, B = L[:4]
    lay("valid", 0, total, (1 << 12) | 2, L)
    # As many clients as fit in the 1 MiB the target builds; we are the last.
    Lm, _ = shm_layout(300, 200)
    lay("many_clients", 0, Lm[3] + 64 * 1024, (7 << 12) | 300, Lm)
    lay("misaligned", 0, total, 1, [P, C, S + 32, B] + L[4:])
    lay("overlap", 0, total, 1, [P, C, C, B] + L[4:])              # slots over clients
    lay("header_overlap", 0, total, 1, [P - 64, C, S, B] + L[4:])  # pools over the header
    lay("past_buf", 0, total, 1, [P, C, S, S + 64] + L[4:])        # slot table past buf_off
    lay("buf_past_size", 0, B - 1, 1, L)
    lay("bad_client", 0, total, (5 << 12) | 3, L)                  # index 2 of 2
    lay("client_index0", 0, total, 5 << 12, L)
    lay("wrap", 0, total, 1, [P, neg(64), S, B] + L[4:])          # off + size wraps below buf_off
    # shm_size at buf_off (flag 16, delta 0), then one byte short.
    Le, _ = shm_layout(3, 5)
    lay("exact_end", AT_END, 0, (1 << 12) | 3, Le)
    lay("one_short", AT_END, 0xFF, (1 << 12) | 3, Le)
    # Packed (flag 32): valid with every boundary exact; then each table one
    # cache line into the one before, and the slot table one byte past buf_off.
    lay("packed", REL | AT_END, 0, (1 << 12) | 3, [0, 0, 0, 0, 3, 5])
    lay("packed_pool_header", REL | AT_END, 0, (1 << 12) | 3, [neg(64), 0, 0, 0, 3, 5])
    lay("packed_overlap", REL | AT_END, 0, (1 << 12) | 3, [0, neg(64), 0, 0, 3, 5])
    lay("packed_slot_overlap", REL | AT_END, 0, (1 << 12) | 3, [0, 0, neg(64), 0, 3, 5])
    lay("packed_slot_past_buf", REL | AT_END, 0, (1 << 12) | 3, [0, 0, 0, neg(1), 3, 5])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg-sock")
    ap.add_argument("--pg-port", type=int)
    ap.add_argument("--redis-port", type=int)
    a = ap.parse_args()
    conf_corpus()
    shm_corpus()
    attach_corpus()
    if a.pg_sock and a.pg_port:
        pg_corpus(a.pg_sock, a.pg_port)
    else:
        print("mkcorpus: no --pg-sock/--pg-port: PostgreSQL seeds not regenerated", file=sys.stderr)
    if a.redis_port:
        redis_corpus(a.redis_port)
    else:
        print("mkcorpus: no --redis-port: Redis seeds not regenerated", file=sys.stderr)


if __name__ == "__main__":
    main()
