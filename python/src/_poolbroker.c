/*
 * _poolbroker.c — the C core of the `poolbroker` Python package.
 *
 * A thin layer over libpoolbroker (include/poolbroker.h): a Client is one
 * pb_client (one attachment to the broker), a Lease is one pb_lease.  The
 * Python modules (poolbroker/pg.py, poolbroker/redis.py) build the DB-API 2.0
 * and redis-py surfaces on these objects; this file only moves bytes across
 * and converts results.  The non-blocking methods (Client.fd/consume/
 * acquire_start, Acquiring, Lease.pg_send_query, pg_send_params, pg_poll,
 * redis_send, redis_poll) serve poolbroker/aio.py.
 *
 * Threads: the GIL is released around every blocking library call (the
 * non-blocking ones never wait and keep it).  A pb_client is not
 * thread-safe, so each Client carries a lock taken (without the GIL) around
 * every call on it and on its leases; the Python layer keeps one Client per
 * thread, so the lock is normally uncontended.
 *
 * Fork: the library re-attaches an inherited pb_client on first use and makes
 * inherited leases stale (PB_ESTALE).  A Client notices the fork by the
 * module's fork generation (bumped by a pthread_atfork child handler: no
 * getpid() system call per call) and replaces its lock (another thread of
 * the parent may have held it).
 *
 * Errors from the library raise _poolbroker.LibError(code, message); the
 * Python layer maps the code to PEP 249's or redis-py's exception classes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <pthread.h>
#include <unistd.h>

#include "poolbroker.h"
#include "shmview.h"

static PyObject *LibError;          /* _poolbroker.LibError(code, message) */

/* Converter codes a caller may put in the converters dict instead of a
 * callable: the common types are decoded here, without a Python call. */
enum { CONV_STR = 0, CONV_INT = 1, CONV_FLOAT = 2, CONV_BOOL = 3 };

