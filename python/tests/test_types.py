"""Every type both ways (Python -> parameter -> column -> result -> Python),
and server errors with their SQLSTATE, message, detail and hint."""
import datetime as dt
import uuid
from decimal import Decimal

import pytest

import poolbroker

UTC = dt.timezone.utc
PLUS530 = dt.timezone(dt.timedelta(hours=5, minutes=30))

# (SQL type, value sent, value expected back); expected None means "same".
CASES = [
    ("int2", 32767, None), ("int2", -32768, None),
    ("int4", 2147483647, None), ("int8", -9223372036854775808, None), ("int8", 0, None),
    ("float4", 1.5, None), ("float8", 1e300, None), ("float8", -0.0, None),
    ("float8", float("inf"), None), ("float8", float("-inf"), None),
    ("numeric", Decimal("12345678901234567890.000000000001"), None), ("numeric", Decimal("-0.5"), None),
    ("numeric", 10 ** 30, Decimal(10 ** 30)), ("numeric", Decimal("NaN"), "nan"),
    ("bool", True, None), ("bool", False, None),
    ("text", "héllo wörld ✓ 'quote' \"dq\" \\ back", None), ("text", "", None),
    ("varchar(10)", "abc", None), ("char(3)", "ab", "ab "),
    ("bytea", b"\x00\x01\xff'\\", None), ("bytea", b"", None), ("bytea", bytearray(b"ba"), b"ba"),
    ("timestamp", dt.datetime(2024, 2, 29, 23, 59, 58, 123456), None),
    ("timestamp", dt.datetime(1, 1, 1), None), ("timestamp", dt.datetime(9999, 12, 31, 23, 59, 59), None),
    ("timestamptz", dt.datetime(2024, 7, 1, 12, 0, tzinfo=PLUS530), None),
    ("timestamptz", dt.datetime(2024, 7, 1, 12, 0, 0, 1, tzinfo=UTC), None),
    ("date", dt.date(2024, 2, 29), None), ("date", dt.date(1, 1, 1), None),
    ("time", dt.time(23, 59, 59, 999999), None), ("time", dt.time(0, 0), None),
    ("timetz", dt.time(10, 30, tzinfo=PLUS530), None),
    ("interval", dt.timedelta(days=3, seconds=7384, microseconds=5), None),
    ("interval", dt.timedelta(days=-1, seconds=86399), None),
    ("interval", dt.timedelta(0), None), ("interval", dt.timedelta(days=-400, microseconds=-1), None),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678"), None),
    ("json", {"a": [1, 2.5, None, True], "b": "é"}, None), ("jsonb", {"k": {"n": 1}}, None),
    ("jsonb", poolbroker.Json([1, "two"]), [1, "two"]), ("json", poolbroker.Json("str"), "str"),
    ("int4[]", [1, None, 3], None), ("int8[]", [[1, 2], [3, 4]], None), ("text[]", ['a"b', "c,d", "", None, "NULL", "{x}"], None),
    ("float8[]", [1.5, -2.0], None), ("bool[]", [True, False, None], None),
    ("numeric[]", [Decimal("1.1"), Decimal("2")], None), ("numeric[]", [1, 2 ** 70], [Decimal(1), Decimal(2 ** 70)]), ("bytea[]", [b"\x00\x01", b"z"], None),
    ("date[]", [dt.date(2020, 1, 1)], None), ("timestamptz[]", [dt.datetime(2020, 1, 1, tzinfo=UTC)], None),
    ("uuid[]", [uuid.UUID(int=1)], None), ("jsonb[]", [poolbroker.Json({"a": 1})], [{"a": 1}]),
    ("interval[]", [dt.timedelta(hours=1)], None), ("int4[]", [], None), ("varchar[]", ["x y"], None),
]


