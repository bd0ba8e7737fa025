"""Build the poolbroker package (python/) against libpoolbroker.

The extension links the static libpoolbroker.a (its objects are built with
-fPIC, build/pic/) and libshmview_pic.a (common/shmview*.c, the shmstat
reader, for poolbroker.stats()), so the installed module needs no libpoolbroker.so at
run time, only libhiredis.  Both come from the repository's Makefile: this
script runs `make` in the parent directory when they are missing, so
`pip install ./python` works from a source tree.

POOLBROKER_BUILD=<dir> picks another build directory (default ../build).
"""
import os
import subprocess

from setuptools import Extension, setup

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
build = os.environ.get("POOLBROKER_BUILD") or os.path.join(root, "build")
liba = os.path.join(build, "libpoolbroker.a")
shmview_o = os.path.join(build, "libshmview_pic.a")

if not (os.path.exists(liba) and os.path.exists(shmview_o)):
    if not os.path.exists(os.path.join(root, "Makefile")):
        raise SystemExit(f"setup.py: {liba} is missing and there is no poolbroker source tree at {root}")
    subprocess.check_call(["make", "-C", root, "BUILD=" + os.path.relpath(build, root),
                           os.path.relpath(liba, root), os.path.relpath(shmview_o, root)])

ext = Extension(
    "poolbroker._poolbroker",
    sources=[os.path.join("src", "_poolbroker.c")],
    include_dirs=[os.path.join(root, "include"), os.path.join(root, "common")],
    extra_objects=[liba, shmview_o],
    libraries=["hiredis"],
    extra_compile_args=["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror",
                        "-Wno-missing-field-initializers", "-fvisibility=hidden"],
    # Keep libpoolbroker's pb_* symbols private to the extension.
    extra_link_args=["-Wl,--exclude-libs,ALL", "-pthread"],
    depends=[liba, shmview_o, os.path.join(root, "include", "poolbroker.h")],
)

setup(
    name="poolbroker",
    version="0.1.0",
    description="PostgreSQL (DB-API 2.0) and Redis (redis-py style) through the poolbroker broker",
    long_description=open(os.path.join(here, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=["poolbroker"],
    ext_modules=[ext],
    python_requires=">=3.9",
    entry_points={
        "sqlalchemy.dialects": [
            "postgresql.poolbroker = poolbroker.sqlalchemy:PGDialect_poolbroker",
            "poolbroker = poolbroker.sqlalchemy:PGDialect_poolbroker",
        ],
    },
)