/* Raise LibError(rc, text, what); returns NULL. */
static PyObject *raise_text(int rc, const char *text, const char *what)
{
    PyObject *args = Py_BuildValue("(iss)", rc, text, what);
    if (args) {
        PyErr_SetObject(LibError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *raise_lib(int rc, const char *what)
{
    return raise_text(rc, pb_strerror(rc), what);
}

/* As raise_lib for a call on lease l: a PB_ETOOBIG carries the library's
 * own text (pb_lease_error: the request's size and the pool's
 * max_request_size) in place of pb_strerror's. */
static PyObject *raise_lease(pb_lease *l, int rc, const char *what)
{
    const char *why = rc == PB_ETOOBIG && l ? pb_lease_error(l) : "";
    return raise_text(rc, *why ? why : pb_strerror(rc), what);
}

/* ------------------------------------------------------------------ Client */

#define NOTICES_MAX 50               /* kept per client, oldest dropped (psycopg2 keeps 50) */

typedef struct {
    PyObject_HEAD
    pb_client *c;
    PyThread_type_lock lock;        /* serialises calls on c and its leases */
    unsigned long gen;              /* fork_gen of the process the lock belongs to */
    char *notices[NOTICES_MAX];     /* "SEVERITY:  message\n", oldest first; under lock */
    int nnotices;
} ClientObject;

/* pb_notice_handler: runs inside a library call (client lock held, GIL
 * released), so it only stores C strings; take_notices() hands them to
 * Python after the call. */
static void on_notice(void *arg, const pb_result *n)
{
    ClientObject *cl = arg;
    const char *sev = pb_error_field(n, 'S'), *msg = pb_error_field(n, 'M');
    char *s = NULL;
    if (asprintf(&s, "%s:  %s\n", sev ? sev : "NOTICE", msg ? msg : "") < 0)
        return;
    if (cl->nnotices == NOTICES_MAX) {
        free(cl->notices[0]);
        memmove(cl->notices, cl->notices + 1, (NOTICES_MAX - 1) * sizeof cl->notices[0]);
        cl->nnotices--;
    }
    cl->notices[cl->nnotices++] = s;
}

/* The notices stored since the last call, as a list of str; clears them. */
static PyObject *client_take_notices(ClientObject *cl)
{
    PyThread_type_lock lock = cl->lock;
    PyThread_acquire_lock(lock, WAIT_LOCK);   /* holders never wait for the GIL */
    PyObject *l = PyList_New(0);
    for (int i = 0; i < cl->nnotices; i++) {
        PyObject *s = l ? PyUnicode_DecodeUTF8(cl->notices[i], (Py_ssize_t)strlen(cl->notices[i]), "replace") : NULL;
        if (l && (!s || PyList_Append(l, s) < 0))
            Py_CLEAR(l);
        Py_XDECREF(s);
        free(cl->notices[i]);
    }
    cl->nnotices = 0;
    PyThread_release_lock(lock);
    return l;
}

static PyTypeObject ClientType;
static PyTypeObject LeaseType;

/* Forks this process has gone through (its ancestors' included): bumped in
 * the child by fork(), so "made in another process" is one comparison. */
static volatile unsigned long fork_gen;

static void on_fork_child(void)
{
    fork_gen++;
}

/* The lock of cl for this process: a forked child gets a fresh one (the
 * parent's may have been held by a thread that does not exist here). */
static PyThread_type_lock client_lock(ClientObject *cl)
{
    if (cl->gen != fork_gen) {
        cl->lock = PyThread_allocate_lock();   /* the parent's is leaked on purpose */
        cl->gen = fork_gen;
    }
    return cl->lock;
}

static int Client_init(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "socket", NULL };
    const char *path = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|z:Client", kwlist, &path))
        return -1;
    if (self->c) {
        PyErr_SetString(PyExc_RuntimeError, "Client already initialised");
        return -1;
    }
    self->gen = fork_gen;
    self->lock = PyThread_allocate_lock();
    if (!self->lock) {
        PyErr_NoMemory();
        return -1;
    }
    int rc;
    pb_client *c = NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = pb_connect(path, &c);
    Py_END_ALLOW_THREADS
    if (rc != PB_OK) {
        raise_lib(rc, "attach to the broker");
        return -1;
    }
    self->c = c;
    pb_set_notice_handler(c, on_notice, self);
    return 0;
}

static void Client_dealloc(ClientObject *self)
{
    if (self->c)
        pb_disconnect(self->c);
    for (int i = 0; i < self->nnotices; i++)
        free(self->notices[i]);
    if (self->lock && self->gen == fork_gen)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ------------------------------------------------------------------- Lease */

typedef struct {
    PyObject_HEAD
    ClientObject *client;           /* strong reference */
    pb_lease *l;                    /* NULL once released */
    unsigned long gen;              /* fork_gen of the process that acquired it */
} LeaseObject;

static PyObject *Client_acquire(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = { "pool", "timeout_ms", NULL };
    const char *pool;
    int timeout_ms = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|i:acquire", kwlist, &pool, &timeout_ms))
        return NULL;
    PyThread_type_lock lock = client_lock(self);
    pb_lease *l = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    rc = pb_acquire(self->c, pool, timeout_ms, &l);
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    if (rc != PB_OK)
        return raise_lib(rc, "acquire a lease");
    LeaseObject *lo = PyObject_New(LeaseObject, &LeaseType);
    if (!lo) {
        pb_release(l);
        return NULL;
    }
    Py_INCREF(self);
    lo->client = self;
    lo->l = l;
    lo->gen = fork_gen;
    return (PyObject *)lo;
}

static int lease_release(LeaseObject *self)
{
    if (!self->l)
        return PB_OK;
    PyThread_type_lock lock = client_lock(self->client);
    pb_lease *l = self->l;
    self->l = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    rc = pb_release(l);
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    return rc;
}

static void Lease_dealloc(LeaseObject *self)
{
    (void)lease_release(self);
    Py_XDECREF(self->client);
    PyObject_Free(self);
}

static int lease_check(LeaseObject *self)
{
    if (!self->l) {
        raise_lib(PB_ESTALE, "use a released lease");
        return -1;
    }
    return 0;
}

/* release() -> int: give the lease back; returns 0, or PB_ESTALE's value if
 * the broker had already taken it back (or it was inherited across fork). */
static PyObject *Lease_release(LeaseObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(lease_release(self));
}

/* take_notices() -> [str]: notices (RAISE NOTICE, warnings) the server sent
 * on any lease of this lease's client since the last take, oldest first,
 * each "SEVERITY:  message\n" as psycopg2's connection.notices. */
static PyObject *Lease_take_notices(LeaseObject *self, PyObject *unused)
{
    (void)unused;
    (void)client_lock(self->client);
    return client_take_notices(self->client);
}

static PyObject *Lease_get_released(LeaseObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->l == NULL);
}

static PyObject *Lease_get_forked(LeaseObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->gen != fork_gen);
}

static PyObject *Lease_get_backend_pid(LeaseObject *self, void *unused)
{
    (void)unused;
    if (!self->l)
        return PyLong_FromLong(-1);
    return PyLong_FromLong(pb_lease_backend_pid(self->l));
}

/* -------------------------------------------------------------- PostgreSQL */

/* Build the Python value of one text-format field. */
static PyObject *field_value(const pb_result *r, int row, int col, PyObject *conv)
{
    if (pb_getisnull(r, row, col))
        Py_RETURN_NONE;
    const char *v = pb_getvalue(r, row, col);
    Py_ssize_t n = pb_getlength(r, row, col);
    if (pb_fformat(r, col) != 0)
        return PyBytes_FromStringAndSize(v, n);
    if (PyLong_CheckExact(conv)) {
        switch (PyLong_AsLong(conv)) {
        case CONV_INT:
            return PyLong_FromString(v, NULL, 10);
        case CONV_FLOAT: {
            PyObject *s = PyUnicode_DecodeASCII(v, n, "strict");
            if (!s)
                return NULL;
            PyObject *f = PyFloat_FromString(s);
            Py_DECREF(s);
            return f;
        }
        case CONV_BOOL:
            return PyBool_FromLong(v[0] == 't');
        default:
            return PyUnicode_DecodeUTF8(v, n, "strict");
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8(v, n, "strict");
    if (!s)
        return NULL;
    PyObject *out = PyObject_CallOneArg(conv, s);
    Py_DECREF(s);
    return out;
}

static const char err_codes[] = "SVCMDHPpqWstcdnFLR";

/*
 * A result as a tuple (status, fields, rows, cmd_status, cmd_tuples, error):
 * status is PB_RES_*, fields a tuple of (name, type_oid) pairs, rows a list
 * of tuples converted with converters ({oid: callable or CONV_* int}; an oid
 * not in it reads as str), error None or a dict {field_code_char: str}.
 */
static PyObject *result_to_py(const pb_result *r, PyObject *converters)
{
    int status = pb_result_status(r);
    int nf = pb_nfields(r), nt = pb_ntuples(r);
    PyObject *fields = NULL, *rows = NULL, *convs = NULL, *err = Py_None, *out = NULL;
    Py_INCREF(Py_None);
    if (!(fields = PyTuple_New(nf)) || !(convs = PyTuple_New(nf)) || !(rows = PyList_New(nt)))
        goto done;
    PyObject *str_code = PyLong_FromLong(CONV_STR);
    if (!str_code)
        goto done;
    for (int i = 0; i < nf; i++) {
        unsigned oid = pb_ftype(r, i);
        PyObject *f = Py_BuildValue("(NI)", PyUnicode_DecodeUTF8(pb_fname(r, i), strlen(pb_fname(r, i)),
                                                                 "replace"), oid);
        if (!f) {
            Py_DECREF(str_code);
            goto done;
        }
        PyTuple_SET_ITEM(fields, i, f);
        PyObject *key = PyLong_FromUnsignedLong(oid);
        PyObject *conv = key && converters != Py_None ? PyDict_GetItemWithError(converters, key) : NULL;
        Py_XDECREF(key);
        if (!conv) {
            if (PyErr_Occurred()) {
                Py_DECREF(str_code);
                goto done;
            }
            conv = str_code;
        }
        Py_INCREF(conv);
        PyTuple_SET_ITEM(convs, i, conv);
    }
    Py_DECREF(str_code);
    for (int row = 0; row < nt; row++) {
        PyObject *t = PyTuple_New(nf);
        if (!t)
            goto done;
        PyList_SET_ITEM(rows, row, t);
        for (int col = 0; col < nf; col++) {
            PyObject *v = field_value(r, row, col, PyTuple_GET_ITEM(convs, col));
            if (!v)
                goto done;
            PyTuple_SET_ITEM(t, col, v);
        }
    }
    if (status == PB_RES_ERROR) {
        Py_DECREF(err);
        if (!(err = PyDict_New()))
            goto done;
        for (const char *c = err_codes; *c; c++) {
            const char *v = pb_error_field(r, *c);
            if (!v)
                continue;
            char key[2] = { *c, 0 };
            PyObject *s = PyUnicode_DecodeUTF8(v, strlen(v), "replace");
            if (!s || PyDict_SetItemString(err, key, s) < 0) {
                Py_XDECREF(s);
                goto done;
            }
            Py_DECREF(s);
        }
    }
    out = Py_BuildValue("(iOOsLO)", status, fields, rows, pb_cmd_status(r), (long long)pb_cmd_tuples(r), err);
done:
    Py_XDECREF(fields);
    Py_XDECREF(rows);
    Py_XDECREF(convs);
    Py_XDECREF(err);
    return out;
}

/* Parameters of one statement, encoded for the library.  Values are kept
 * alive by the bytes objects held in keep. */
typedef struct {
    int n;
    const char **values;
    int *lengths;
    int *formats;
    unsigned int *types;
    PyObject *keep;                 /* list of bytes */
    PyObject *sql;                  /* bytes */
} params;

static void params_free(params *p)
{
    PyMem_Free(p->values);
    PyMem_Free(p->lengths);
    PyMem_Free(p->formats);
    PyMem_Free(p->types);
    Py_XDECREF(p->keep);
    Py_XDECREF(p->sql);
    memset(p, 0, sizeof *p);
}

static PyObject *as_bytes(PyObject *o, const char *what)
{
    if (PyBytes_Check(o)) {
        Py_INCREF(o);
        return o;
    }
    if (PyUnicode_Check(o))
        return PyUnicode_AsUTF8String(o);
    PyErr_Format(PyExc_TypeError, "%s must be str or bytes, not %.100s", what, Py_TYPE(o)->tp_name);
    return NULL;
}

/* Fill p from sql, values (sequence of None/str/bytes), types (sequence of
 * int oids, or None) and formats (sequence of 0/1, or None: all text). */
static int params_fill(params *p, PyObject *sql, PyObject *values, PyObject *types, PyObject *formats)
{
    memset(p, 0, sizeof *p);
    if (!(p->sql = as_bytes(sql, "sql")))
        return -1;
    if (strlen(PyBytes_AS_STRING(p->sql)) != (size_t)PyBytes_GET_SIZE(p->sql)) {
        PyErr_SetString(PyExc_ValueError, "the query contains a NUL character");
        return -1;
    }
    PyObject *vals = PySequence_Fast(values, "parameter values must be a sequence");
    if (!vals)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(vals);
    if (n > 65535) {
        Py_DECREF(vals);
        PyErr_SetString(PyExc_ValueError, "more than 65535 parameters");
        return -1;
    }
    p->n = (int)n;
    p->values = PyMem_Calloc(n ? n : 1, sizeof *p->values);
    p->lengths = PyMem_Calloc(n ? n : 1, sizeof *p->lengths);
    p->formats = PyMem_Calloc(n ? n : 1, sizeof *p->formats);
    p->types = PyMem_Calloc(n ? n : 1, sizeof *p->types);
    p->keep = PyList_New(0);
    if (!p->values || !p->lengths || !p->formats || !p->types || !p->keep) {
        Py_DECREF(vals);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PySequence_Fast_GET_ITEM(vals, i);
        if (v == Py_None)
            continue;
        PyObject *b = as_bytes(v, "a parameter value");
        if (!b || PyList_Append(p->keep, b) < 0) {
            Py_XDECREF(b);
            Py_DECREF(vals);
            return -1;
        }
        Py_DECREF(b);
        p->values[i] = PyBytes_AS_STRING(b);
        p->lengths[i] = (int)PyBytes_GET_SIZE(b);
    }
    Py_DECREF(vals);
    PyObject *seqs[2] = { types, formats };
    for (int k = 0; k < 2; k++) {
        if (seqs[k] == Py_None)
            continue;
        PyObject *s = PySequence_Fast(seqs[k], "parameter types and formats must be sequences");
        if (!s)
            return -1;
        if (PySequence_Fast_GET_SIZE(s) != n) {
            Py_DECREF(s);
            PyErr_SetString(PyExc_ValueError, "parameter types/formats and values differ in length");
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned long x = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(s, i));
            if (x == (unsigned long)-1 && PyErr_Occurred()) {
                Py_DECREF(s);
                return -1;
            }
            if (k == 0)
                p->types[i] = (unsigned int)x;
            else
                p->formats[i] = x ? 1 : 0;
        }
        Py_DECREF(s);
    }
    /* Text values must hold no NUL (the wire format would cut them). */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p->values[i] && !p->formats[i] && memchr(p->values[i], 0, (size_t)p->lengths[i])) {
            PyErr_Format(PyExc_ValueError, "parameter %zd contains a NUL character", i + 1);
            return -1;
        }
    }
    return 0;
}

