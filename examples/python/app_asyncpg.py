"""The same GET /q as app.py, the way teams build it without poolbroker:
asyncpg with a pool per worker process (PB_APP_MODE=pool; asyncpg's default
size, 10 connections opened at start, PB_ASYNCPG_MAX) or asyncpg.connect per
request (PB_APP_MODE=connect).  The baseline python/bench/run compares app.py with.

Environment: PB_PG_DSN (a libpq URI, e.g. postgresql://postgres@/postgres?host=/tmp&port=5432),
PB_APP_MODE (pool | connect), PB_ASYNCPG_MAX (pool max_size, default 10).
"""
import os

import asyncpg
from fastapi import FastAPI

DSN = os.environ["PB_PG_DSN"]
MODE = os.environ.get("PB_APP_MODE", "pool")
app = FastAPI(title="asyncpg baseline")
pool = None


@app.on_event("startup")
async def startup():
    global pool
    if MODE == "pool":
        n = int(os.environ.get("PB_ASYNCPG_MAX", "10"))
        pool = await asyncpg.create_pool(DSN, min_size=n, max_size=n)     # asyncpg's defaults: 10 and 10


@app.get("/q")
async def q():
    if MODE == "pool":
        async with pool.acquire() as conn:
            return {"v": await conn.fetchval("SELECT 1")}
    conn = await asyncpg.connect(DSN)
    try:
        return {"v": await conn.fetchval("SELECT 1")}
    finally:
        await conn.close()
