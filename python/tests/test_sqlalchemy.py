"""The SQLAlchemy 1.4 dialect postgresql+poolbroker: Core and ORM."""
import datetime as dt
import decimal
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.pool import NullPool

import poolbroker
import poolbroker.sqlalchemy  # noqa: F401  (registers the dialect for the in-place build)

Base = orm.declarative_base()


class User(Base):
    __tablename__ = "users"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.String(50), nullable=False, unique=True)
    balance = sa.Column(sa.Numeric(10, 2), default=0)
    ratio = sa.Column(sa.Float)
    created = sa.Column(sa.DateTime(timezone=True), server_default=sa.func.now())
    tags = sa.Column(pg.ARRAY(sa.String))
    doc = sa.Column(pg.JSONB)
    token = sa.Column(pg.UUID(as_uuid=True))
    token_s = sa.Column(pg.UUID(as_uuid=False))
    addresses = orm.relationship("Address", back_populates="user", cascade="all, delete-orphan")


class Address(Base):
    __tablename__ = "addresses"
    id = sa.Column(sa.Integer, primary_key=True)
    user_id = sa.Column(sa.ForeignKey("users.id"), nullable=False)
    email = sa.Column(sa.String, nullable=False)
    user = orm.relationship("User", back_populates="addresses")


@pytest.fixture(scope="module")
def engine(env):
    e = sa.create_engine(f"postgresql+poolbroker:///?pool=main&socket={env.socket}", poolclass=NullPool,
                         future=True)
    Base.metadata.create_all(e)
    yield e
    e.dispose()


def test_dialect_resolves(engine):
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "poolbroker"
    assert engine.dialect.server_version_info >= (11,)
    assert isinstance(engine.dialect, poolbroker.sqlalchemy.PGDialect_poolbroker)


def test_url_arguments_are_checked(env):
    with pytest.raises(sa.exc.ArgumentError, match="take no host"):
        sa.create_engine("postgresql+poolbroker://somehost/?pool=main").connect()
    with pytest.raises(sa.exc.ArgumentError, match="unknown postgresql\\+poolbroker URL argument"):
        sa.create_engine("postgresql+poolbroker:///?pool=main&sslmode=x").connect()


def test_orm_insert_select_rollback(engine, env):
    tok = uuid.uuid4()
    with orm.Session(engine) as s:
        u = User(name="ann", balance=decimal.Decimal("12.50"), ratio=0.25, tags=["a", "b"],
                 doc={"k": [1, 2]}, token=tok, token_s=str(tok))
        u.addresses.append(Address(email="ann@example.org"))
        s.add(u)
        s.commit()
        assert u.id is not None
    assert env.leased("main") == 0                      # the session's commit returned the lease
    with orm.Session(engine) as s:
        got = s.execute(sa.select(User).where(User.name == "ann")).scalar_one()
        assert got.balance == decimal.Decimal("12.50") and got.ratio == 0.25
        assert got.tags == ["a", "b"] and got.doc == {"k": [1, 2]}
        assert got.token == tok and got.token_s == str(tok)
        assert isinstance(got.created, dt.datetime) and got.created.tzinfo is not None
        assert [a.email for a in got.addresses] == ["ann@example.org"]
        # Rollback: nothing of it reaches the database.
        s.add(User(name="bob"))
        s.flush()
        assert s.execute(sa.select(sa.func.count(User.id))).scalar() == 2
        s.rollback()
        assert s.execute(sa.select(sa.func.count(User.id))).scalar() == 1
    assert env.psql("SELECT count(*) FROM users") == "1"
    # A unique violation surfaces as SQLAlchemy's IntegrityError wrapping ours.
    with orm.Session(engine) as s:
        s.add(User(name="ann"))
        with pytest.raises(sa.exc.IntegrityError) as ei:
            s.commit()
        assert isinstance(ei.value.orig, poolbroker.IntegrityError) and ei.value.orig.sqlstate == "23505"
    assert env.leased("main") == 0


def test_core_executemany_and_isolation(engine, env):
    with engine.begin() as c:
        c.execute(sa.insert(User), [{"name": f"u{i}", "ratio": i / 2} for i in range(100)])
        assert c.execute(sa.text("SELECT count(*) FROM users WHERE name LIKE 'u%%'")).scalar() == 100
    with engine.connect().execution_options(isolation_level="SERIALIZABLE") as c:
        assert c.execute(sa.text("SHOW transaction_isolation")).scalar() == "serializable"
        c.rollback()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text("CREATE TABLE sa_auto (a int)"))
    assert env.psql("SELECT count(*) FROM sa_auto") == "0"
    with engine.connect() as c:
        r = c.execute(sa.text("SELECT :a + 1, :b"), {"a": 41, "b": "x%y"}).one()
        assert tuple(r) == (42, "x%y")
    assert env.leased("main") == 0