/* pg_exec(sql, converters) -> result tuple (see result_to_py).  Simple query
 * protocol: sql may hold several statements; the last one's result is
 * returned. */
static PyObject *Lease_pg_exec(LeaseObject *self, PyObject *args)
{
    PyObject *sql, *converters;
    if (!PyArg_ParseTuple(args, "OO:pg_exec", &sql, &converters) || lease_check(self) < 0)
        return NULL;
    PyObject *b = as_bytes(sql, "sql");
    if (!b)
        return NULL;
    if (strlen(PyBytes_AS_STRING(b)) != (size_t)PyBytes_GET_SIZE(b)) {
        Py_DECREF(b);
        PyErr_SetString(PyExc_ValueError, "the query contains a NUL character");
        return NULL;
    }
    PyThread_type_lock lock = client_lock(self->client);
    pb_result *r = NULL;
    int rc;
    const char *q = PyBytes_AS_STRING(b);
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    rc = pb_pg_exec(self->l, q, &r);
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    Py_DECREF(b);
    if (rc != PB_OK)
        return raise_lease(self->l, rc, "run a query");
    PyObject *out = result_to_py(r, converters);
    pb_result_free(r);
    return out;
}

/* pg_exec_params(sql, values, types, formats, converters) -> result tuple.
 * One statement, extended protocol; values None/str/bytes, types oids (0:
 * the server infers) or None, formats 0 text / 1 binary or None. */
static PyObject *Lease_pg_exec_params(LeaseObject *self, PyObject *args)
{
    PyObject *sql, *values, *types, *formats, *converters;
    if (!PyArg_ParseTuple(args, "OOOOO:pg_exec_params", &sql, &values, &types, &formats, &converters) ||
        lease_check(self) < 0)
        return NULL;
    params p;
    if (params_fill(&p, sql, values, types, formats) < 0) {
        params_free(&p);
        return NULL;
    }
    PyThread_type_lock lock = client_lock(self->client);
    pb_result *r = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    rc = pb_pg_exec_params(self->l, PyBytes_AS_STRING(p.sql), p.n, p.types, p.values, p.lengths, p.formats,
                           0, &r);
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    params_free(&p);
    if (rc != PB_OK)
        return raise_lease(self->l, rc, "run a query");
    PyObject *out = result_to_py(r, converters);
    pb_result_free(r);
    return out;
}

/* pg_pipeline(statements, converters) -> list of result tuples.
 * statements: a sequence of (sql, values, types, formats); all are sent with
 * pb_pg_send_params (each with its own Sync) and their results read back in
 * order, so N statements cost one round trip per request buffer rather than
 * N. */
static PyObject *Lease_pg_pipeline(LeaseObject *self, PyObject *args)
{
    PyObject *stmts, *converters;
    if (!PyArg_ParseTuple(args, "OO:pg_pipeline", &stmts, &converters) || lease_check(self) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(stmts, "statements must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    params *ps = PyMem_Calloc(n ? n : 1, sizeof *ps);
    PyObject *out = NULL;
    if (!ps) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *sql, *values, *types, *formats;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOOO:statement", &sql, &values, &types,
                              &formats) ||
            params_fill(&ps[i], sql, values, types, formats) < 0)
            goto done;
    }
    PyThread_type_lock lock = client_lock(self->client);
    pb_result **res = PyMem_Calloc(n ? n : 1, sizeof *res);
    if (!res) {
        PyErr_NoMemory();
        goto done;
    }
    int rc = PB_OK;
    Py_ssize_t got = 0;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    for (Py_ssize_t i = 0; i < n && rc == PB_OK; i++)
        rc = pb_pg_send_params(self->l, PyBytes_AS_STRING(ps[i].sql), ps[i].n, ps[i].types, ps[i].values,
                               ps[i].lengths, ps[i].formats, 0);
    if (rc == PB_OK) {
        for (;;) {
            pb_result *r = NULL;
            rc = pb_pg_get_result(self->l, &r);
            if (rc != PB_OK || !r)
                break;
            if (got < n)
                res[got++] = r;
            else
                pb_result_free(r);
        }
    }
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    if (rc != PB_OK) {
        raise_lease(self->l, rc, "run a pipeline");
    } else if (got != n) {
        raise_lib(PB_EPROTO, "read a pipeline's results (fewer results than statements)");
    } else if ((out = PyList_New(n))) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *t = result_to_py(res[i], converters);
            if (!t) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, i, t);
        }
    }
    for (Py_ssize_t i = 0; i < got; i++)
        pb_result_free(res[i]);
    PyMem_Free(res);
