/* localnet._fastcall.serve_calls: the callee's side of small calls, in C.
 *
 *   serve_calls(sock, buffer, max_frame, conn, server, watchdog, host) -> tuple
 *
 * The thread that holds a call connection's reading role
 * (_server._CallConnection.run) hands the connection to this loop while
 * nothing is buffered.  As long as each receive brings exactly one whole CALL,
 * or a TIMED_CALL whose deadline has not passed, without descriptors, it does
 * for each what the Python loop does, in the same order and under the same
 * locks:
 *
 *   conn.busy_since = time.monotonic(); watchdog.watch(conn) (its dict, and
 *   the method itself only while the watchdog sleeps); the call run as
 *   host.run_call(body, []) runs it -> (reply kind, bytes); the reply sent
 *   under conn.send_lock; then under conn.lock: the role still here and the
 *   connection open, busy_since = 0.0 (and server.call_finished() while the
 *   server closes).
 *
 * The call itself is run here too when it is plain (host.plain_calls, see
 * _receive.Receiver): a pickle that reads as (name, args, kwargs) of a
 * connection in the table, no dispatcher in the way, a slot free under
 * max_workers.  Then it counts and takes its slot, calls the function, and
 * answers with its encoded result as run_call would; a result that is not
 * plain or too large goes to host.finish(result, name, plain), an exception
 * to host.failed(exc).  Anything else about the call goes to run_call
 * whole, which answers it (an unreadable pickle, an unknown connection,
 * TooManyCalls) or runs it the other way.
 *
 * It returns, for the Python loop to go on, with
 *
 *   (kind, ident, body, fds)       a whole frame it leaves to Python: a control
 *                                  frame, an expired TIMED_CALL (its deadline
 *                                  still in front), any call while the server
 *                                  is stopping;
 *   (0, nbytes, fds, None)         anything else that arrived, as recv_frame
 *                                  returns it (nbytes 0: the end of the stream);
 *   (HANDED, generation, None, None)
 *                                  a call ran and its reply left, but the role
 *                                  moved on meanwhile or the connection closed;
 *   (SHARED, ident, (kind, payload), generation)
 *                                  a call ran whose result is not inline bytes
 *                                  (shared memory): Python sends it.
 *
 * Exceptions (OSError from the socket, an error inside the host's methods,
 * which themselves answer every handler's failure with an ERROR reply)
 * propagate with both locks released.
 */
#include "_frames.h"

#include <errno.h>
#include <string.h>

#define HANDED (-1)
#define SHARED (-2)

static PyObject *s_generation, *s_busy_since, *s_closed, *s_lock, *s_send_lock, *s_stopping,
    *s_closing, *s_call_finished, *s_busy, *s_awake, *s_watch, *s_acquire, *s_release,
    *s_run_call, *s_finish, *s_failed, *s_plain_calls, *s_dispatcher, *s_max_frame, *s_fileno,
    *s_spin, *zero, *one;

int
serve_init(PyObject *module)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    INTERN(s_generation, "generation");
    INTERN(s_busy_since, "busy_since");
    INTERN(s_closed, "closed");
    INTERN(s_lock, "lock");
    INTERN(s_send_lock, "send_lock");
    INTERN(s_stopping, "stopping");
    INTERN(s_closing, "closing");
    INTERN(s_call_finished, "call_finished");
    INTERN(s_busy, "_busy");
    INTERN(s_awake, "_awake");
    INTERN(s_watch, "watch");
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_run_call, "run_call");
    INTERN(s_finish, "finish");
    INTERN(s_failed, "failed");
    INTERN(s_plain_calls, "plain_calls");
    INTERN(s_dispatcher, "dispatcher");
    INTERN(s_max_frame, "max_frame");
    INTERN(s_fileno, "fileno");
    INTERN(s_spin, "spin");
#undef INTERN
    if ((zero = PyFloat_FromDouble(0.0)) == NULL || (one = PyLong_FromLong(1)) == NULL)
        return -1;
    return PyModule_AddIntConstant(module, "HANDED", HANDED) < 0
        || PyModule_AddIntConstant(module, "SHARED", SHARED) < 0 ? -1 : 0;
}

