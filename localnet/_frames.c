/* localnet._fastcall's shared helpers: framing, descriptors and the socket
 * calls both sides of a small call use (see _frames.h). */
#include "_frames.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <string.h>
#include <time.h>

/* kinds that may carry descriptors (see _wire._FD_KINDS) */
int
fd_kind(int kind)
{
    return kind == 2 || kind == 3 || kind == 5 || kind == 12;
}

int
as_int(PyObject *obj, int *out)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value out of range for a C int");
        return -1;
    }
    *out = (int)v;
    return 0;
}

double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void
pack_header(unsigned char *h, int kind, unsigned nfds, uint32_t length, uint64_t ident)
{
    h[0] = VERSION;
    h[1] = (unsigned char)kind;
    put_u16(h + 2, nfds);
    put_u32(h + 4, length);
    put_u64(h + 8, ident);
}

void
close_fds(Fds *got)
{
    for (int i = 0; i < got->n; i++)
        close(got->fds[i]);
    got->n = 0;
}

/* Keep the descriptors a message brought (SCM_RIGHTS). */
void
take_fds(struct msghdr *msg, Fds *got)
{
    if (msg->msg_flags & MSG_CTRUNC)
        got->overflow = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *data = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (got->n < (int)(sizeof got->fds / sizeof got->fds[0]))
                got->fds[got->n++] = data[i];
            else {
                close(data[i]);
                got->overflow = 1;
            }
        }
    }
}

/* Wait for ``events`` on fd until ``deadline`` (< 0: none, wait on).  Returns 1 when
 * ready, 0 at the deadline, -1 with a Python exception set (a signal handler
 * raised, or poll failed).  Called with the GIL held. */
int
wait_for(int fd, short events, double deadline)
{
    for (;;) {
        /* past the deadline: one look without waiting, as the Python reader;
         * no deadline (< 0): wait as long as it takes */
        double left = deadline < 0 ? 1.0 : deadline - monotonic();
        struct pollfd p = {fd, events, 0};
        int ms = deadline < 0 ? -1 : left > 0 ? (int)ceil(left * 1000.0) : 0, rc, err;
        Py_BEGIN_ALLOW_THREADS
        rc = poll(&p, 1, ms);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc > 0)
            return 1;
        if (rc == 0 && left <= 0)
            return 0;
        if (rc < 0) {
            errno = err;
            if (err != EINTR) {
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            if (PyErr_CheckSignals() < 0)
                return -1;
        }
    }
}

/* Send every byte of ``iov``; with a deadline (>= 0) each send is
 * non-blocking and a full buffer is waited on until then.  Returns 0 when
 * sent, SEND_TIMEOUT (with *sent set), SEND_FAILED (with *err set: the
 * socket is broken), or -100 with a Python exception. */
int
send_all(int fd, struct iovec *iov, int iovcnt, double deadline, Py_ssize_t *sent, int *error)
{
    int flags = MSG_NOSIGNAL | (deadline >= 0 ? MSG_DONTWAIT : 0);
    *sent = 0;
    while (iovcnt > 0) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = iovcnt;
        ssize_t n;
        int err;
        Py_BEGIN_ALLOW_THREADS
        n = sendmsg(fd, &msg, flags);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return -100;
                continue;
            }
            if (err == EAGAIN || err == EWOULDBLOCK) {
                /* a full buffer (with a deadline), or a non-blocking socket */
                int ready = wait_for(fd, POLLOUT, deadline);
                if (ready < 0)
                    return -100;
                if (ready == 0)
                    return SEND_TIMEOUT;
                continue;
            }
            *error = err;
            return SEND_FAILED;
        }
        *sent += n;
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= n;
        }
    }
    return 0;
}

/* One receive into buf[0:cap]; descriptors go to ``got``.  Returns the
 * bytes read (0 at the end of the stream), RECV_TIMEOUT, or -100 with a
 * Python exception. */