done:
    for (Py_ssize_t i = 0; i < n; i++)
        params_free(&ps[i]);
    PyMem_Free(ps);
    Py_DECREF(seq);
    return out;
}

/* ------------------------------------------------------------ non-blocking
 *
 * The asyncio layer (poolbroker/aio.py) drives these: none of them waits,
 * so none releases the GIL; the client lock is still taken (a holder never
 * waits for the GIL, so taking it with the GIL held cannot deadlock).  The
 * contract is include/poolbroker.h's "non-blocking use": a "not yet" answer
 * armed a notification on Client.fd(); when the fd is readable, call
 * Client.consume() once and then poll EVERY operation in progress again.
 */

static PyTypeObject AcquiringType;

typedef struct {
    PyObject_HEAD
    ClientObject *client;           /* strong reference: the op lives in its pb_client */
    pb_acquiring *op;               /* NULL once finished, cancelled or failed */
} AcquiringObject;

/* A new Lease object owning l (released if the object cannot be made). */
static PyObject *lease_new(ClientObject *cl, pb_lease *l)
{
    LeaseObject *lo = PyObject_New(LeaseObject, &LeaseType);
    if (!lo) {
        pb_release(l);
        return NULL;
    }
    Py_INCREF(cl);
    lo->client = cl;
    lo->l = l;
    lo->gen = fork_gen;
    return (PyObject *)lo;
}

/* fd() -> int: pb_client_fd, for loop.add_reader (a new one after fork). */
static PyObject *Client_fd(ClientObject *self, PyObject *unused)
{
    (void)unused;
    PyThread_type_lock lock = client_lock(self);
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int fd = pb_client_fd(self->c);
    PyThread_release_lock(lock);
    if (fd < 0)
        return raise_lib(fd, "make the client's notification fd");
    return PyLong_FromLong(fd);
}

/* fd_polls() -> bool: pb_client_fd_polls (True: the timerfd fallback). */
static PyObject *Client_fd_polls(ClientObject *self, PyObject *unused)
{
    (void)unused;
    PyThread_type_lock lock = client_lock(self);
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_client_fd_polls(self->c);
    PyThread_release_lock(lock);
    if (rc < 0)
        return raise_lib(rc, "make the client's notification fd");
    return PyBool_FromLong(rc);
}

/* consume() -> int: pb_client_consume, the notifications reaped. */
static PyObject *Client_consume(ClientObject *self, PyObject *unused)
{
    (void)unused;
    PyThread_type_lock lock = client_lock(self);
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int n = pb_client_consume(self->c);
    PyThread_release_lock(lock);
    if (n < 0)
        return raise_lib(n, "consume the client's notifications");
    return PyLong_FromLong(n);
}

/* acquire_start(pool) -> Lease or Acquiring: pb_acquire_start.  A Lease
 * when a slot was free at once, else an Acquiring to poll.  Raises LibError
 * (PB_ENOPOOL, PB_ESHUTDOWN, PB_EBROKER, ...). */
static PyObject *Client_acquire_start(ClientObject *self, PyObject *args)
{
    const char *pool;
    if (!PyArg_ParseTuple(args, "s:acquire_start", &pool))
        return NULL;
    AcquiringObject *ao = PyObject_New(AcquiringObject, &AcquiringType);
    if (!ao)
        return NULL;
    Py_INCREF(self);
    ao->client = self;
    ao->op = NULL;
    PyThread_type_lock lock = client_lock(self);
    pb_acquiring *op = NULL;
    pb_lease *l = NULL;
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_acquire_start(self->c, pool, &op, &l);
    PyThread_release_lock(lock);
    if (rc == PB_EINPROGRESS) {
        ao->op = op;
        return (PyObject *)ao;
    }
    Py_DECREF(ao);
    if (rc != PB_OK)
        return raise_lib(rc, "acquire a lease");
    return lease_new(self, l);
}

/* poll() -> Lease or None: pb_acquire_poll.  None: still queued (armed).
 * Raises LibError for the error that ended it, or PB_EINVAL once it is
 * over (a Lease was returned, or it was cancelled). */
static PyObject *Acquiring_poll(AcquiringObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->op)
        return raise_lib(PB_EINVAL, "poll a finished acquire");
    PyThread_type_lock lock = client_lock(self->client);
    pb_lease *l = NULL;
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_acquire_poll(self->op, &l);
    PyThread_release_lock(lock);
    if (rc == PB_EINPROGRESS)
        Py_RETURN_NONE;
    self->op = NULL;                /* freed by the library */
    if (rc != PB_OK)
        return raise_lib(rc, "acquire a lease");
    return lease_new(self->client, l);
}

static void acquiring_cancel(AcquiringObject *self)
{
    if (!self->op)
        return;
    PyThread_type_lock lock = client_lock(self->client);
    PyThread_acquire_lock(lock, WAIT_LOCK);
    pb_acquire_cancel(self->op);
    PyThread_release_lock(lock);
    self->op = NULL;
}

/* cancel(): pb_acquire_cancel (a slot granted meanwhile goes back).
 * Idempotent. */
static PyObject *Acquiring_cancel(AcquiringObject *self, PyObject *unused)
{
    (void)unused;
    acquiring_cancel(self);
    Py_RETURN_NONE;
}

static PyObject *Acquiring_get_done(AcquiringObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->op == NULL);
}

static void Acquiring_dealloc(AcquiringObject *self)
{
    acquiring_cancel(self);
    Py_XDECREF(self->client);
    PyObject_Free(self);
}

/* pg_send_query(sql): pb_pg_send_query (simple protocol, may hold several
 * statements; the result is the last one's). */
static PyObject *Lease_pg_send_query(LeaseObject *self, PyObject *args)
{
    PyObject *sql;
    if (!PyArg_ParseTuple(args, "O:pg_send_query", &sql) || lease_check(self) < 0)
        return NULL;
    PyObject *b = as_bytes(sql, "sql");
    if (!b)
        return NULL;
    if (strlen(PyBytes_AS_STRING(b)) != (size_t)PyBytes_GET_SIZE(b)) {
        Py_DECREF(b);
        PyErr_SetString(PyExc_ValueError, "the query contains a NUL character");
        return NULL;
    }
    PyThread_type_lock lock = client_lock(self->client);
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_pg_send_query(self->l, PyBytes_AS_STRING(b));
    PyThread_release_lock(lock);
    Py_DECREF(b);
    if (rc != PB_OK)
        return raise_lease(self->l, rc, "send a query");
    Py_RETURN_NONE;
}

