"""PostgreSQL <-> Python value conversion, by type OID.

Results arrive in PostgreSQL's text format and are converted per column by the
column's type OID (``CONVERTERS``); the common scalar types (int, float, bool,
text) are decoded in C without a Python call.  Parameters are adapted by
Python type (``adapt``) into (value, type OID, format) for
``pb_pg_exec_params``: they are sent as real parameters, never interpolated
into the SQL.

Text formats assume the server defaults ``DateStyle = ISO`` and
``IntervalStyle = postgres`` and ``bytea_output = hex`` (or escape); a pool
whose connections change them gets :class:`DataError` for values it cannot
read.
"""

import datetime as _dt
import json as _json
import re as _re
import uuid as _uuid
from decimal import Decimal

from . import _poolbroker as _pb

# Type OIDs (pg_type.oid; stable across PostgreSQL versions).
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, FLOAT4, FLOAT8, UNKNOWN, BPCHAR, VARCHAR = 114, 700, 701, 705, 1042, 1043
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1082, 1083, 1114, 1184, 1186, 1266
NUMERIC, UUID, JSONB = 1700, 2950, 3802

# Array type OID -> element type OID.
ARRAY_OF = {
    1000: BOOL, 1001: BYTEA, 1002: CHAR, 1003: NAME, 1016: INT8, 1005: INT2, 1007: INT4,
    1009: TEXT, 1028: OID, 199: JSON, 1021: FLOAT4, 1022: FLOAT8, 1014: BPCHAR, 1015: VARCHAR,
    1182: DATE, 1183: TIME, 1115: TIMESTAMP, 1185: TIMESTAMPTZ, 1187: INTERVAL, 1270: TIMETZ,
    1231: NUMERIC, 2951: UUID, 3807: JSONB,
}
ARRAY_FOR = {elem: arr for arr, elem in ARRAY_OF.items()}


class ConversionError(ValueError):
    """A value the server sent that Python cannot represent (raised as DataError)."""


# ------------------------------------------------------------------ results

def _bytea(s):
    if s.startswith("\\x"):
        return bytes.fromhex(s[2:])
    # bytea_output = escape: printable bytes as is, \\ and \ooo octal.
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\":
            out += c.encode("latin-1")
            i += 1
        elif s[i + 1] == "\\":
            out.append(0x5C)
            i += 2
        else:
            out.append(int(s[i + 1:i + 4], 8))
            i += 4
    return bytes(out)


def _checked(parse, what):
    def conv(s):
        try:
            return parse(s)
        except (ValueError, OverflowError) as e:
            raise ConversionError(f"cannot convert PostgreSQL {what} {s!r} to Python: {e}") from None
    conv.__name__ = "parse_" + what
    return conv


def _tz_fix(s):
    # PostgreSQL prints offsets as +HH, +HH:MM or +HH:MM:SS; Python 3.11's
    # fromisoformat reads all three, older versions need +HH:MM.
    m = _re.search(r"([+-]\d\d)$", s)
    return s + ":00" if m else s


def _date(s):
    return _dt.date.fromisoformat(s)


def _time(s):
    return _dt.time.fromisoformat(s)


def _timetz(s):
    return _dt.time.fromisoformat(_tz_fix(s))


def _timestamp(s):
    return _dt.datetime.fromisoformat(s)


def _timestamptz(s):
    return _dt.datetime.fromisoformat(_tz_fix(s))


_INTERVAL_RE = _re.compile(
    r"(?:(?P<years>[+-]?\d+) years? ?)?(?:(?P<months>[+-]?\d+) mons? ?)?(?:(?P<days>[+-]?\d+) days? ?)?"
    r"(?:(?P<sign>[+-])?(?P<hours>\d+):(?P<minutes>\d\d):(?P<seconds>\d\d)(?:\.(?P<frac>\d{1,6}))?)?$")