/* obj.name's truth: 1, 0, or -1 with an exception. */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* The socket's descriptor, asked each time as the Python reader does: once
 * another thread of the connection closed it, -1 and an OSError, instead of
 * a number the process may have given to a new socket since. */
static int
socket_fd(PyObject *sock)
{
    PyObject *number = PyObject_CallMethodNoArgs(sock, s_fileno);
    if (number == NULL)
        return -1;
    int fd;
    int rc = as_int(number, &fd);
    Py_DECREF(number);
    if (rc < 0)
        return -1;
    if (fd < 0) {  /* closed: what the system call on it would say */
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return fd;
}

/* Call a bound method without arguments; 0, or -1 with an exception. */
static int
call0(PyObject *method)
{
    PyObject *r = PyObject_CallNoArgs(method);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Release a lock whatever happened: an exception already set stays the one
 * raised.  Returns ``rc``, or -1 when only the release failed. */
static int
release(PyObject *method, int rc)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int failed = call0(method);
    if (type != NULL) {
        if (failed)
            PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return rc;
    }
    return failed ? -1 : rc;
}

/* What serve_calls fetches once, from its arguments and the host. */
typedef struct {
    PyObject *sock, *conn, *server, *watchdog, *host, *busy;
    PyObject *acquire, *release, *send_acquire, *send_release;
    PyObject *run_call, *finish, *failed;
    /* host.plain_calls: (connections, Dispatched, load, encode, encode_max, counts,
     * slots), borrowed from ``plain``; catalog NULL when it is None */
    PyObject *catalog, *dispatched, *load, *encode, *encode_max, *counts, *slots;
    PyObject *plain;
    Py_ssize_t max_frame;  /* host.max_frame: a reply's bound */
    double spin;  /* host.spin: seconds to poll for the next call before sleeping */
} Serving;

static void
serving_clear(Serving *s)
{
    Py_CLEAR(s->busy);
    Py_CLEAR(s->acquire);
    Py_CLEAR(s->release);
    Py_CLEAR(s->send_acquire);
    Py_CLEAR(s->send_release);
    Py_CLEAR(s->run_call);
    Py_CLEAR(s->finish);
    Py_CLEAR(s->failed);
    Py_CLEAR(s->plain);  /* (holds catalog ... slots) */
}

static int
lock_methods(PyObject *conn, PyObject *name, PyObject **acquire, PyObject **rel)
{
    PyObject *lock = PyObject_GetAttr(conn, name);
    if (lock == NULL)
        return -1;
    *acquire = PyObject_GetAttr(lock, s_acquire);
    *rel = *acquire == NULL ? NULL : PyObject_GetAttr(lock, s_release);
    Py_DECREF(lock);
    return *rel == NULL ? -1 : 0;
}

static int
serving_init(Serving *s, PyObject *const *args)
{
    s->sock = args[0];
    s->conn = args[3];
    s->server = args[4];
    s->watchdog = args[5];
    s->host = args[6];
    PyObject *spin = PyObject_GetAttr(s->host, s_spin);
    if (spin == NULL)
        return -1;
    s->spin = PyFloat_AsDouble(spin);
    Py_DECREF(spin);
    if (s->spin == -1.0 && PyErr_Occurred())
        return -1;
    s->busy = PyObject_GetAttr(s->watchdog, s_busy);
    if (s->busy == NULL)
        return -1;
    if (!PyDict_Check(s->busy)) {
        PyErr_SetString(PyExc_TypeError, "serve_calls: the watchdog's _busy is not a dict");
        return -1;
    }
    if (lock_methods(s->conn, s_lock, &s->acquire, &s->release) < 0
            || lock_methods(s->conn, s_send_lock, &s->send_acquire, &s->send_release) < 0
            || (s->run_call = PyObject_GetAttr(s->host, s_run_call)) == NULL
            || (s->plain = PyObject_GetAttr(s->host, s_plain_calls)) == NULL)
        return -1;
    if (s->plain == Py_None)
        return 0;
    if (!PyTuple_Check(s->plain) || PyTuple_GET_SIZE(s->plain) != 7
            || !PyDict_Check(PyTuple_GET_ITEM(s->plain, 0))
            || !PyList_CheckExact(PyTuple_GET_ITEM(s->plain, 5))
            || PyList_GET_SIZE(PyTuple_GET_ITEM(s->plain, 5)) < 1
            || !PyList_CheckExact(PyTuple_GET_ITEM(s->plain, 6))) {
        PyErr_SetString(PyExc_TypeError, "serve_calls: host.plain_calls is not (connections, "
                        "Dispatched, load, encode, encode_max, counts, slots)");
        return -1;
    }
    s->catalog = PyTuple_GET_ITEM(s->plain, 0);
    s->dispatched = PyTuple_GET_ITEM(s->plain, 1);
    s->load = PyTuple_GET_ITEM(s->plain, 2);
    s->encode = PyTuple_GET_ITEM(s->plain, 3);
    s->encode_max = PyTuple_GET_ITEM(s->plain, 4);
    s->counts = PyTuple_GET_ITEM(s->plain, 5);
    s->slots = PyTuple_GET_ITEM(s->plain, 6);
    PyObject *limit = PyObject_GetAttr(s->host, s_max_frame);
    if (limit == NULL)
        return -1;
    s->max_frame = PyLong_AsSsize_t(limit);
    Py_DECREF(limit);
    if (s->max_frame == -1 && PyErr_Occurred())
        return -1;
    if ((s->finish = PyObject_GetAttr(s->host, s_finish)) == NULL
            || (s->failed = PyObject_GetAttr(s->host, s_failed)) == NULL)
        return -1;
    return 0;
}

/* The answer to a plain call, as run_call gives it: called with the call's
 * slot taken.  NULL with an exception only when the host's own methods fail. */
static PyObject *
run_plain(Serving *s, PyObject *func, PyObject *name, PyObject *args, PyObject *kwargs)
{
    PyObject *result = PyObject_Call(func, args, PyDict_GET_SIZE(kwargs) ? kwargs : NULL);
    if (result == NULL) {  /* the handler raised: as run_call's except clause */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        PyObject *answer = PyObject_CallOneArg(s->failed, value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return answer;
    }
    PyObject *call_args[2] = {result, s->encode_max};
    PyObject *plain = PyObject_Vectorcall(s->encode, call_args, 2, NULL);
    if (plain == NULL)
        PyErr_Clear();  /* (it answers None for what it cannot encode; pickled then) */
    PyObject *answer = NULL;
    if (plain != NULL && PyBytes_CheckExact(plain) && PyBytes_GET_SIZE(plain) <= s->max_frame) {
        answer = Py_BuildValue("(iO)", KIND_REPLY, plain);
        if (answer == NULL) {
            Py_DECREF(plain);
            Py_DECREF(result);
            return NULL;
        }
    }
    if (answer == NULL) {
        PyObject *finish_args[3] = {result, name, plain != NULL ? plain : Py_None};
        answer = PyObject_Vectorcall(s->finish, finish_args, 3, NULL);
    }
    Py_XDECREF(plain);
    Py_DECREF(result);
    return answer;
}

/* Run the call in ``body`` here if it is plain.  1 with *answer set (NULL
 * with an exception), 0 when run_call must take it whole. */
static int
try_plain(Serving *s, PyObject *body, PyObject **answer)
{
    *answer = NULL;
    if (s->catalog == NULL || PyByteArray_GET_SIZE(body) == 0
            || (unsigned char)PyByteArray_AS_STRING(body)[0] != 0x80)
        return 0;
    PyObject *triple = PyObject_CallOneArg(s->load, body);
    if (triple == NULL) {
        PyErr_Clear();  /* run_call reads it again and says what is wrong */
        return 0;
    }
    int taken = 0;
    if (PyTuple_CheckExact(triple) && PyTuple_GET_SIZE(triple) == 3
            && PyUnicode_CheckExact(PyTuple_GET_ITEM(triple, 0))
            && PyTuple_CheckExact(PyTuple_GET_ITEM(triple, 1))
            && PyDict_CheckExact(PyTuple_GET_ITEM(triple, 2))
            && PyList_GET_SIZE(s->slots) > 0) {
        PyObject *name = PyTuple_GET_ITEM(triple, 0);
        PyObject *func = PyDict_GetItemWithError(s->catalog, name);  /* borrowed */
        PyObject *dispatcher = func == NULL ? NULL : PyObject_GetAttr(s->host, s_dispatcher);
        if (dispatcher != NULL && (dispatcher == Py_None
                                   || (PyObject *)Py_TYPE(func) == s->dispatched)) {
            /* as run_call: counted, a slot taken, and given back whatever happens */
            Py_ssize_t n = PyList_GET_SIZE(s->slots);
            PyObject *served = PyNumber_Add(PyList_GET_ITEM(s->counts, 0), one);
            if (served == NULL || PyList_SetItem(s->counts, 0, served) < 0
                    || PyList_SetSlice(s->slots, n - 1, n, NULL) < 0) {
                taken = 1;  /* *answer NULL: the exception */
            }
            else {
                Py_INCREF(func);
                *answer = run_plain(s, func, name, PyTuple_GET_ITEM(triple, 1),
                                    PyTuple_GET_ITEM(triple, 2));
                Py_DECREF(func);
                taken = 1;
                if (PyList_Append(s->slots, Py_None) < 0)
                    Py_CLEAR(*answer);
            }
        }
        Py_XDECREF(dispatcher);
        if (PyErr_Occurred() && !taken)
            PyErr_Clear();
    }
    Py_DECREF(triple);
    return taken;
}

/* Before the handler: busy_since, and the watchdog told.  0 or -1. */
static int
begin_call(Serving *s)
{
    PyObject *since = PyFloat_FromDouble(monotonic());
    if (since == NULL)
        return -1;
    int rc = PyObject_SetAttr(s->conn, s_busy_since, since);
    Py_DECREF(since);
    if (rc < 0 || PyDict_SetItem(s->busy, s->conn, Py_None) < 0)
        return -1;
    int awake = attr_true(s->watchdog, s_awake);
    if (awake < 0)
        return -1;
    if (!awake) {
        PyObject *r = PyObject_CallMethodOneArg(s->watchdog, s_watch, s->conn);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* Send an inline reply under the send lock.  0 or -1. */
static int
send_reply(Serving *s, PyObject *answer, unsigned long long ident)
{
    int kind, fd;
    if (as_int(PyTuple_GET_ITEM(answer, 0), &kind) < 0 || (fd = socket_fd(s->sock)) < 0
            || call0(s->send_acquire) < 0)
        return -1;
    Py_ssize_t sent;
    int err = 0;
    int rc = send_body(fd, kind, ident, PyTuple_GET_ITEM(answer, 1), -1.0, &sent, &err);
    if (rc == SEND_FAILED) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return release(s->send_release, rc == 0 ? 0 : -1);
}

/* After the reply, under the connection's lock: 1 to read on, 0 when the
 * role moved on or the connection closed, -1 with an exception. */
static int
end_call(Serving *s, PyObject *generation)
{
    if (call0(s->acquire) < 0)
        return -1;
    int go_on = 0;
    int closed = attr_true(s->conn, s_closed);
    if (closed == 0) {
        PyObject *now = PyObject_GetAttr(s->conn, s_generation);
        go_on = now == NULL ? -1 : PyObject_RichCompareBool(now, generation, Py_EQ);
        Py_XDECREF(now);
    }
    else if (closed < 0)
        go_on = -1;
    if (go_on == 1) {
        int closing;
        if (PyObject_SetAttr(s->conn, s_busy_since, zero) < 0
                || (closing = attr_true(s->server, s_closing)) < 0)
            go_on = -1;
        else if (closing) {
            PyObject *r = PyObject_CallMethodNoArgs(s->server, s_call_finished);
            if (r == NULL)
                go_on = -1;
            Py_XDECREF(r);
        }
    }
    return release(s->release, go_on);
}

/* The loop's step for one receive of ``n`` bytes in ``h``.  Returns NULL
 * with *stop set to 0 after a call that ran here (read on), or the tuple to
 * return (NULL with *stop set to 1: an exception). */
static PyObject *
step(Serving *s, const unsigned char *h, Py_ssize_t n, Fds *got, Py_ssize_t max_frame, int *stop)
{
    *stop = 1;
    if (!whole_frame(h, n, got, max_frame))
        return raw_receive(n, got);  /* as recv_frame: for the Python reader */
    int kind = h[1];
    uint32_t length = (uint32_t)(n - HEADER_SIZE);
    unsigned long long ident = get_u64(h + 8);
    int here = kind == KIND_CALL;
    if (kind == KIND_TIMED_CALL && length >= 8) {
        double deadline;
        memcpy(&deadline, h + HEADER_SIZE, 8);  /* f64, little-endian on Linux */
        here = monotonic() < deadline;
    }
    if (here) {
        int stopping = attr_true(s->server, s_stopping);
        if (stopping < 0)
            return NULL;
        here = !stopping;
    }
    /* a TIMED_CALL run here loses its deadline, as _wire.take_deadline does */
    Py_ssize_t skip = here && kind == KIND_TIMED_CALL ? 8 : 0;
    PyObject *body = PyByteArray_FromStringAndSize((const char *)h + HEADER_SIZE + skip,
                                                   length - skip);
    if (body == NULL)
        return NULL;
    if (!here)
        return Py_BuildValue("(iKN[])", kind, ident, body);
    PyObject *generation = PyObject_GetAttr(s->conn, s_generation);
    PyObject *answer = NULL;
    if (generation != NULL && begin_call(s) == 0 && !try_plain(s, body, &answer)) {
        PyObject *fds = PyList_New(0);
        PyObject *call_args[2] = {body, fds};
        answer = fds == NULL ? NULL : PyObject_Vectorcall(s->run_call, call_args, 2, NULL);
        Py_XDECREF(fds);
    }
    Py_DECREF(body);
    if (answer == NULL) {
        Py_XDECREF(generation);
        return NULL;
    }
    if (!PyTuple_Check(answer) || PyTuple_GET_SIZE(answer) != 2) {
        PyErr_SetString(PyExc_TypeError, "serve_calls: a call's answer must be (kind, payload)");
        Py_DECREF(answer);
        Py_DECREF(generation);
        return NULL;
    }
    if (!PyBytes_CheckExact(PyTuple_GET_ITEM(answer, 1)))
        return Py_BuildValue("(iKNN)", SHARED, ident, answer, generation);
    int rc = send_reply(s, answer, ident);
    Py_DECREF(answer);
    int go_on = rc < 0 ? -1 : end_call(s, generation);
    if (go_on < 0) {
        Py_DECREF(generation);
        return NULL;
    }
    if (!go_on)
        return Py_BuildValue("(iNOO)", HANDED, generation, Py_None, Py_None);
    Py_DECREF(generation);
    *stop = 0;
    return NULL;
}

PyObject *
serve_calls(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (arity("serve_calls", nargs, 7) < 0)
        return NULL;
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[2]);
    if (max_frame == -1 && PyErr_Occurred())
        return NULL;
    Serving s = {0};
    PyObject *result = NULL;
    Py_buffer buf = {0};
    if (serving_init(&s, args) < 0 || PyObject_GetBuffer(args[1], &buf, PyBUF_WRITABLE) < 0)
        goto done;
    serving(1);
    for (;;) {
        int fd = socket_fd(s.sock);
        if (fd < 0)
            break;
        Fds got = {.n = 0, .overflow = 0};
        /* one caller: its next call may come at once; several: they would
         * take each other's CPU while they poll */
        Py_ssize_t n = recv_some(fd, buf.buf, buf.len, -1.0, serving(0) == 1 ? s.spin : 0.0,
                                 &got);
        if (n == -100) {
            close_fds(&got);
            break;
        }
        int stop;
        calls_enter();
        result = step(&s, buf.buf, n, &got, max_frame, &stop);
        calls_leave();
        if (stop)
            break;
    }
    serving(-1);
done:
    if (buf.obj != NULL)
        PyBuffer_Release(&buf);
    serving_clear(&s);
    return result;
}

const char serve_calls_doc[] =
"serve_calls(sock, buffer, max_frame, conn, server, watchdog, host) -> tuple\n\n"
"Serve the plain calls that arrive on a call connection until something else\n"
"does; see the top of localnet/_fastserve.c for what it returns.";
