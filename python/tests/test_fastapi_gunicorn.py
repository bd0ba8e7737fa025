"""examples/python/app.py under gunicorn --preload with 8 uvicorn workers
(prefork): N concurrent requests that each INCR in Redis and INSERT in
PostgreSQL through poolbroker give exactly N of each."""
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import SRCDIR

N = 200


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def server(env):
    port = free_port()
    e = dict(os.environ, POOLBROKER_SOCKET=env.socket, POOLBROKER_SHM=env.shm_name,
             PYTHONPATH=os.path.join(SRCDIR, "python"))
    log = open(os.path.join(env.dir, "gunicorn.log"), "w")
    p = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", "8", "-k", "uvicorn.workers.UvicornWorker",
         "-b", f"127.0.0.1:{port}", "--chdir", os.path.join(SRCDIR, "examples", "python"), "app:app"],
        env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            with open(log.name) as f:
                pytest.fail("gunicorn did not come up:\n" + f.read()[-3000:])
        time.sleep(0.2)
    yield url, p
    p.send_signal(signal.SIGQUIT)      # quick shutdown (SIGTERM waits for graceful_timeout)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    log.close()


def test_exact_totals_under_8_workers(env, server):
    url, proc = server

    def hit(_):
        with httpx.Client(timeout=30) as c:
            r = c.post(url + "/hit")
            r.raise_for_status()
            return r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(hit, range(N)))
    assert sorted(r["hit"] for r in results) == list(range(1, N + 1))     # every INCR exactly once
    assert len({r["pid"] for r in results}) >= 2                          # served by several workers
    assert httpx.get(url + "/count").json() == {"rows": N, "redis": N}
    assert env.psql("SELECT count(*), count(DISTINCT n), min(n), max(n) FROM hits") == f"{N}|{N}|1|{N}"
    # Eight workers, and the backend connections stay within the pool's max_size (4).
    assert int(env.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbpytest'")) <= 4


def test_health_reports_pools(env, server):
    url, _ = server
    r = httpx.get(url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["broker"]["pid"] == env.broker.pid
    assert {p["name"]: p["health"] for p in body["pools"]} == {"main": "healthy", "tiny": "healthy",
                                                                "cache": "healthy"}
    assert all(p["leased"] == 0 for p in body["pools"])
