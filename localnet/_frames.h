/* What the translation units of localnet._fastcall share: the frame layout
 * (_wire.py documents it), the status codes its functions answer with, and
 * the helpers that read and write frames on a socket (_frames.c).
 *
 * Every helper is called with the GIL held; those that block let go of it
 * while they wait.  A return of -100 means a Python exception is set. */
#ifndef LOCALNET_FRAMES_H
#define LOCALNET_FRAMES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/socket.h>

#define VERSION 1
#define HEADER_SIZE 16
#define MAX_FDS 64
#define MAX_KIND 12
#define KIND_CALL 2
#define KIND_REPLY 3
#define KIND_TIMED_CALL 12
/* A reply body up to this size is read whole here; a larger one is handed
 * to the Python reader, which grows its buffer as the bytes arrive. */
#define SMALL_REPLY (256 * 1024)
#define STACK_READ 4096
/* threads of one process that may spin in recv_some at once */
#define MAX_SPINNERS 1

#define SEND_TIMEOUT (-1)
#define END_OF_STREAM (-2)
#define CUT_SHORT (-3)
#define RECV_TIMEOUT (-4)
#define BAD_HEADER (-5)
#define BAD_FDS (-6)
#define LARGE (-7)
#define SEND_FAILED (-8)

/* Descriptors that arrived, kept until their frame is complete. */
typedef struct {
    int fds[MAX_FDS + 8];
    int n;
    int overflow;  /* more than fit, or the kernel truncated them */
} Fds;

static inline void
put_u16(unsigned char *p, unsigned v) { p[0] = v & 0xff; p[1] = (v >> 8) & 0xff; }
static inline void
put_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (v >> (8 * i)) & 0xff; }
static inline void
put_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (v >> (8 * i)) & 0xff; }
static inline uint32_t
get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t
get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

/* 1 for the kinds that may carry descriptors (see _wire._FD_KINDS). */
int fd_kind(int kind);
/* obj as a C int; -1 with an exception when it is not one. */
int as_int(PyObject *obj, int *out);
/* CLOCK_MONOTONIC in seconds: what time.monotonic() reads. */
double monotonic(void);
void pack_header(unsigned char *h, int kind, unsigned nfds, uint32_t length, uint64_t ident);
void close_fds(Fds *got);
/* Wait for ``events`` until ``deadline`` (< 0: none): 1 ready, 0 at the
 * deadline, -1 with an exception. */
int wait_for(int fd, short events, double deadline);
/* Send every byte of iov: 0, SEND_TIMEOUT (*sent set), SEND_FAILED (*error
 * set), or -100. */
int send_all(int fd, struct iovec *iov, int iovcnt, double deadline, Py_ssize_t *sent,
             int *error);
/* A thread of this process begins or ends its part in a call (the caller's
 * round trip, the callee's run of one call): recv_some does not poll while
 * another thread is in one. */
void calls_enter(void);
void calls_leave(void);
/* Add ``change`` (1 or -1) to the threads serving a call connection in C
 * (serve_calls), and return their number. */
int serving(int change);
/* The threads of this process in calls, spinning, and serving in C. */
void calls_counts(int *calls, int *spinning, int *serving_now);
/* Once, at import: a forked child starts with the forking thread's part only. */
int calls_init(void);
/* One receive, polling for ``spin`` seconds first (0: none) before it blocks:
 * the bytes read (0 at the end of the stream), RECV_TIMEOUT, or -100. */
Py_ssize_t recv_some(int fd, char *buf, Py_ssize_t cap, double deadline, double spin,
                     Fds *got);
/* The descriptors as a new list (emptying ``got``); NULL with an exception. */
PyObject *fds_list(Fds *got);
/* (code, a, b, c), stealing a, b, c (NULL: None). */
PyObject *status(int code, PyObject *a, PyObject *b, PyObject *c);
/* 0 when nargs is want, else -1 with a TypeError naming ``name``. */
int arity(const char *name, Py_ssize_t nargs, Py_ssize_t want);
/* 1 when the ``n`` bytes received at ``h`` are exactly one whole frame with a
 * valid header and no descriptors. */
int whole_frame(const unsigned char *h, Py_ssize_t n, const Fds *got, Py_ssize_t max_frame);
/* A receive handed to the Python reader as it is: (0, n, fds, None), or
 * (0, -1, [], None) when the kernel truncated the descriptors (closed here). */
PyObject *raw_receive(Py_ssize_t n, Fds *got);
/* Send one frame of ``kind`` whose body is the buffer ``body`` (a TIMED_CALL
 * carries ``deadline`` in front of it); returns what send_all returns. */
int send_body(int fd, int kind, unsigned long long ident, PyObject *body, double deadline,
              Py_ssize_t *sent, int *err);

/* The callee's loop (_fastserve.c): its function, and what the module's
 * initialisation sets up for it. */
PyObject *serve_calls(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
extern const char serve_calls_doc[];
int serve_init(PyObject *module);

#endif
