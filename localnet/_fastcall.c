/* localnet._fastcall: the socket side of a small call, in C.
 *
 * Optional, like localnet._speedups: setup.py builds it when a compiler is
 * at hand, and localnet falls back to its Python framing (localnet/_wire.py)
 * without it.  The frames are the ones _wire.py documents: a 16-byte header
 * (version, kind, number of descriptors, body length, id; little-endian),
 * then the body; a TIMED_CALL's body starts with its deadline (f64 seconds
 * of CLOCK_MONOTONIC, which is what time.monotonic() reads).
 *
 *   roundtrip(fd, ident, payload, deadline, max_frame, spin=0.0) -> tuple
 *       Send one CALL (a TIMED_CALL when ``deadline`` is a float) and read
 *       the one frame that answers it: the caller's whole round trip in
 *       one call, with the GIL released while the socket blocks, and
 *       polled for ``spin`` seconds before it sleeps (recv_some).
 *   recv_frame(fd, buffer, max_frame) -> tuple
 *       One receive into ``buffer`` (a bytearray): a whole small frame, or
 *       the raw bytes for the Python reader to go on with.
 *   send_frame(fd, kind, ident, body) -> None
 *       Send one frame without descriptors, blocking until it is all sent.
 *   send_now(fd, data) -> int
 *       Send what the socket takes at once (MSG_DONTWAIT), 0 when it takes
 *       nothing, without letting go of the GIL (see localnet._courier).
 *   recv_now(fd, size) -> bytes | None
 *       Up to ``size`` bytes the socket holds now; b"" at its end, None when
 *       it holds nothing; without letting go of the GIL.
 *   serve_calls(sock, buffer, max_frame, conn, server, watchdog, host)
 *       The callee's side: a call connection's reading loop while the calls
 *       that arrive are plain (_fastserve.c).
 *   calls_state() -> (in_calls, spinning, serving)
 *       The counts that decide whether a receive polls before it sleeps.
 *
 * The helpers these share are in _frames.c (declared in _frames.h).
 *
 * roundtrip's answer is (kind, ident, body, fds) with kind > 0, or, when
 * it could not read a whole small reply, (status, a, b, c) with status < 0:
 *
 *   SEND_TIMEOUT (-1)  the deadline passed while sending; a = bytes sent
 *   EOF (-2)           the peer closed the connection before answering
 *   CUT_SHORT (-3)     the connection ended inside the reply
 *   RECV_TIMEOUT (-4)  the deadline passed while waiting for the reply
 *   BAD_HEADER (-5)    a = (version, kind, nfds, length): refused
 *   BAD_FDS (-6)       a = the reason (str); descriptors already closed
 *   LARGE (-7)         a = (kind, ident, nfds, length), b = the body's first
 *                      bytes, c = the descriptors received: a reply too
 *                      large for this path, for the Python reader to finish
 *   SEND_FAILED (-8)   a = the OSError: the connection was broken before
 *                      the request left (nothing of it was sent) or while
 *                      it left (b = bytes sent)
 *
 * A system call interrupted by a signal runs the Python signal handlers; if
 * one raises (KeyboardInterrupt), so does this function, wherever it was:
 * the connection is then unusable, as it is for the Python path.  Other
 * socket errors raise OSError.
 */
#include "_frames.h"

#include <errno.h>
#include <string.h>

