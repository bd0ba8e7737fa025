"""A FastAPI app under gunicorn (prefork, uvicorn workers) using PostgreSQL
and Redis through poolbroker: the shape of the applications poolbroker is
for.  Run it as examples/python/README.md says.

Every worker process shares the broker's pools: no per-worker pool, no
connection opened per request, nothing held between requests.

Endpoints
  POST /hit     INCR the Redis counter "hits" and INSERT a row into the
                PostgreSQL table hits in one transaction; returns
                {"hit": <the INCR value>, "pid": <worker pid>}
  GET  /count   {"rows": <rows in hits>, "redis": <the counter>}
  GET  /q       {"v": 1}: one `SELECT 1` (what python/bench/run measures)
  GET  /health  200 {"status": "ok", ...} or 503 {"status": "degraded", ...}:
                the broker's pools from poolbroker.stats() (shared memory,
                no query sent)

Configuration (environment): POOLBROKER_SOCKET (broker socket),
POOLBROKER_SHM (its shm_name), PB_PG_POOL (default "main"), PB_REDIS_POOL
(default "cache").

The endpoints are plain `def`: poolbroker's calls block, so FastAPI runs
them in its thread pool (each thread gets its own attachment to the broker)
instead of on the event loop.
"""
import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse

import poolbroker

PG_POOL = os.environ.get("PB_PG_POOL", "main")
REDIS_POOL = os.environ.get("PB_REDIS_POOL", "cache")

redis = poolbroker.Redis(pool=REDIS_POOL)


def _create_schema():
    # With gunicorn --preload this runs once, in the master, before the
    # workers fork (and the master's attachment is re-made in each worker).
    conn = poolbroker.connect(pool=PG_POOL)
    try:
        with conn:
            conn.cursor().execute("CREATE TABLE IF NOT EXISTS hits (id bigserial PRIMARY KEY, "
                                  "n bigint NOT NULL, pid int NOT NULL, at timestamptz DEFAULT now())")
    except poolbroker.IntegrityError:
        pass      # another process created it at the same moment (no --preload)
    finally:
        conn.close()


_create_schema()
app = FastAPI(title="poolbroker example")


@app.post("/hit")
def hit():
    n = redis.incr("hits")
    conn = poolbroker.connect(pool=PG_POOL)
    with conn:                                   # commit, and the lease goes back
        conn.cursor().execute("INSERT INTO hits (n, pid) VALUES (%s, %s)", (n, os.getpid()))
    return {"hit": n, "pid": os.getpid()}


@app.get("/count")
def count():
    conn = poolbroker.connect(pool=PG_POOL, autocommit=True)
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM hits")
    rows = cur.fetchone()[0]
    return {"rows": rows, "redis": int(redis.get("hits") or 0)}


@app.get("/q")
def q():
    conn = poolbroker.connect(pool=PG_POOL, autocommit=True)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    return {"v": cur.fetchone()[0]}


@app.get("/health")
def health():
    try:
        s = poolbroker.stats()
    except OSError as e:
        return JSONResponse({"status": "down", "reason": str(e)}, status_code=503)
    keep = ("name", "type", "health", "size", "max_size", "free", "leased", "waiting", "timeouts", "last_error")
    pools = [{k: p.get(k) for k in keep} for p in s["pools"] if p["health"] != "removed"]
    ok = s["broker"].get("alive") and all(p["health"] == "healthy" for p in pools)
    body = {"status": "ok" if ok else "degraded", "broker": s["broker"], "pools": pools}
    return JSONResponse(body, status_code=200 if ok else 503)