Py_ssize_t
recv_some(int fd, char *buf, Py_ssize_t cap, double deadline, Fds *got)
{
    union {
        char space[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    for (;;) {
        if (deadline >= 0) {
            int ready = wait_for(fd, POLLIN, deadline);
            if (ready < 0)
                return -100;
            if (ready == 0)
                return RECV_TIMEOUT;
        }
        struct iovec iov = {buf, (size_t)cap};
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        ssize_t n;
        int err;
        Py_BEGIN_ALLOW_THREADS
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return -100;
                continue;
            }
            if (err == EAGAIN || err == EWOULDBLOCK) {
                /* woken but nothing to read after all, or a non-blocking
                 * socket: wait (the deadline's wait is at the loop's top) */
                if (deadline < 0 && wait_for(fd, POLLIN, -1.0) < 0)
                    return -100;
                continue;
            }
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -100;
        }
        take_fds(&msg, got);
        return n;
    }
}

PyObject *
fds_list(Fds *got)
{
    PyObject *list = PyList_New(got->n);
    if (list == NULL) {
        close_fds(got);
        return NULL;
    }
    for (int i = 0; i < got->n; i++) {
        PyObject *v = PyLong_FromLong(got->fds[i]);
        if (v == NULL) {
            for (int j = i; j < got->n; j++)
                close(got->fds[j]);
            got->n = 0;
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    got->n = 0;
    return list;
}

PyObject *
status(int code, PyObject *a, PyObject *b, PyObject *c)
{
    /* steals a, b, c (NULL: None) */
    PyObject *t = Py_BuildValue("(iNNN)", code, a ? a : Py_NewRef(Py_None),
                                b ? b : Py_NewRef(Py_None), c ? c : Py_NewRef(Py_None));
    return t;
}

/* 0 when ``nargs`` is ``want``, else -1 with a TypeError naming ``name``. */
int
arity(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
    return -1;
}

/* Send one frame of ``kind`` whose body is the buffer ``body`` (a TIMED_CALL
 * carries ``deadline`` in front of it); returns what send_all returns. */
int
send_body(int fd, int kind, unsigned long long ident, PyObject *body, double deadline,
          Py_ssize_t *sent, int *err)
{
    Py_buffer view;
    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0)
        return -100;
    unsigned char head[HEADER_SIZE + 8];
    Py_ssize_t extra = kind == KIND_TIMED_CALL ? 8 : 0;
    if (view.len + extra > 0xffffffffLL) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_OverflowError, "a frame body is at most 4 GiB");
        return -100;
    }
    pack_header(head, kind, 0, (uint32_t)(view.len + extra), ident);
    if (extra)
        memcpy(head + HEADER_SIZE, &deadline, 8);  /* f64, little-endian on Linux */
    struct iovec iov[2] = {{head, (size_t)(HEADER_SIZE + extra)}, {view.buf, (size_t)view.len}};
    int rc = send_all(fd, iov, view.len ? 2 : 1, deadline, sent, err);
    PyBuffer_Release(&view);
    return rc;
}

int
whole_frame(const unsigned char *h, Py_ssize_t n, const Fds *got, Py_ssize_t max_frame)
{
    if (n < HEADER_SIZE || got->n != 0 || got->overflow)
        return 0;
    uint32_t length = get_u32(h + 4);
    return h[0] == VERSION && h[1] >= 1 && h[1] <= MAX_KIND && h[2] == 0 && h[3] == 0
        && (Py_ssize_t)length <= max_frame && HEADER_SIZE + (Py_ssize_t)length == n;
}

PyObject *
raw_receive(Py_ssize_t n, Fds *got)
{
    if (got->overflow) {
        /* as the Python reader does: the connection is refused */
        close_fds(got);
        return Py_BuildValue("(in[]O)", 0, (Py_ssize_t)-1, Py_None);
    }
    PyObject *fds = fds_list(got);
    if (fds == NULL)
        return NULL;
    return Py_BuildValue("(inNO)", 0, n, fds, Py_None);
}