/* Read one frame that answers a call: see the module comment. */
static PyObject *
read_reply(int fd, double deadline, double spin, Py_ssize_t max_frame)
{
    char head[STACK_READ];
    Fds got = {.n = 0, .overflow = 0};
    Py_ssize_t have = 0;
    while (have < HEADER_SIZE) {
        Py_ssize_t n = recv_some(fd, head + have, sizeof head - have, deadline,
                                 have ? 0.0 : spin, &got);
        if (n == -100)
            goto error;
        if (n == RECV_TIMEOUT) {
            close_fds(&got);
            return status(RECV_TIMEOUT, NULL, NULL, NULL);
        }
        if (n == 0) {
            close_fds(&got);
            return status(have ? CUT_SHORT : END_OF_STREAM, NULL, NULL, NULL);
        }
        have += n;
    }
    const unsigned char *h = (const unsigned char *)head;
    int version = h[0], kind = h[1];
    unsigned nfds = (unsigned)h[2] | (unsigned)h[3] << 8;
    uint32_t length = get_u32(h + 4);
    uint64_t ident = get_u64(h + 8);
    if (version != VERSION || kind < 1 || kind > MAX_KIND || (Py_ssize_t)length > max_frame
            || nfds > MAX_FDS) {
        close_fds(&got);
        return status(BAD_HEADER, Py_BuildValue("(iiIk)", version, kind, nfds,
                                                (unsigned long)length), NULL, NULL);
    }
    Py_ssize_t total = HEADER_SIZE + (Py_ssize_t)length;
    if (have > total) {
        close_fds(&got);
        return status(BAD_FDS, PyUnicode_FromString("more data after the answer to a call"),
                      NULL, NULL);
    }
    if (length > SMALL_REPLY) {
        PyObject *prefix = PyBytes_FromStringAndSize(head + HEADER_SIZE, have - HEADER_SIZE);
        if (prefix == NULL)
            goto error;
        PyObject *fds = fds_list(&got);
        if (fds == NULL) {
            Py_DECREF(prefix);
            return NULL;
        }
        return status(LARGE, Py_BuildValue("(iKIk)", kind, (unsigned long long)ident, nfds,
                                           (unsigned long)length), prefix, fds);
    }
    PyObject *body = PyBytes_FromStringAndSize(NULL, length);
    if (body == NULL)
        goto error;
    char *dst = PyBytes_AS_STRING(body);
    memcpy(dst, head + HEADER_SIZE, have - HEADER_SIZE);
    Py_ssize_t at = have - HEADER_SIZE;
    while (at < (Py_ssize_t)length) {
        /* the body is ours alone until returned: no other thread sees it */
        Py_ssize_t n = recv_some(fd, dst + at, length - at, deadline, 0.0, &got);
        if (n == -100) {
            Py_DECREF(body);
            goto error;
        }
        if (n == RECV_TIMEOUT || n == 0) {
            Py_DECREF(body);
            close_fds(&got);
            return status(n == 0 ? CUT_SHORT : RECV_TIMEOUT, NULL, NULL, NULL);
        }
        at += n;
    }
    if (got.overflow || got.n != (int)nfds || (got.n && !fd_kind(kind))) {
        Py_DECREF(body);
        PyObject *why = got.overflow
            ? PyUnicode_FromString("too many descriptors in one message")
            : PyUnicode_FromFormat("frame declares %u descriptors but %d arrived",
                                   nfds, got.n);
        close_fds(&got);
        return status(BAD_FDS, why, NULL, NULL);
    }
    PyObject *fds = fds_list(&got);
    if (fds == NULL) {
        Py_DECREF(body);
        return NULL;
    }
    return Py_BuildValue("(iKNN)", kind, (unsigned long long)ident, body, fds);
error:
    close_fds(&got);
    return NULL;
}

PyDoc_STRVAR(roundtrip_doc,
"roundtrip(fd, ident, payload, deadline, max_frame, spin=0.0) -> tuple\n\n"
"Send a CALL (a TIMED_CALL when deadline is a float) with id ``ident`` and\n"
"read the frame that answers it, polling for it ``spin`` seconds before\n"
"sleeping; see the module's source for the tuple.");

static PyObject *
send_and_read(PyObject *const *args, Py_ssize_t nargs);

static PyObject *
roundtrip(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    calls_enter();
    PyObject *answer = send_and_read(args, nargs);
    calls_leave();
    return answer;
}