/* pg_send_params(sql, values, types, formats): pb_pg_send_params (one
 * statement, extended protocol, text results), arguments as pg_exec_params. */
static PyObject *Lease_pg_send_params(LeaseObject *self, PyObject *args)
{
    PyObject *sql, *values, *types, *formats;
    if (!PyArg_ParseTuple(args, "OOOO:pg_send_params", &sql, &values, &types, &formats) ||
        lease_check(self) < 0)
        return NULL;
    params p;
    if (params_fill(&p, sql, values, types, formats) < 0) {
        params_free(&p);
        return NULL;
    }
    PyThread_type_lock lock = client_lock(self->client);
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_pg_send_params(self->l, PyBytes_AS_STRING(p.sql), p.n, p.types, p.values, p.lengths, p.formats,
                               0);
    PyThread_release_lock(lock);
    params_free(&p);
    if (rc != PB_OK)
        return raise_lease(self->l, rc, "send a query");
    Py_RETURN_NONE;
}

/* pg_poll(converters) -> (ready, result): pb_is_busy, then pb_pg_get_result
 * when it says ready.  (False, None): not yet, notification armed;
 * (True, result tuple): the next result; (True, None): every result sent so
 * far has been returned.  Raises LibError when no answer can come. */
static PyObject *Lease_pg_poll(LeaseObject *self, PyObject *args)
{
    PyObject *converters;
    if (!PyArg_ParseTuple(args, "O:pg_poll", &converters) || lease_check(self) < 0)
        return NULL;
    PyThread_type_lock lock = client_lock(self->client);
    pb_result *r = NULL;
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_is_busy(self->l);
    if (rc == 0)
        rc = pb_pg_get_result(self->l, &r);
    else if (rc == 1)
        rc = PB_EINPROGRESS;
    PyThread_release_lock(lock);
    if (rc == PB_EINPROGRESS)
        return Py_BuildValue("(OO)", Py_False, Py_None);
    if (rc != PB_OK)
        return raise_lib(rc, "read a result");
    if (!r)
        return Py_BuildValue("(OO)", Py_True, Py_None);
    PyObject *res = result_to_py(r, converters);
    pb_result_free(r);
    return res ? Py_BuildValue("(ON)", Py_True, res) : NULL;
}

/* ------------------------------------------------------------------- Redis */

typedef struct {
    int argc;
    const char **argv;
    size_t *lens;
    PyObject *keep;                 /* tuple of bytes */
} rargs;

static void rargs_free(rargs *a)
{
    PyMem_Free(a->argv);
    PyMem_Free(a->lens);
    Py_XDECREF(a->keep);
    memset(a, 0, sizeof *a);
}

static int rargs_fill(rargs *a, PyObject *args)
{
    memset(a, 0, sizeof *a);
    PyObject *seq = PySequence_Fast(args, "a Redis command must be a sequence of arguments");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0 || n > INT32_MAX) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "a Redis command needs at least one argument");
        return -1;
    }
    a->argc = (int)n;
    a->argv = PyMem_Calloc(n, sizeof *a->argv);
    a->lens = PyMem_Calloc(n, sizeof *a->lens);
    a->keep = PyTuple_New(n);
    if (!a->argv || !a->lens || !a->keep) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = as_bytes(PySequence_Fast_GET_ITEM(seq, i), "a Redis argument");
        if (!b) {
            Py_DECREF(seq);
            return -1;
        }
        PyTuple_SET_ITEM(a->keep, i, b);
        a->argv[i] = PyBytes_AS_STRING(b);
        a->lens[i] = (size_t)PyBytes_GET_SIZE(b);
    }
    Py_DECREF(seq);
    return 0;
}

/* A reply as redis-py's parser gives it: bytes (str with decode) for bulk
 * and status replies, int, None, list; an error reply becomes an instance of
 * err_cls (returned, not raised: inside a pipeline it is one result of
 * many). */
static PyObject *reply_to_py(const redisReply *r, int decode, PyObject *err_cls)
{
    switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
        if (decode)
            return PyUnicode_DecodeUTF8(r->str, (Py_ssize_t)r->len, "strict");
        return PyBytes_FromStringAndSize(r->str, (Py_ssize_t)r->len);
    case REDIS_REPLY_INTEGER:
        return PyLong_FromLongLong(r->integer);
    case REDIS_REPLY_NIL:
        Py_RETURN_NONE;
    case REDIS_REPLY_ARRAY: {
        PyObject *l = PyList_New((Py_ssize_t)r->elements);
        if (!l)
            return NULL;
        for (size_t i = 0; i < r->elements; i++) {
            PyObject *v = reply_to_py(r->element[i], decode, err_cls);
            if (!v) {
                Py_DECREF(l);
                return NULL;
            }
            PyList_SET_ITEM(l, (Py_ssize_t)i, v);
        }
        return l;
    }
    case REDIS_REPLY_ERROR: {
        PyObject *msg = PyUnicode_DecodeUTF8(r->str, (Py_ssize_t)r->len, "replace");
        if (!msg)
            return NULL;
        PyObject *e = PyObject_CallOneArg(err_cls, msg);
        Py_DECREF(msg);
        return e;
    }
    default:
        return raise_lib(PB_EPROTO, "decode a Redis reply (unknown reply type)");
    }
}

/* A list of the n replies reps[0..n) as reply_to_py gives them, or NULL
 * with the exception set.  The replies stay the caller's. */
