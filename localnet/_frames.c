/* localnet._fastcall's shared helpers: framing, descriptors and the socket
 * calls both sides of a small call use (see _frames.h). */
#include "_frames.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
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

/* Threads of this process spinning in recv_some now (at most MAX_SPINNERS),
 * those in a call, as its caller or its callee (calls_enter), and those
 * serving a call connection (serving); this thread's own part in calls. */
static int spinners, in_calls, servers;
static _Thread_local int own_calls;
/* This thread's spins: after one in vain it skips the next ``backoff``
 * (doubling up to MAX_BACKOFF), so a thread whose answers come late seldom
 * polls for them; one answered in time starts over. */
static _Thread_local unsigned skip, backoff;
#define MAX_BACKOFF 64

int
serving(int change)
{
    return __atomic_add_fetch(&servers, change, __ATOMIC_RELAXED);
}

void
calls_enter(void)
{
    own_calls++;
    __atomic_add_fetch(&in_calls, 1, __ATOMIC_RELAXED);
}

void
calls_leave(void)
{
    own_calls--;
    __atomic_sub_fetch(&in_calls, 1, __ATOMIC_RELAXED);
}

/* A child forked while other threads were in calls has only the forking
 * thread: their parts are not its. */
static void
forked(void)
{
    in_calls = own_calls;
    spinners = servers = 0;
}

void
calls_counts(int *calls, int *spinning, int *serving_now)
{
    *calls = __atomic_load_n(&in_calls, __ATOMIC_RELAXED);
    *spinning = __atomic_load_n(&spinners, __ATOMIC_RELAXED);
    *serving_now = __atomic_load_n(&servers, __ATOMIC_RELAXED);
}

int
calls_init(void)
{
    return pthread_atfork(NULL, NULL, forked) == 0 ? 0 : -1;
}

/* No other thread of this process is in a call: a thread that polls while
 * others have work would take their CPU. */
static int
alone(void)
{
    return __atomic_load_n(&in_calls, __ATOMIC_RELAXED) <= own_calls;
}

/* Room for the descriptors of one message. */
typedef union {
    char space[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct cmsghdr align;
} Control;

/* The header of one receive into buf[0:cap], its descriptors into ``control``. */
static void
message(struct msghdr *msg, struct iovec *iov, char *buf, Py_ssize_t cap, Control *control)
{
    iov->iov_base = buf;
    iov->iov_len = (size_t)cap;
    memset(msg, 0, sizeof *msg);
    msg->msg_iov = iov;
    msg->msg_iovlen = 1;
    msg->msg_control = control->space;
    msg->msg_controllen = sizeof control->space;
}

/* The spin of recv_some: non-blocking receives, the CPU offered to anyone
 * else runnable between them (sched_yield), until data comes, ``until``
 * (CLOCK_MONOTONIC seconds) passes or another thread of the process begins
 * a call.  Returns what recvmsg last returned, with its errno in *err; -1
 * with EAGAIN when nothing came.  Called without the GIL. */
static ssize_t
spin_recv(int fd, struct msghdr *msg, double until, int *err)
{
    ssize_t n;
    do {
        n = recvmsg(fd, msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        *err = errno;
        if (n >= 0 || (*err != EAGAIN && *err != EWOULDBLOCK))
            return n;
        sched_yield();
    } while (monotonic() < until && alone());
    return n;
}

/* recv_some's polling, when this thread may: the bytes read, NOTHING_YET
 * (nothing came, or it did not poll), or -100 with a Python exception. */
#define NOTHING_YET (-1)
static Py_ssize_t
poll_first(int fd, char *buf, Py_ssize_t cap, double deadline, double spin, Fds *got)
{
    if (spin <= 0 || !alone())
        return NOTHING_YET;
    if (skip > 0) {
        skip--;
        return NOTHING_YET;
    }
    if (__atomic_add_fetch(&spinners, 1, __ATOMIC_RELAXED) > MAX_SPINNERS) {
        __atomic_sub_fetch(&spinners, 1, __ATOMIC_RELAXED);
        return NOTHING_YET;
    }
    Control control;
    struct iovec iov;
    struct msghdr msg;
    message(&msg, &iov, buf, cap, &control);
    ssize_t n;
    int err;
    Py_BEGIN_ALLOW_THREADS
    double until = monotonic() + spin;
    n = spin_recv(fd, &msg, deadline >= 0 && deadline < until ? deadline : until, &err);
    Py_END_ALLOW_THREADS
    __atomic_sub_fetch(&spinners, 1, __ATOMIC_RELAXED);
    if (n >= 0) {
        backoff = 0;
        take_fds(&msg, got);
        return n;
    }
    if (err == EAGAIN || err == EWOULDBLOCK) {
        backoff = backoff ? (backoff < MAX_BACKOFF ? 2 * backoff : MAX_BACKOFF) : 1;
        skip = backoff;
    }
    else if (err != EINTR) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -100;
    }
    /* a signal that came while this thread ran would not interrupt the
     * blocking receive that follows: its handlers run now */
    return PyErr_CheckSignals() < 0 ? -100 : NOTHING_YET;
}

/* One receive into buf[0:cap]; descriptors go to ``got``.  With ``spin`` > 0
 * (seconds) it first polls the socket for that long (no longer than the
 * deadline) before it blocks, unless another thread of the process is in a
 * call or MAX_SPINNERS threads poll already: an answer that comes meanwhile
 * is taken by a running thread, with no wake-up of a sleeping one (the
 * README's Performance).  Returns the bytes read (0 at the end of the
 * stream), RECV_TIMEOUT, or -100 with a Python exception. */
Py_ssize_t
recv_some(int fd, char *buf, Py_ssize_t cap, double deadline, double spin, Fds *got)
{
    Py_ssize_t polled = poll_first(fd, buf, cap, deadline, spin, got);
    if (polled != NOTHING_YET)
        return polled;
    Control control;
    for (;;) {
        if (deadline >= 0) {
            int ready = wait_for(fd, POLLIN, deadline);
            if (ready < 0)
                return -100;
            if (ready == 0)
                return RECV_TIMEOUT;
        }
        struct iovec iov;
        struct msghdr msg;
        message(&msg, &iov, buf, cap, &control);
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
