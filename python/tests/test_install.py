"""`pip install ./python` into a venv, offline, on Debian's python3 (the
command docs/python.md gives), then the installed package — outside the
source tree, without PYTHONPATH — talks to a real broker, and SQLAlchemy
finds the dialect through the installed entry point."""
import os
import subprocess
import textwrap

from conftest import SRCDIR

SCRIPT = textwrap.dedent("""
    import sys, poolbroker
    assert "site-packages" in poolbroker.__file__, poolbroker.__file__
    c = poolbroker.connect("main", socket=sys.argv[1])
    cur = c.cursor()
    cur.execute("SELECT %s + 1", (41,))
    assert cur.fetchone() == (42,)
    c.close()
    assert poolbroker.Redis(socket=sys.argv[1]).ping() is True
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool
    e = sa.create_engine("postgresql+poolbroker:///?pool=main&socket=" + sys.argv[1], poolclass=NullPool)
    with e.connect() as conn:
        assert conn.execute(sa.text("SELECT 7")).scalar() == 7
    assert "poolbroker.sqlalchemy" in sys.modules     # loaded by the entry point
    print("installed ok")
""")


def test_pip_install_offline_in_a_venv(env, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True,
                   timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-build-isolation", "--no-index",
                          os.path.join(SRCDIR, "python")], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env_vars = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "POOLBROKER_SOCKET")}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, env.socket], cwd=str(tmp_path),
                         env=env_vars, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "installed ok", out.stdout + out.stderr