static PyObject *replies_to_list(redisReply **reps, Py_ssize_t n, int decode, PyObject *err_cls)
{
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *v = reply_to_py(reps[i], decode, err_cls);
        if (!v)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* redis_pipeline(commands, decode, err_cls) -> list of replies: appends every
 * command (a sequence of str/bytes) and reads the replies in order. */
static PyObject *lease_redis_pipeline(LeaseObject *self, PyObject *cmds, int decode, PyObject *err_cls)
{
    PyObject *seq = PySequence_Fast(cmds, "commands must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    rargs *as = PyMem_Calloc(n ? n : 1, sizeof *as);
    redisReply **reps = PyMem_Calloc(n ? n : 1, sizeof *reps);
    PyObject *out = NULL;
    if (!as || !reps) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (rargs_fill(&as[i], PySequence_Fast_GET_ITEM(seq, i)) < 0)
            goto done;
    PyThread_type_lock lock = client_lock(self->client);
    int rc = PB_OK;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    for (Py_ssize_t i = 0; i < n && rc == PB_OK; i++)
        rc = pb_redis_append_command_argv(self->l, as[i].argc, as[i].argv, as[i].lens);
    for (Py_ssize_t i = 0; i < n && rc == PB_OK; i++)
        rc = pb_redis_get_reply(self->l, &reps[i]);
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    if (rc != PB_OK)
        raise_lease(self->l, rc, "run Redis commands");
    else
        out = replies_to_list(reps, n, decode, err_cls);
done:
    for (Py_ssize_t i = 0; i < n; i++) {
        if (as)
            rargs_free(&as[i]);
        if (reps && reps[i])
            freeReplyObject(reps[i]);
    }
    PyMem_Free(as);
    PyMem_Free(reps);
    Py_DECREF(seq);
    return out;
}

static PyObject *Lease_redis_pipeline(LeaseObject *self, PyObject *args)
{
    PyObject *cmds, *err_cls;
    int decode;
    if (!PyArg_ParseTuple(args, "OpO:redis_pipeline", &cmds, &decode, &err_cls) || lease_check(self) < 0)
        return NULL;
    return lease_redis_pipeline(self, cmds, decode, err_cls);
}

/* redis_command(pool, timeout_ms, args, decode, err_cls) -> reply: acquire a
 * lease of pool, run one command, release — all in one call without the
 * GIL, so a command costs one library round trip and no lease is ever held
 * between commands. */
static PyObject *Client_redis_command(ClientObject *self, PyObject *args)
{
    const char *pool;
    int timeout_ms, decode;
    PyObject *cmd, *err_cls;
    if (!PyArg_ParseTuple(args, "siOpO:redis_command", &pool, &timeout_ms, &cmd, &decode, &err_cls))
        return NULL;
    rargs a;
    if (rargs_fill(&a, cmd) < 0) {
        rargs_free(&a);
        return NULL;
    }
    PyThread_type_lock lock = client_lock(self);
    redisReply *rep = NULL;
    int rc, stage = 0;
    char why[128] = "";             /* pb_lease_error, kept past the release */
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    pb_lease *l = NULL;
    rc = pb_acquire(self->c, pool, timeout_ms, &l);
    if (rc == PB_OK) {
        stage = 1;
        rc = pb_redis_command_argv(l, a.argc, a.argv, a.lens, &rep);
        if (rc == PB_ETOOBIG)
            snprintf(why, sizeof why, "%s", pb_lease_error(l));
        pb_release(l);
    }
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    rargs_free(&a);
    if (rc == PB_ETOOBIG && why[0])
        return raise_text(rc, why, "run a Redis command");
    if (rc != PB_OK)
        return raise_lib(rc, stage ? "run a Redis command" : "acquire a lease");
    PyObject *out = reply_to_py(rep, decode, err_cls);
    freeReplyObject(rep);
    return out;
}

/* redis_send(args): pb_redis_send_argv (args a sequence of str/bytes). */
static PyObject *Lease_redis_send(LeaseObject *self, PyObject *args)
{
    PyObject *cmd;
    if (!PyArg_ParseTuple(args, "O:redis_send", &cmd) || lease_check(self) < 0)
        return NULL;
    rargs a;
    if (rargs_fill(&a, cmd) < 0) {
        rargs_free(&a);
        return NULL;
    }
    PyThread_type_lock lock = client_lock(self->client);
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_redis_send_argv(self->l, a.argc, a.argv, a.lens);
    PyThread_release_lock(lock);
    rargs_free(&a);
    if (rc != PB_OK)
        return raise_lease(self->l, rc, "send a Redis command");
    Py_RETURN_NONE;
}

/* The shared body of redis_poll and redis_poll_message: fn is
 * pb_redis_poll_reply or pb_redis_poll_message, fmt the argument format
 * (naming the method), what the LibError's "cannot <what>". */
static PyObject *redis_poll_with(LeaseObject *self, PyObject *args, int (*fn)(pb_lease *, redisReply **),
                                 const char *fmt, const char *what)
{
    PyObject *err_cls;
    int decode;
    if (!PyArg_ParseTuple(args, fmt, &decode, &err_cls) || lease_check(self) < 0)
        return NULL;
    PyThread_type_lock lock = client_lock(self->client);
    redisReply *rep = NULL;
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = fn(self->l, &rep);
    PyThread_release_lock(lock);
    if (rc == PB_EINPROGRESS)
        return Py_BuildValue("(OO)", Py_False, Py_None);
    if (rc != PB_OK)
        return raise_lib(rc, what);
    PyObject *v = reply_to_py(rep, decode, err_cls);
    freeReplyObject(rep);
    return v ? Py_BuildValue("(ON)", Py_True, v) : NULL;
}

/* redis_poll(decode, err_cls) -> (ready, reply): pb_redis_poll_reply.
 * (False, None): not yet, notification armed; (True, reply): the next
 * reply, as redis_pipeline gives it (an error reply is an err_cls
 * instance, returned).  Raises LibError (PB_EINVAL: nothing outstanding). */
static PyObject *Lease_redis_poll(LeaseObject *self, PyObject *args)
{
    return redis_poll_with(self, args, pb_redis_poll_reply, "pO:redis_poll", "read a Redis reply");
}

/* redis_poll_message(decode, err_cls) -> (ready, message):
 * pb_redis_poll_message.  (False, None): none yet, notification armed;
 * (True, [kind, ...]): the oldest message.  Raises LibError (PB_EINVAL:
 * nothing subscribed; PB_EBUSY: replies owed). */
static PyObject *Lease_redis_poll_message(LeaseObject *self, PyObject *args)
{
    return redis_poll_with(self, args, pb_redis_poll_message, "pO:redis_poll_message",
                           "read a Redis Pub/Sub message");
}

/* pg_poll_notify() -> (be_pid, channel, payload) or None: pb_pg_poll_notify.
 * None: none yet, notification armed.  Raises LibError (PB_EBUSY: results
 * owed on the lease). */
static PyObject *Lease_pg_poll_notify(LeaseObject *self, PyObject *noargs)
{
    (void)noargs;
    if (lease_check(self) < 0)
        return NULL;
    PyThread_type_lock lock = client_lock(self->client);
    pb_notify *n = NULL;
    PyThread_acquire_lock(lock, WAIT_LOCK);
    int rc = pb_pg_poll_notify(self->l, &n);
    PyThread_release_lock(lock);
    if (rc == PB_EINPROGRESS)
        Py_RETURN_NONE;
    if (rc != PB_OK)
        return raise_lib(rc, "read a PostgreSQL notification");
    /* Channel and payload are in the server's encoding: UTF-8 normally;
     * anything else is decoded with U+FFFD rather than lost. */
    const char *ch = pb_notify_channel(n), *pl = pb_notify_payload(n);
    PyObject *c = PyUnicode_DecodeUTF8(ch, (Py_ssize_t)strlen(ch), "replace");
    PyObject *p = c ? PyUnicode_DecodeUTF8(pl, (Py_ssize_t)strlen(pl), "replace") : NULL;
    PyObject *v = p ? Py_BuildValue("(iOO)", pb_notify_be_pid(n), c, p) : NULL;
    Py_XDECREF(c);
    Py_XDECREF(p);
    pb_notify_free(n);
    return v;
}

/* redis_exec(args, nreplies, decode, err_cls) -> [reply, ...]: one command
 * that answers nreplies times ((P|S)(UN)SUBSCRIBE: once per channel).
 * Pub/Sub messages that arrive meanwhile stay queued on the lease. */
static PyObject *Lease_redis_exec(LeaseObject *self, PyObject *args)
{
    PyObject *cmd, *err_cls;
    int decode;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OnpO:redis_exec", &cmd, &n, &decode, &err_cls) || lease_check(self) < 0)
        return NULL;
    if (n < 1 || n > 1024 * 1024)
        return raise_lib(PB_EINVAL, "run a Redis command (replies out of range)");
    rargs a;
    if (rargs_fill(&a, cmd) < 0) {
        rargs_free(&a);
        return NULL;
    }
    redisReply **reps = PyMem_Calloc((size_t)n, sizeof *reps);
    if (!reps) {
        rargs_free(&a);
        return PyErr_NoMemory();
    }
    PyThread_type_lock lock = client_lock(self->client);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    rc = pb_redis_append_command_argv(self->l, a.argc, a.argv, a.lens);
    for (Py_ssize_t i = 0; i < n && rc == PB_OK; i++)
        rc = pb_redis_get_reply(self->l, &reps[i]);
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    PyObject *out = rc == PB_OK ? replies_to_list(reps, n, decode, err_cls) : raise_lib(rc, "run a Redis command");
    for (Py_ssize_t i = 0; i < n; i++)
        if (reps[i])
            freeReplyObject(reps[i]);
    PyMem_Free(reps);
    rargs_free(&a);
    return out;
}

/* redis_get_message(timeout_ms, decode, err_cls) -> list or None:
 * pb_redis_get_message; None when none came within timeout_ms (keep it
 * short and loop: the GIL is released, but Ctrl-C is seen between calls).
 * Raises LibError (PB_EINVAL: nothing subscribed; PB_EBUSY: replies owed). */
static PyObject *Lease_redis_get_message(LeaseObject *self, PyObject *args)
{
    PyObject *err_cls;
    int decode, timeout_ms;
    if (!PyArg_ParseTuple(args, "ipO:redis_get_message", &timeout_ms, &decode, &err_cls) || lease_check(self) < 0)
        return NULL;
    PyThread_type_lock lock = client_lock(self->client);
    redisReply *rep = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(lock, WAIT_LOCK);
    rc = pb_redis_get_message(self->l, timeout_ms, &rep);
    PyThread_release_lock(lock);
    Py_END_ALLOW_THREADS
    if (rc == PB_ETIMEDOUT)
        Py_RETURN_NONE;
    if (rc != PB_OK)
        return raise_lib(rc, "wait for a Redis Pub/Sub message");
    PyObject *v = reply_to_py(rep, decode, err_cls);
    freeReplyObject(rep);
    return v;
}

/* ------------------------------------------------------------------- stats */

/* stats_json(shm_name, pool=None) -> str: the segment as shmstat --json
 * prints it (common/shmview*.c, the same reader). */
static PyObject *mod_stats_json(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *name, *pool = NULL;
    if (!PyArg_ParseTuple(args, "s|z:stats_json", &name, &pool))
        return NULL;
    shmview *v = NULL;
    char err[512] = "";
    int rc;
    char *buf = NULL;
    size_t len = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = shmview_load(name, pool, &v, err, sizeof err);
    if (rc == SHMVIEW_OK) {
        FILE *f = open_memstream(&buf, &len);
        if (f) {
            shmview_print_json(f, v);
            if (fclose(f) != 0) {
                free(buf);
                buf = NULL;
            }
        }
        shmview_free(v);
    }
    Py_END_ALLOW_THREADS
    if (rc == SHMVIEW_ENOPOOL)
        return PyErr_Format(PyExc_KeyError, "%s", err);
    if (rc != SHMVIEW_OK)
        return PyErr_Format(PyExc_OSError, "%s", err);
    if (!buf)
        return PyErr_NoMemory();
    PyObject *s = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)len, "replace");
    free(buf);
    return s;
}