@pytest.mark.parametrize("sqltype,value,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_round_trip_through_a_column(conn, sqltype, value, expected):
    cur = conn.cursor()
    cur.execute(f"CREATE TEMP TABLE rt (v {sqltype})")
    cur.execute("INSERT INTO rt VALUES (%s)", (value,))
    cur.execute("INSERT INTO rt VALUES (%s)", (None,))
    cur.execute("SELECT v FROM rt")
    got, null = cur.fetchall()
    want = value if expected is None else expected
    if want == "nan":
        assert got[0].is_nan()
    else:
        assert got[0] == want and type(got[0]) is type(want), (got[0], want)
        if isinstance(want, float) and want == 0:
            assert str(got[0]) == str(want)          # -0.0 stays negative
        if isinstance(want, (dt.datetime, dt.time)) and want.tzinfo is not None:
            assert got[0].utcoffset() is not None
    assert null == (None,)
    conn.rollback()


def test_parameter_types_without_a_column(conn):
    """A bare %s gets the type the Python value implies (int -> int8,
    aware datetime -> timestamptz, ...), as psycopg does."""
    cur = conn.cursor()
    vals = (1, 2.5, Decimal("1.5"), True, b"x", dt.date(2020, 1, 2), dt.datetime(2020, 1, 2, 3, 4),
            dt.datetime(2020, 1, 2, tzinfo=UTC), dt.time(1, 2), dt.timedelta(seconds=1), uuid.UUID(int=5),
            [1, 2], ["a"], 2 ** 70)
    cur.execute("SELECT " + ", ".join(["pg_typeof(%s)::text"] * len(vals)), vals)
    assert cur.fetchone() == ("smallint", "double precision", "numeric", "boolean", "bytea", "date",
                              "timestamp without time zone", "timestamp with time zone",
                              "time without time zone", "interval", "uuid", "smallint[]", "text[]", "numeric")
    cur.execute("SELECT pg_typeof(%s)::text, pg_typeof(%s)::text, pg_typeof(%s)::text, pg_typeof(%s)::text",
                (40000, 2 ** 40, [1, 2 ** 33], [1, 2 ** 70]))
    assert cur.fetchone() == ("integer", "bigint", "bigint[]", "numeric[]")
    cur.execute("SELECT %s::int + 1, %s || 'x'", ("41", "abc"))    # str is unknown: inferred
    assert cur.fetchone() == (42, "abcx")
    cur.execute("SELECT 3 = ANY(%s), 4 = ANY(%s)", ([1, 2, 3], (1, 2)))
    assert cur.fetchone() == (True, False)
    conn.rollback()


def test_result_types_from_server_expressions(conn):
    cur = conn.cursor()
    cur.execute("""SELECT 1::int2, 'NaN'::float8, 'infinity'::float4, 'x'::name, 'c'::"char",
                          '{"a":1}'::json, '[1,2]'::jsonb, 'abc'::bytea, ARRAY[[1,2],[3,4]],
                          '[0:1]={7,8}'::int[], ARRAY['a b', NULL], '1 year 2 mons 3 days -04:05:06'::interval,
                          '-00:00:01.5'::interval, 42::oid""")
    row = cur.fetchone()
    assert row[0] == 1 and row[1] != row[1] and row[2] == float("inf")
    assert row[3:5] == ("x", "c") and row[5] == {"a": 1} and row[6] == [1, 2] and row[7] == b"abc"
    assert row[8] == [[1, 2], [3, 4]] and row[9] == [7, 8] and row[10] == ["a b", None]
    assert row[11] == dt.timedelta(days=365 + 60 + 3, hours=-4, minutes=-5, seconds=-6)
    assert row[12] == dt.timedelta(seconds=-1.5) and row[13] == 42
    conn.rollback()


def test_unconvertible_value_is_data_error(conn):
    cur = conn.cursor()
    with pytest.raises(poolbroker.DataError, match="infinity"):
        cur.execute("SELECT 'infinity'::timestamp")
    conn.rollback()


def test_text_with_nul_is_refused(conn):
    with pytest.raises(ValueError):
        conn.cursor().execute("SELECT %s", ("a\x00b",))


@pytest.mark.parametrize("sql,cls,sqlstate", [
    ("SELECT * FROM no_such_table", poolbroker.ProgrammingError, "42P01"),
    ("SELEC 1", poolbroker.ProgrammingError, "42601"),
    ("SELECT 1/0", poolbroker.DataError, "22012"),
    ("SELECT 'x'::int", poolbroker.DataError, "22P02"),
    ("INSERT INTO uq VALUES (1)", poolbroker.IntegrityError, "23505"),
    ("INSERT INTO uq VALUES (NULL)", poolbroker.IntegrityError, "23502"),
    ("INSERT INTO fk VALUES (99)", poolbroker.IntegrityError, "23503"),
    ("INSERT INTO uq VALUES (-5)", poolbroker.IntegrityError, "23514"),
    ("DO $$ BEGIN RAISE EXCEPTION 'boom' USING HINT = 'h1', DETAIL = 'd1'; END $$",
     poolbroker.InternalError, "P0001"),
    ("SELECT DISTINCT a FROM uq FOR UPDATE", poolbroker.NotSupportedError, "0A000"),
    ("DO $$ BEGIN RAISE SQLSTATE '40P01'; END $$", poolbroker.TransactionRollbackError, "40P01"),
    ("DO $$ BEGIN RAISE SQLSTATE '25001'; END $$", poolbroker.InternalError, "25001"),
    ("DO $$ BEGIN RAISE SQLSTATE '53300'; END $$", poolbroker.OperationalError, "53300"),
    ("DO $$ BEGIN RAISE SQLSTATE '3D000'; END $$", poolbroker.ProgrammingError, "3D000"),
])
def test_server_errors(conn, sql, cls, sqlstate):
    cur = conn.cursor()
    cur.execute("CREATE TEMP TABLE uq (a int PRIMARY KEY CHECK (a > 0))")
    cur.execute("CREATE TEMP TABLE fk (a int REFERENCES uq)")
    cur.execute("INSERT INTO uq VALUES (1)")
    with pytest.raises(cls) as ei:
        cur.execute(sql)
    e = ei.value
    assert isinstance(e, poolbroker.DatabaseError)
    assert e.sqlstate == sqlstate == e.pgcode == e.diag.sqlstate
    assert e.message and e.message == e.diag.message_primary and e.message in e.pgerror
    if sqlstate == "23505":
        assert e.detail == "Key (a)=(1) already exists." and e.diag.constraint_name == "uq_pkey"
        assert e.diag.table_name == "uq"
    if sqlstate == "P0001":
        assert (e.message, e.detail, e.hint) == ("boom", "d1", "h1")
    if sqlstate == "42P01":
        assert e.diag.statement_position == "15"
    conn.rollback()
