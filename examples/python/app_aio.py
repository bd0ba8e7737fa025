"""GET /q of app.py on poolbroker.aio: the asyncio port of an asyncpg app.

The same endpoint as app_asyncpg.py's pool mode, with asyncpg's pool
replaced by poolbroker.aio.create_pool (the broker is the pool: a
Connection leases at its statement and gives the lease back after it).
python/bench/run compares it with app.py (blocking calls in FastAPI's
thread pool) and with asyncpg.

Environment: POOLBROKER_SOCKET (broker socket), PB_PG_POOL (default "main").
"""
import os

from fastapi import FastAPI

import poolbroker.aio

PG_POOL = os.environ.get("PB_PG_POOL", "main")
app = FastAPI(title="poolbroker.aio example")
pool = None


@app.on_event("startup")
async def startup():
    global pool
    pool = await poolbroker.aio.create_pool(pool=PG_POOL)


@app.get("/q")
async def q():
    async with pool.acquire() as conn:
        return {"v": await conn.fetchval("SELECT 1")}