static PyObject *mod_strerror(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(pb_strerror((int)code));
}

/* ------------------------------------------------------------------ module */

static PyMethodDef Client_methods[] = {
    { "acquire", (PyCFunction)(void (*)(void))Client_acquire, METH_VARARGS | METH_KEYWORDS,
      "acquire(pool, timeout_ms=-1) -> Lease\n\npb_acquire: lease a connection of pool; timeout_ms < 0 uses the "
      "pool's acquire_timeout_ms.  Raises LibError (PB_ETIMEDOUT, PB_ENOPOOL, ...)." },
    { "redis_command", (PyCFunction)Client_redis_command, METH_VARARGS,
      "redis_command(pool, timeout_ms, args, decode, err_cls) -> reply\n\nAcquire, run one Redis command, "
      "release." },
    { "fd", (PyCFunction)Client_fd, METH_NOARGS,
      "fd() -> int\n\npb_client_fd: readable when an armed non-blocking operation may have moved "
      "(for loop.add_reader); the same fd until fork()." },
    { "fd_polls", (PyCFunction)Client_fd_polls, METH_NOARGS,
      "fd_polls() -> bool\n\npb_client_fd_polls: True when fd() is the timerfd fallback." },
    { "consume", (PyCFunction)Client_consume, METH_NOARGS,
      "consume() -> int\n\npb_client_consume: reap the fd's notifications (never waits); then poll every "
      "operation in progress." },
    { "acquire_start", (PyCFunction)Client_acquire_start, METH_VARARGS,
      "acquire_start(pool) -> Lease or Acquiring\n\npb_acquire_start: a Lease when a slot is free now, "
      "else an Acquiring to poll.  Raises LibError." },
    { NULL, NULL, 0, NULL },
};