static PyObject *
send_and_read(PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (nargs != 5 && nargs != 6) {
        PyErr_Format(PyExc_TypeError, "roundtrip() takes 5 or 6 arguments (%zd given)", nargs);
        return NULL;
    }
    if (as_int(args[0], &fd) < 0)
        return NULL;
    unsigned long long ident = PyLong_AsUnsignedLongLong(args[1]);
    if (ident == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    double deadline = -1.0;
    if (args[3] != Py_None) {
        deadline = PyFloat_AsDouble(args[3]);
        if (deadline == -1.0 && PyErr_Occurred())
            return NULL;
        if (deadline < 0)
            deadline = 0;  /* long past: the send is tried once, without waiting */
    }
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[4]);
    if (max_frame == -1 && PyErr_Occurred())
        return NULL;
    double spin = nargs == 6 ? PyFloat_AsDouble(args[5]) : 0.0;
    if (spin == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t sent;
    int err = 0;
    int rc = send_body(fd, deadline >= 0 ? KIND_TIMED_CALL : KIND_CALL, ident, args[2],
                       deadline, &sent, &err);
    if (rc == -100)
        return NULL;
    if (rc == SEND_TIMEOUT)
        return status(SEND_TIMEOUT, PyLong_FromSsize_t(sent), NULL, NULL);
    if (rc == SEND_FAILED) {
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
        if (exc == NULL)
            return NULL;
        return status(SEND_FAILED, exc, PyLong_FromSsize_t(sent), NULL);
    }
    return read_reply(fd, deadline, spin, max_frame);
}

PyDoc_STRVAR(recv_frame_doc,
"recv_frame(fd, buffer, max_frame) -> tuple\n\n"
"One receive into ``buffer`` (a bytearray).  When exactly one whole frame\n"
"without descriptors arrived and its header is valid: (kind, ident, body, [])\n"
"with body a bytearray.  Otherwise (0, nbytes, fds, None): the Python reader\n"
"goes on with buffer[:nbytes] (nbytes 0: the end of the stream; -1: the\n"
"kernel truncated the descriptors, which were closed).");

static PyObject *
recv_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (arity("recv_frame", nargs, 3) < 0 || as_int(args[0], &fd) < 0)
        return NULL;
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[2]);
    if (max_frame == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[1], &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    Fds got = {.n = 0, .overflow = 0};
    Py_ssize_t n = recv_some(fd, buf.buf, buf.len, -1.0, 0.0, &got);
    if (n == -100) {
        PyBuffer_Release(&buf);
        close_fds(&got);
        return NULL;
    }
    const unsigned char *h = buf.buf;
    if (whole_frame(h, n, &got, max_frame)) {
        PyObject *body = PyByteArray_FromStringAndSize((char *)h + HEADER_SIZE,
                                                       n - HEADER_SIZE);
        PyBuffer_Release(&buf);
        if (body == NULL)
            return NULL;
        return Py_BuildValue("(iKN[])", h[1], (unsigned long long)get_u64(h + 8), body);
    }
    PyBuffer_Release(&buf);
    return raw_receive(n, &got);
}

PyDoc_STRVAR(send_frame_doc,
"send_frame(fd, kind, ident, body) -> None\n\n"
"Send one frame without descriptors, blocking until every byte is sent\n"
"(a socket timeout is not looked at: localnet's sockets have none).\n"
"Raises OSError when the socket is broken.");