def _interval(s):
    """IntervalStyle 'postgres' text -> timedelta; a year counts 365 days and
    a month 30, as psycopg2 does (timedelta has no months)."""
    m = _INTERVAL_RE.match(s)
    if not m or not s:
        raise ValueError("unrecognised interval format (IntervalStyle must be 'postgres')")
    g = m.groupdict()
    days = int(g["years"] or 0) * 365 + int(g["months"] or 0) * 30 + int(g["days"] or 0)
    us = 0
    if g["hours"] is not None:
        us = ((int(g["hours"]) * 60 + int(g["minutes"])) * 60 + int(g["seconds"])) * 1000000
        us += int((g["frac"] or "0").ljust(6, "0"))
        if g["sign"] == "-":
            us = -us
    return _dt.timedelta(days=days, microseconds=us)


def _numeric(s):
    return Decimal(s)


def _float(s):
    return float(s)


def _bool(s):
    return s == "t"


def parse_array(s, elem):
    """Parse a PostgreSQL array literal ('{1,2,NULL}', nested, optionally
    with '[lo:hi]=' bounds) into nested lists, elements through elem."""
    if s.startswith("["):
        s = s[s.index("=") + 1:]
    n = len(s)

    def parse(i):
        out = []
        i += 1                              # past '{'
        if s[i] == "}":
            return out, i + 1
        while True:
            c = s[i]
            if c == "{":
                v, i = parse(i)
                out.append(v)
            elif c == '"':
                j, buf = i + 1, []
                while s[j] != '"':
                    if s[j] == "\\":
                        j += 1
                    buf.append(s[j])
                    j += 1
                out.append(elem("".join(buf)))
                i = j + 1
            else:
                j = i
                while j < n and s[j] not in ",}":
                    j += 1
                tok = s[i:j]
                out.append(None if tok == "NULL" else elem(tok))
                i = j
            if s[i] == ",":
                i += 1
            elif s[i] == "}":
                return out, i + 1
            else:
                raise ValueError(f"malformed array literal at {i}")

    if not s.startswith("{"):
        raise ConversionError(f"malformed array literal {s!r}")
    try:
        v, _ = parse(0)
    except IndexError:
        raise ConversionError(f"malformed array literal {s!r}") from None
    return v


_SCALAR = {
    BOOL: _bool, BYTEA: _checked(_bytea, "bytea"), INT2: int, INT4: int, INT8: int, OID: int,
    FLOAT4: _float, FLOAT8: _float, NUMERIC: _checked(_numeric, "numeric"),
    DATE: _checked(_date, "date"), TIME: _checked(_time, "time"), TIMETZ: _checked(_timetz, "timetz"),
    TIMESTAMP: _checked(_timestamp, "timestamp"), TIMESTAMPTZ: _checked(_timestamptz, "timestamptz"),
    INTERVAL: _checked(_interval, "interval"), UUID: _checked(_uuid.UUID, "uuid"),
    JSON: _json.loads, JSONB: _json.loads,
}

# oid -> converter for the C row builder: a CONV_* code or a callable(str).
CONVERTERS = {
    INT2: _pb.CONV_INT, INT4: _pb.CONV_INT, INT8: _pb.CONV_INT, OID: _pb.CONV_INT,
    FLOAT4: _pb.CONV_FLOAT, FLOAT8: _pb.CONV_FLOAT, BOOL: _pb.CONV_BOOL,
}
for _oid, _f in _SCALAR.items():
    CONVERTERS.setdefault(_oid, _f)
for _arr, _elem in ARRAY_OF.items():
    CONVERTERS[_arr] = (lambda e: lambda s: parse_array(s, e))(_SCALAR.get(_elem, str))


# --------------------------------------------------------------- parameters

class Json:
    """Send obj as JSON text (psycopg2.extras.Json): the server infers json
    or jsonb from context, e.g. ``INSERT INTO t (doc) VALUES (%s)``.  A dict
    is sent this way without wrapping; wrap a list to send it as JSON rather
    than as an array."""

    __slots__ = ("adapted", "dumps")

    def __init__(self, adapted, dumps=None):
        self.adapted = adapted
        self.dumps = dumps or _json.dumps

    def __repr__(self):
        return f"Json({self.adapted!r})"


