"""Fixtures: real PostgreSQL, real Redis and a real broker per test module.

Each test module gets a temp dir (/tmp/pbpytest.XXXXXX) with its own
PostgreSQL (tools/pg-start: initdb -A trust, free port, run as `postgres`
when we are root), its own redis-server (tools/redis-start) and its own
broker (the build's poolbroker binary, config written here, own socket and
shm name), all stopped at the end of the module; the broker's log must then
hold no sanitizer report and the broker must exit 0 on SIGTERM.  Nothing is
mocked and nothing is shared between modules.

Environment (set by `make python-test`; defaults suit a plain `make`):
  PB_SRCDIR   repository root (default: two levels up from this file)
  PB_BUILD    build directory holding poolbroker and shmstat (default $PB_SRCDIR/build)
  PB_KEEP_TMP keep the temp dir and print its path
  PB_IO_BACKEND  io_uring or epoll: the broker's io_backend (as tests/harness.c)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

SRCDIR = os.environ.get("PB_SRCDIR") or os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
BUILD = os.environ.get("PB_BUILD") or os.path.join(SRCDIR, "build")
PYDIR = os.path.join(SRCDIR, "python")
if PYDIR not in sys.path:
    sys.path.insert(0, PYDIR)

POOLS = """
[pool main]
type = postgres
conninfo = host={pghost} port={pgport} user=postgres dbname=postgres sslmode=disable application_name=pbpytest
min_size = 1
max_size = 4
acquire_timeout_ms = 20000
command_timeout_ms = 20000

[pool tiny]
type = postgres
conninfo = host={pghost} port={pgport} user=postgres dbname=postgres sslmode=disable application_name=pbtiny
min_size = 0
max_size = 1
acquire_timeout_ms = 300
command_timeout_ms = 1000

[pool cache]
type = redis
host = 127.0.0.1
port = {redisport}
min_size = 1
max_size = 4
acquire_timeout_ms = 20000
"""


def _env_file(text):
    out = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


class Env:
    """One module's servers and broker.  Attributes: dir, pg (dict from
    pg-start: PGPORT, PGHOST, ...), redis_port, socket, shm_name, log."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pbpytest.", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.pg = None
        self.redis_port = None
        self.broker = None
        self.socket = os.path.join(self.dir, "pb.sock")
        self.shm_name = f"/pbpytest-{os.getpid()}-{os.path.basename(self.dir)[9:]}"
        self.log = os.path.join(self.dir, "broker.log")
        self.conf = os.path.join(self.dir, "poolbroker.conf")

    def start(self, pools=POOLS):
        out = subprocess.run([os.path.join(SRCDIR, "tools", "pg-start"), self.dir], check=True,
                             capture_output=True, text=True, timeout=120).stdout
        self.pg = _env_file(out)
        out = subprocess.run([os.path.join(SRCDIR, "tools", "redis-start"), self.dir], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        self.redis_port = int(_env_file(out)["REDIS_PORT"])
        io = os.environ.get("PB_IO_BACKEND")          # as tests/harness.c: one event-loop backend
        text = (f"[broker]\nsocket = {self.socket}\nshm_name = {self.shm_name}\nlog_level = info\n"
                + (f"io_backend = {io}\n" if io else "")
                + pools.format(pghost=self.pg["PGHOST"], pgport=self.pg["PGPORT"],
                               redisport=self.redis_port))
        with open(self.conf, "w") as f:
            f.write(text)
        os.chmod(self.conf, 0o600)
        self.start_broker()

    def start_broker(self):
        log = open(self.log, "a")
        log.write("==== pytest: starting\n")
        log.flush()
        start = log.tell()
        self.broker = subprocess.Popen([os.path.join(BUILD, "poolbroker"), "-c", self.conf],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(self.log) as f:
                f.seek(start)
                if "poolbroker ready" in f.read():
                    return
            if self.broker.poll() is not None:
                raise RuntimeError(f"broker exited with {self.broker.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        self.broker.kill()
        raise RuntimeError(f"broker not ready in 30 s:\n{self.log_tail()}")

    def log_tail(self, n=30):
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def psql(self, sql):
        """Run sql with psql directly against PostgreSQL (not through the broker)."""
        return subprocess.run(
            ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.pg["PGHOST"],
             "-p", self.pg["PGPORT"], "-U", "postgres", "-d", "postgres", "-c", sql],
            check=True, capture_output=True, text=True, timeout=60).stdout.strip()

    def shmstat(self):
        """build/shmstat --json on this broker's segment, as a dict."""
        out = subprocess.run([os.path.join(BUILD, "shmstat"), "-s", self.shm_name, "--json"],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        return json.loads(out)

    def leased(self, pool=None):
        """How many slots (of pool, or of all pools) are leased now, per shmstat."""
        return sum(1 for s in self.shmstat()["slots"]
                   if s.get("state") == "leased" and (pool is None or s.get("pool") == pool))

    def stop(self):
        problems = []
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                rc = self.broker.wait(30)
                if rc != 0:
                    problems.append(f"broker exited {rc} on SIGTERM")
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
                problems.append("broker did not stop within 30 s of SIGTERM")
        subprocess.run([os.path.join(SRCDIR, "tools", "redis-stop"), self.dir], capture_output=True,
                       timeout=60)
        subprocess.run([os.path.join(SRCDIR, "tools", "pg-stop"), self.dir], capture_output=True,
                       timeout=120)
        try:
            os.unlink("/dev/shm" + self.shm_name)
        except OSError:
            pass
        try:
            with open(self.log) as f:
                for line in f:
                    if any(s in line for s in ("ERROR: AddressSanitizer", "runtime error:",
                                               "ERROR: LeakSanitizer", "WARNING: ThreadSanitizer")):
                        problems.append("broker log: " + line.strip())
        except OSError:
            pass
        if os.environ.get("PB_KEEP_TMP"):
            print(f"\nkept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return problems


def pytest_collection_modifyitems(items):
    """Every `async def` test runs under pytest-asyncio (strict mode would
    otherwise skip one whose @pytest.mark.asyncio was forgotten, silently)."""
    import inspect
    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "function", None)) and not item.get_closest_marker("asyncio"):
            item.add_marker(pytest.mark.asyncio)


def env_for(pools=POOLS):
    """A module's Env on pools (a [pool] text, formatted as POOLS is),
    stopped and checked at the end: the body of a module-scoped env
    fixture (a module with pools of its own defines its own env with it)."""
    e = Env()
    try:
        e.start(pools)
    except BaseException:
        e.stop()
        raise
    yield e
    problems = e.stop()
    assert not problems, problems


@pytest.fixture(scope="module")
def env():
    yield from env_for()


@pytest.fixture
def conn(env):
    import poolbroker
    c = poolbroker.connect(pool="main", socket=env.socket)
    yield c
    c.close()


@pytest.fixture
def r(env):
    import poolbroker
    client = poolbroker.Redis(pool="cache", socket=env.socket)
    client.flushdb()
    return client