static PyObject *
send_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, kind;
    if (arity("send_frame", nargs, 4) < 0 || as_int(args[0], &fd) < 0
            || as_int(args[1], &kind) < 0)
        return NULL;
    unsigned long long ident = PyLong_AsUnsignedLongLong(args[2]);
    if (ident == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t sent;
    int err = 0;
    int rc = send_body(fd, kind, ident, args[3], -1.0, &sent, &err);
    if (rc == -100)
        return NULL;
    if (rc == SEND_FAILED) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(send_now_doc,
"send_now(fd, data) -> int\n\n"
"Send as much of ``data`` as the socket takes at once, without waiting and\n"
"without letting go of the GIL: the number of bytes sent, 0 when it is full.\n"
"Raises OSError when the socket is broken.");

static PyObject *
send_now(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    if (arity("send_now", nargs, 2) < 0 || as_int(args[0], &fd) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    ssize_t sent;
    do {
        sent = send(fd, view.buf, (size_t)view.len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    int err = errno;
    PyBuffer_Release(&view);
    if (sent < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK)
            return PyLong_FromLong(0);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(sent);
}

PyDoc_STRVAR(recv_now_doc,
"recv_now(fd, size) -> bytes | None\n\n"
"Up to ``size`` bytes the socket holds now, without waiting and without\n"
"letting go of the GIL: b\"\" at the end of the stream, None when it holds\n"
"nothing.  Raises OSError when the socket is broken.");

static PyObject *
recv_now(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, size;
    if (arity("recv_now", nargs, 2) < 0 || as_int(args[0], &fd) < 0
            || as_int(args[1], &size) < 0)
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "recv_now: a negative size");
        return NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL)
        return NULL;
    ssize_t got;
    do {
        got = recv(fd, PyBytes_AS_STRING(data), (size_t)size, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        int err = errno;
        Py_DECREF(data);
        if (err == EAGAIN || err == EWOULDBLOCK)
            Py_RETURN_NONE;
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (got < size && _PyBytes_Resize(&data, got) < 0)
        return NULL;
    return data;
}

PyDoc_STRVAR(calls_state_doc,
"calls_state() -> (in_calls, spinning, serving)\n\n"
"The threads of this process in a call (as its caller in roundtrip, or its\n"
"callee running it in serve_calls), polling a socket, and serving a call\n"
"connection in serve_calls: what decides whether a receive polls first.");

static PyObject *
calls_state(PyObject *module, PyObject *unused)
{
    int calls, spinning, serving_now;
    calls_counts(&calls, &spinning, &serving_now);
    return Py_BuildValue("(iii)", calls, spinning, serving_now);
}

static PyMethodDef methods[] = {
    {"calls_state", calls_state, METH_NOARGS, calls_state_doc},
    {"send_now", (PyCFunction)(void (*)(void))send_now, METH_FASTCALL, send_now_doc},
    {"recv_now", (PyCFunction)(void (*)(void))recv_now, METH_FASTCALL, recv_now_doc},
    {"roundtrip", (PyCFunction)(void (*)(void))roundtrip, METH_FASTCALL, roundtrip_doc},
    {"recv_frame", (PyCFunction)(void (*)(void))recv_frame, METH_FASTCALL, recv_frame_doc},
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL, send_frame_doc},
    {"serve_calls", (PyCFunction)(void (*)(void))serve_calls, METH_FASTCALL, serve_calls_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "localnet._fastcall",
    "The socket side of a small call, in C (optional; see localnet._wire).", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastcall(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "SEND_TIMEOUT", SEND_TIMEOUT) < 0
            || PyModule_AddIntConstant(m, "EOF", END_OF_STREAM) < 0
            || PyModule_AddIntConstant(m, "CUT_SHORT", CUT_SHORT) < 0
            || PyModule_AddIntConstant(m, "RECV_TIMEOUT", RECV_TIMEOUT) < 0
            || PyModule_AddIntConstant(m, "BAD_HEADER", BAD_HEADER) < 0
            || PyModule_AddIntConstant(m, "BAD_FDS", BAD_FDS) < 0
            || PyModule_AddIntConstant(m, "LARGE", LARGE) < 0
            || PyModule_AddIntConstant(m, "SEND_FAILED", SEND_FAILED) < 0
            || PyModule_AddIntConstant(m, "SMALL_REPLY", SMALL_REPLY) < 0
            || serve_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (calls_init() < 0) {
        PyErr_SetString(PyExc_RuntimeError, "localnet._fastcall: pthread_atfork failed");
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