def _int_oid(v):
    """The smallest of int2, int4, int8, numeric that holds v (psycopg 3's
    rule): PostgreSQL casts a smaller integer type up implicitly, never
    down, so this fits int4 function arguments and int8 columns alike.  Note
    that an expression of two parameters is computed in their type:
    %s * %s with 300 and 300 overflows int2; cast one (%s::int) there."""
    if -32768 <= v <= 32767:
        return INT2
    if -2147483648 <= v <= 2147483647:
        return INT4
    if -(1 << 63) <= v <= (1 << 63) - 1:
        return INT8
    return NUMERIC


def _float_text(v):
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(v)


def _interval_text(v):
    return f"{v.days} days {v.seconds} seconds {v.microseconds} microseconds"


def adapt(v):
    """Python value -> (text or bytes or None, type OID, format).

    None -> NULL; bool -> bool; int -> the smallest of int2/int4/int8/numeric
    that holds it (psycopg 3's rule); float ->
    float8; Decimal -> numeric; str -> unknown (the server infers the type,
    as for a quoted literal); bytes/bytearray/memoryview -> bytea (binary);
    datetime -> timestamptz if aware else timestamp; date; time -> timetz if
    aware else time; timedelta -> interval; UUID -> uuid; dict or Json ->
    JSON text (unknown: json or jsonb by context); list/tuple -> an array of
    its elements' type.  Anything else raises TypeError (ProgrammingError at
    execute)."""
    if v is None:
        return None, 0, 0
    t = type(v)
    if t is str:
        return v, 0, 0
    if t is bool:
        return ("t" if v else "f"), BOOL, 0
    if t is int:
        return str(v), _int_oid(v), 0
    if t is float:
        return _float_text(v), FLOAT8, 0
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v), BYTEA, 1
    if isinstance(v, Decimal):
        return str(v), NUMERIC, 0
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" "), (TIMESTAMPTZ if v.utcoffset() is not None else TIMESTAMP), 0
    if isinstance(v, _dt.date):
        return v.isoformat(), DATE, 0
    if isinstance(v, _dt.time):
        return v.isoformat(), (TIMETZ if v.utcoffset() is not None else TIME), 0
    if isinstance(v, _dt.timedelta):
        return _interval_text(v), INTERVAL, 0
    if isinstance(v, _uuid.UUID):
        return str(v), UUID, 0
    if isinstance(v, Json):
        return v.dumps(v.adapted), 0, 0
    if isinstance(v, dict):
        return _json.dumps(v), 0, 0
    if isinstance(v, (list, tuple)):
        return _array_text(v), _array_oid(v), 0
    if isinstance(v, str):
        return str(v), 0, 0
    if isinstance(v, int):
        return adapt(int(v))
    if isinstance(v, float):
        return adapt(float(v))
    raise TypeError(f"can't adapt type '{type(v).__name__}'")


def _first_scalar(v):
    for x in v:
        if isinstance(x, (list, tuple)):
            r = _first_scalar(x)
            if r is not None:
                return r
        elif x is not None:
            return x
    return None


def _flat(v):
    for x in v:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def _array_oid(v):
    x = _first_scalar(v)
    if x is None:
        return 0
    if type(x) is int:
        ints = [y for y in _flat(v) if y is not None]
        if all(type(y) is int for y in ints):
            return ARRAY_FOR[max((_int_oid(y) for y in ints), key=(INT2, INT4, INT8, NUMERIC).index)]
    _, oid, _ = adapt(x)
    if oid == 0:
        return 1009 if isinstance(x, str) else 0     # text[]; JSON elements: unknown
    return ARRAY_FOR.get(oid, 0)


def _array_elem_text(x):
    if x is None:
        return "NULL"
    if isinstance(x, (list, tuple)):
        return _array_text(x)
    val, _, fmt = adapt(x)
    if fmt == 1:
        val = "\\x" + val.hex()
    return '"' + val.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _array_text(v):
    return "{" + ",".join(_array_elem_text(x) for x in v) + "}"