static PyMethodDef Lease_methods[] = {
    { "release", (PyCFunction)Lease_release, METH_NOARGS,
      "release() -> int\n\npb_release; 0, or PB_ESTALE when the broker had taken the lease back.  Idempotent." },
    { "take_notices", (PyCFunction)Lease_take_notices, METH_NOARGS,
      "take_notices() -> [str]: server notices since the last take (\"NOTICE:  msg\\n\")" },
    { "pg_exec", (PyCFunction)Lease_pg_exec, METH_VARARGS,
      "pg_exec(sql, converters) -> (status, fields, rows, cmd_status, cmd_tuples, error)" },
    { "pg_exec_params", (PyCFunction)Lease_pg_exec_params, METH_VARARGS,
      "pg_exec_params(sql, values, types, formats, converters) -> result tuple" },
    { "pg_pipeline", (PyCFunction)Lease_pg_pipeline, METH_VARARGS,
      "pg_pipeline([(sql, values, types, formats), ...], converters) -> [result tuple, ...]" },
    { "redis_pipeline", (PyCFunction)Lease_redis_pipeline, METH_VARARGS,
      "redis_pipeline([args, ...], decode, err_cls) -> [reply, ...]" },
    { "pg_send_query", (PyCFunction)Lease_pg_send_query, METH_VARARGS,
      "pg_send_query(sql): pb_pg_send_query (non-blocking)" },
    { "pg_send_params", (PyCFunction)Lease_pg_send_params, METH_VARARGS,
      "pg_send_params(sql, values, types, formats): pb_pg_send_params (non-blocking)" },
    { "pg_poll", (PyCFunction)Lease_pg_poll, METH_VARARGS,
      "pg_poll(converters) -> (ready, result tuple or None)\n\npb_is_busy + pb_pg_get_result: (False, None) "
      "not yet (armed), (True, None) all results returned." },
    { "redis_send", (PyCFunction)Lease_redis_send, METH_VARARGS,
      "redis_send(args): pb_redis_send_argv (non-blocking)" },
    { "redis_poll", (PyCFunction)Lease_redis_poll, METH_VARARGS,
      "redis_poll(decode, err_cls) -> (ready, reply)\n\npb_redis_poll_reply: (False, None) not yet (armed)." },
    { "redis_poll_message", (PyCFunction)Lease_redis_poll_message, METH_VARARGS,
      "redis_poll_message(decode, err_cls) -> (ready, message)\n\npb_redis_poll_message: (False, None) none "
      "yet (armed)." },
    { "pg_poll_notify", (PyCFunction)Lease_pg_poll_notify, METH_NOARGS,
      "pg_poll_notify() -> (be_pid, channel, payload) or None\n\npb_pg_poll_notify: None when none yet "
      "(armed)." },
    { "redis_exec", (PyCFunction)Lease_redis_exec, METH_VARARGS,
      "redis_exec(args, nreplies, decode, err_cls) -> [reply, ...]: a command answered nreplies times" },
    { "redis_get_message", (PyCFunction)Lease_redis_get_message, METH_VARARGS,
      "redis_get_message(timeout_ms, decode, err_cls) -> message or None: pb_redis_get_message" },
    { NULL, NULL, 0, NULL },
};

static PyGetSetDef Lease_getset[] = {
    { "released", (getter)Lease_get_released, NULL, "True once released", NULL },
    { "forked", (getter)Lease_get_forked, NULL, "True in a child forked after the lease was acquired", NULL },
    { "backend_pid", (getter)Lease_get_backend_pid, NULL, "backend process id, -1 if stale", NULL },
    { NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject ClientType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "poolbroker._poolbroker.Client",
    .tp_basicsize = sizeof(ClientObject),
    .tp_dealloc = (destructor)Client_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Client(socket=None): one attachment to the broker (pb_connect); socket None uses "
              "$POOLBROKER_SOCKET, else /run/poolbroker/poolbroker.sock.",
    .tp_methods = Client_methods,
    .tp_init = (initproc)Client_init,
    .tp_new = PyType_GenericNew,
};

static PyTypeObject LeaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "poolbroker._poolbroker.Lease",
    .tp_basicsize = sizeof(LeaseObject),
    .tp_dealloc = (destructor)Lease_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A leased backend connection (pb_lease); made by Client.acquire().",
    .tp_methods = Lease_methods,
    .tp_getset = Lease_getset,
};

static PyMethodDef Acquiring_methods[] = {
    { "poll", (PyCFunction)Acquiring_poll, METH_NOARGS,
      "poll() -> Lease or None\n\npb_acquire_poll: None while queued (armed); raises LibError for the error "
      "that ended it." },
    { "cancel", (PyCFunction)Acquiring_cancel, METH_NOARGS,
      "cancel(): pb_acquire_cancel; a slot granted meanwhile goes back.  Idempotent." },
    { NULL, NULL, 0, NULL },
};

static PyGetSetDef Acquiring_getset[] = {
    { "done", (getter)Acquiring_get_done, NULL, "True once polled to an end or cancelled", NULL },
    { NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject AcquiringType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "poolbroker._poolbroker.Acquiring",
    .tp_basicsize = sizeof(AcquiringObject),
    .tp_dealloc = (destructor)Acquiring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A pending non-blocking acquire (pb_acquiring); made by Client.acquire_start().  Dropping it "
              "cancels it.",
    .tp_methods = Acquiring_methods,
    .tp_getset = Acquiring_getset,
};

static PyMethodDef mod_methods[] = {
    { "stats_json", mod_stats_json, METH_VARARGS, "stats_json(shm_name, pool=None) -> str (shmstat --json)" },
    { "strerror", mod_strerror, METH_O, "strerror(code) -> str (pb_strerror)" },
    { NULL, NULL, 0, NULL },
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "poolbroker._poolbroker",
    "C core of poolbroker: Client (pb_client), Lease (pb_lease), stats_json.", -1, mod_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__poolbroker(void);
PyMODINIT_FUNC PyInit__poolbroker(void)
{
    if (PyType_Ready(&ClientType) < 0 || PyType_Ready(&LeaseType) < 0 || PyType_Ready(&AcquiringType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    static int atfork_done;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, on_fork_child) != 0) {
            Py_DECREF(m);
            return PyErr_Format(PyExc_ImportError, "pthread_atfork failed");
        }
        atfork_done = 1;
    }
    LibError = PyErr_NewExceptionWithDoc("poolbroker._poolbroker.LibError",
                                         "A libpoolbroker error: args are (code, pb_strerror(code), what).",
                                         PyExc_Exception, NULL);
    Py_INCREF(&ClientType);
    Py_INCREF(&LeaseType);
    if (!LibError || PyModule_AddObject(m, "LibError", LibError) < 0 ||
        PyModule_AddObject(m, "Client", (PyObject *)&ClientType) < 0 ||
        PyModule_AddObject(m, "Lease", (PyObject *)&LeaseType) < 0)
        goto fail;
    Py_INCREF(LibError);
    struct { const char *name; long v; } consts[] = {
        { "PB_OK", PB_OK }, { "PB_ETIMEDOUT", PB_ETIMEDOUT }, { "PB_ENOPOOL", PB_ENOPOOL },
        { "PB_EBROKER", PB_EBROKER }, { "PB_EBACKEND", PB_EBACKEND }, { "PB_ETOOBIG", PB_ETOOBIG },
        { "PB_ESTALE", PB_ESTALE }, { "PB_EINVAL", PB_EINVAL }, { "PB_ENOMEM", PB_ENOMEM },
        { "PB_ESHUTDOWN", PB_ESHUTDOWN }, { "PB_EPROTO", PB_EPROTO }, { "PB_ETYPE", PB_ETYPE },
        { "PB_EVERSION", PB_EVERSION }, { "PB_EPERM", PB_EPERM }, { "PB_EBUSY", PB_EBUSY },
        { "PB_ESERVER", PB_ESERVER }, { "PB_EINPROGRESS", PB_EINPROGRESS }, { "RES_COMMAND_OK", PB_RES_COMMAND_OK },
        { "RES_TUPLES_OK", PB_RES_TUPLES_OK }, { "RES_EMPTY_QUERY", PB_RES_EMPTY_QUERY },
        { "RES_ERROR", PB_RES_ERROR }, { "CONV_STR", CONV_STR }, { "CONV_INT", CONV_INT },
        { "CONV_FLOAT", CONV_FLOAT }, { "CONV_BOOL", CONV_BOOL },
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].v) < 0)
            goto fail;
    if (PyModule_AddStringConstant(m, "libpoolbroker_version", pb_version()) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
