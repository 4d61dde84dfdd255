/* localnet._speedups: the event trigger's item encoder, and a guard for the
 * unpickler, in C.
 *
 * Optional: setup.py builds it when a compiler is at hand, and localnet runs
 * without it (localnet/_serial.py then pickles every event with the C
 * pickler, and unpickles without the guard).  Two functions; the first:
 *
 *   encode_item(name, args, kwargs, limit) -> bytes | None
 *
 * The bytes are an *item*: the protocol-3 pickle of ``(name, args, kwargs)``
 * without its PROTO opcode and STOP, as ``pickle.dumps(triple, 3)[2:-1]``
 * would give, but written without a memo (no BINPUT), so any number of items
 * can stand back to back inside one pickled list (_wire.pack_items).
 *
 * Only values whose pickle is unambiguous are encoded: exact None, bool,
 * int (64-bit), float, str, bytes, and tuples, lists and dicts of those
 * (dict keys: exact str, int, float, bytes, bool or None).  Anything else -
 * a subclass, a set, a NumPy array, a function, a list that appears twice
 * (pickle would keep it one object), nesting deeper than MAX_DEPTH - and an
 * item longer than ``limit`` bytes return None: the caller pickles the
 * event itself, which keeps pickle's exact semantics.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_DEPTH 8
#define MAX_SEEN 64

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    Py_ssize_t limit;
    char local[512];
    PyObject *seen[MAX_SEEN]; /* lists and dicts met so far (borrowed) */
    int nseen;
} Writer;

/* 0 on success, -1 when the item would exceed its limit (or memory ran out,
 * with an exception set). */
static int
reserve(Writer *w, Py_ssize_t n)
{
    if (w->len + n <= w->cap)
        return 0;
    if (w->len + n > w->limit)
        return -1;
    Py_ssize_t cap = w->cap * 2;
    while (cap < w->len + n)
        cap *= 2;
    char *grown;
    if (w->buf == w->local) {
        grown = PyMem_Malloc(cap);
        if (grown != NULL)
            memcpy(grown, w->local, w->len);
    }
    else {
        grown = PyMem_Realloc(w->buf, cap);
    }
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->buf = grown;
    w->cap = cap;
    return 0;
}

static inline int
put1(Writer *w, char c)
{
    if (reserve(w, 1) < 0)
        return -1;
    w->buf[w->len++] = c;
    return 0;
}

static inline int
put(Writer *w, const char *s, Py_ssize_t n)
{
    if (reserve(w, n) < 0)
        return -1;
    memcpy(w->buf + w->len, s, n);
    w->len += n;
    return 0;
}

static inline void
le32(char *out, uint32_t v)
{
    out[0] = (char)(v & 0xff);
    out[1] = (char)((v >> 8) & 0xff);
    out[2] = (char)((v >> 16) & 0xff);
    out[3] = (char)((v >> 24) & 0xff);
}

static int
put_sized(Writer *w, char small_op, char big_op, const char *data, Py_ssize_t n)
{
    char head[5];
    if (n < 256 && small_op) {
        head[0] = small_op;
        head[1] = (char)n;
        if (put(w, head, 2) < 0)
            return -1;
    }
    else {
        if (n > 0xffffffffLL)
            return -1;
        head[0] = big_op;
        le32(head + 1, (uint32_t)n);
        if (put(w, head, 5) < 0)
            return -1;
    }
    return put(w, data, n);
}

static int
put_long(Writer *w, PyObject *obj)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    char out[10];
    if (v >= 0 && v < 256) {
        out[0] = 'K'; /* BININT1 */
        out[1] = (char)v;
        return put(w, out, 2);
    }
    if (v >= 0 && v < 65536) {
        out[0] = 'M'; /* BININT2 */
        out[1] = (char)(v & 0xff);
        out[2] = (char)(v >> 8);
        return put(w, out, 3);
    }
    if (v >= -2147483648LL && v <= 2147483647LL) {
        out[0] = 'J'; /* BININT: signed, little-endian */
        le32(out + 1, (uint32_t)(int32_t)v);
        return put(w, out, 5);
    }
    /* LONG1: eight bytes of two's complement, little-endian */
    unsigned long long u = (unsigned long long)v;
    out[0] = (char)0x8a;
    out[1] = 8;
    for (int i = 0; i < 8; i++)
        out[2 + i] = (char)((u >> (8 * i)) & 0xff);
    return put(w, out, 10);
}

static int
put_float(Writer *w, PyObject *obj)
{
    char out[9];
    out[0] = 'G'; /* BINFLOAT: big-endian IEEE 754 double */
#if PY_VERSION_HEX >= 0x030B0000
    if (PyFloat_Pack8(PyFloat_AS_DOUBLE(obj), out + 1, 0) < 0) {
#else
    if (_PyFloat_Pack8(PyFloat_AS_DOUBLE(obj), (unsigned char *)out + 1, 0) < 0) {
#endif
        PyErr_Clear();
        return -1;
    }
    return put(w, out, 9);
}

static int
put_str(Writer *w, PyObject *obj)
{
    Py_ssize_t n;
    const char *data = PyUnicode_AsUTF8AndSize(obj, &n);
    if (data == NULL) { /* lone surrogates: the pickler encodes those */
        PyErr_Clear();
        return -1;
    }
    return put_sized(w, 0, 'X', data, n); /* BINUNICODE */
}

static int
remember(Writer *w, PyObject *obj)
{
    for (int i = 0; i < w->nseen; i++) {
        if (w->seen[i] == obj)
            return -1; /* shared (or recursive): pickle keeps it one object */
    }
    if (w->nseen == MAX_SEEN)
        return -1;
    w->seen[w->nseen++] = obj;
    return 0;
}

static int put_value(Writer *w, PyObject *obj, int depth);

static int
put_key(Writer *w, PyObject *key)
{
    PyTypeObject *t = Py_TYPE(key);
    if (t == &PyUnicode_Type || t == &PyLong_Type || t == &PyFloat_Type
            || t == &PyBytes_Type || t == &PyBool_Type || key == Py_None)
        return put_value(w, key, 0);
    return -1;
}

static int
put_value(Writer *w, PyObject *obj, int depth)
{
    PyTypeObject *t = Py_TYPE(obj);
    if (t == &PyUnicode_Type)
        return put_str(w, obj);
    if (t == &PyLong_Type)
        return put_long(w, obj);
    if (obj == Py_None)
        return put1(w, 'N');
    if (t == &PyBool_Type)
        return put1(w, obj == Py_True ? (char)0x88 : (char)0x89); /* NEWTRUE, NEWFALSE */
    if (t == &PyFloat_Type)
        return put_float(w, obj);
    if (t == &PyBytes_Type) /* SHORT_BINBYTES, BINBYTES */
        return put_sized(w, 'C', 'B', PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj));
    if (depth >= MAX_DEPTH)
        return -1;
    if (t == &PyTuple_Type) {
        Py_ssize_t n = PyTuple_GET_SIZE(obj);
        if (n == 0)
            return put1(w, ')'); /* EMPTY_TUPLE */
        if (remember(w, obj) < 0)
            return -1;
        if (n > 3 && put1(w, '(') < 0) /* MARK */
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (put_value(w, PyTuple_GET_ITEM(obj, i), depth + 1) < 0)
                return -1;
        }
        /* TUPLE1, TUPLE2, TUPLE3, TUPLE */
        static const char ops[4] = {0, (char)0x85, (char)0x86, (char)0x87};
        return put1(w, n > 3 ? 't' : ops[n]);
    }
    if (t == &PyList_Type) {
        if (remember(w, obj) < 0 || put1(w, ']') < 0) /* EMPTY_LIST */
            return -1;
        Py_ssize_t n = PyList_GET_SIZE(obj);
        if (n == 0)
            return 0;
        if (put1(w, '(') < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i >= PyList_GET_SIZE(obj)) /* (cannot shrink: no Python code runs) */
                return -1;
            if (put_value(w, PyList_GET_ITEM(obj, i), depth + 1) < 0)
                return -1;
        }
        return put1(w, 'e'); /* APPENDS */
    }
    if (t == &PyDict_Type) {
        if (remember(w, obj) < 0 || put1(w, '}') < 0) /* EMPTY_DICT */
            return -1;
        if (PyDict_GET_SIZE(obj) == 0)
            return 0;
        if (put1(w, '(') < 0)
            return -1;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(obj, &pos, &key, &value)) {
            if (put_key(w, key) < 0 || put_value(w, value, depth + 1) < 0)
                return -1;
        }
        return put1(w, 'u'); /* SETITEMS */
    }
    return -1;
}

PyDoc_STRVAR(encode_item_doc,
"encode_item(name, args, kwargs, limit, /)\n--\n\n"
"The protocol-3 item of event ``(name, args, kwargs)`` (a pickle without\n"
"PROTO and STOP, and without memo opcodes), or None when a value is not\n"
"one this encoder handles or the item would exceed ``limit`` bytes.");

/* Write the item of ``(name, args, kwargs)``; 0, or -1 when it cannot be
 * (with an exception set only when memory ran out). */
static int
put_triple(Writer *w, PyObject *name, PyObject *args, PyObject *kwargs)
{
    if (put_str(w, name) < 0)
        return -1;
    /* the triple's own args tuple: always its three-opcode form */
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n == 0) {
        if (put1(w, ')') < 0)
            return -1;
    }
    else {
        if (n > 3 && put1(w, '(') < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (put_value(w, PyTuple_GET_ITEM(args, i), 1) < 0)
                return -1;
        static const char ops[4] = {0, (char)0x85, (char)0x86, (char)0x87};
        if (put1(w, n > 3 ? 't' : ops[n]) < 0)
            return -1;
    }
    if (put_value(w, kwargs, 0) < 0)
        return -1;
    return put1(w, (char)0x87); /* TUPLE3 */
}

static void
writer_init(Writer *w, Py_ssize_t limit)
{
    w->buf = w->local;
    w->len = 0;
    w->cap = sizeof(w->local);
    w->limit = limit;
    w->nseen = 0;
}

/* The bytes written (or None when ``failed`` without an exception); frees
 * the writer's memory. */
static PyObject *
writer_finish(Writer *w, int failed)
{
    PyObject *result = NULL;
    if (!failed && w->len > w->limit)
        failed = 1;
    if (!failed)
        result = PyBytes_FromStringAndSize(w->buf, w->len);
    else if (!PyErr_Occurred())
        result = Py_NewRef(Py_None);
    if (w->buf != w->local)
        PyMem_Free(w->buf);
    return result;
}

/* encode_item and encode_call: the item of the call's triple, alone or as a
 * whole pickle (``whole``: PROTO 3 before it, STOP after it). */
static PyObject *
encode_triple(const char *fname, PyObject *const *argv, Py_ssize_t argc, int whole)
{
    if (argc != 4) {
        PyErr_Format(PyExc_TypeError, "%s() takes 4 arguments (%zd given)", fname, argc);
        return NULL;
    }
    PyObject *name = argv[0], *args = argv[1], *kwargs = argv[2];
    Py_ssize_t limit = PyLong_AsSsize_t(argv[3]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (!PyUnicode_CheckExact(name) || !PyTuple_CheckExact(args) || !PyDict_CheckExact(kwargs))
        Py_RETURN_NONE;
    Writer w;
    writer_init(&w, limit);
    int failed = (whole && (put1(&w, (char)0x80) < 0 || put1(&w, 3) < 0))
        || put_triple(&w, name, args, kwargs) < 0 || (whole && put1(&w, '.') < 0);
    return writer_finish(&w, failed);
}

static PyObject *
encode_item(PyObject *Py_UNUSED(module), PyObject *const *argv, Py_ssize_t argc)
{
    return encode_triple("encode_item", argv, argc, 0);
}

PyDoc_STRVAR(encode_call_doc,
"encode_call(name, args, kwargs, limit, /)\n--\n\n"
"The whole protocol-3 pickle of call ``(name, args, kwargs)`` (PROTO, the\n"
"item, STOP), or None as encode_item.");

static PyObject *
encode_call(PyObject *Py_UNUSED(module), PyObject *const *argv, Py_ssize_t argc)
{
    return encode_triple("encode_call", argv, argc, 1);
}

PyDoc_STRVAR(encode_value_doc,
"encode_value(value, limit, /)\n--\n\n"
"The whole protocol-3 pickle of one plain value (a call's result), or None\n"
"when it is not one this encoder handles or would exceed ``limit`` bytes.");

static PyObject *
encode_value(PyObject *Py_UNUSED(module), PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 2) {
        PyErr_Format(PyExc_TypeError, "encode_value() takes 2 arguments (%zd given)", argc);
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(argv[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Writer w;
    writer_init(&w, limit);
    int failed = put1(&w, (char)0x80) < 0 || put1(&w, 3) < 0
        || put_value(&w, argv[0], 0) < 0 || put1(&w, '.') < 0;
    return writer_finish(&w, failed);
}

/* -- memo_bound ------------------------------------------------------------
 *
 * The C unpickler keeps its memo in an array as long as the largest index a
 * PUT, BINPUT or LONG_BINPUT names, and zeroes it: a 20-byte pickle naming
 * index 900,000,000 makes it allocate and touch 7 GB.  A pickle's real memo
 * indices are below its length (each PUT takes at least two bytes), so
 * localnet refuses one whose largest index is not (_serial.unpickle).  This
 * walks the opcodes without building anything.
 */

static Py_ssize_t
line_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
    const void *nl = memchr(p + i, '\n', (size_t)(n - i));
    return nl == NULL ? -1 : (const unsigned char *)nl - p;
}

static inline uint32_t
rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
        | ((uint32_t)p[3] << 24);
}

static inline uint64_t
rd64(const unsigned char *p)
{
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

/* The largest memo index the pickle at p[0:n] names before its STOP, -1 for
 * none; a PUT index too long to read counts as n.  Walking ends early at an
 * unknown opcode or truncated data, where the unpickler fails too. */
static Py_ssize_t
largest_memo_index(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 0, largest = -1;
    while (i < n) {
        unsigned char op = p[i++];
        Py_ssize_t need = 0; /* fixed argument bytes */
        Py_ssize_t end;
        switch (op) {
        case '.': /* STOP */
            return largest;
        /* no argument */
        case '(': case '0': case '1': case '2': case 'N': case 'R': case 'a':
        case 'b': case 'd': case '}': case 'e': case 'l': case ']': case 'o':
        case 's': case 't': case ')': case 'u': case 'Q': case 0x81: case 0x85:
        case 0x86: case 0x87: case 0x88: case 0x89: case 0x8f: case 0x90:
        case 0x91: case 0x92: case 0x93: case 0x94: case 0x97: case 0x98:
            break;
        case 'q': /* BINPUT */
            if (i + 1 > n)
                return largest;
            if ((Py_ssize_t)p[i] > largest)
                largest = p[i];
            need = 1;
            break;
        case 'r': /* LONG_BINPUT */
            if (i + 4 > n)
                return largest;
            if ((Py_ssize_t)rd32(p + i) > largest)
                largest = (Py_ssize_t)rd32(p + i);
            need = 4;
            break;
        case 'p': { /* PUT: a decimal line */
            end = line_end(p, i, n);
            if (end < 0)
                return largest;
            Py_ssize_t value = 0, digits = 0;
            for (Py_ssize_t j = i; j < end; j++) {
                if (p[j] >= '0' && p[j] <= '9') {
                    if (++digits > 12) {
                        value = n; /* whatever it is, it is too large */
                        break;
                    }
                    value = value * 10 + (p[j] - '0');
                }
            }
            if (value > largest)
                largest = value;
            i = end + 1;
            continue;
        }
        /* one line */
        case 'I': case 'L': case 'F': case 'S': case 'V': case 'P': case 'g':
            end = line_end(p, i, n);
            if (end < 0)
                return largest;
            i = end + 1;
            continue;
        /* two lines */
        case 'c': case 'i':
            end = line_end(p, i, n);
            if (end < 0)
                return largest;
            end = line_end(p, end + 1, n);
            if (end < 0)
                return largest;
            i = end + 1;
            continue;
        /* fixed arguments */
        case 'K': case 'h': case 0x80: case 0x82:
            need = 1;
            break;
        case 'M': case 0x83:
            need = 2;
            break;
        case 'J': case 'j': case 0x84:
            need = 4;
            break;
        case 'G': case 0x95:
            need = 8;
            break;
        /* counted: a 1-byte length */
        case 'U': case 'C': case 0x8c: case 0x8a:
            if (i + 1 > n)
                return largest;
            need = 1 + (Py_ssize_t)p[i];
            break;
        /* counted: a 4-byte length */
        case 'T': case 'X': case 'B': case 0x8b:
            if (i + 4 > n)
                return largest;
            need = 4 + (Py_ssize_t)rd32(p + i);
            break;
        /* counted: an 8-byte length */
        case 0x8d: case 0x8e: case 0x96: {
            if (i + 8 > n)
                return largest;
            uint64_t len = rd64(p + i);
            if (len > (uint64_t)(n - i))
                return largest;
            need = 8 + (Py_ssize_t)len;
            break;
        }
        default:
            return largest; /* the unpickler refuses it too */
        }
        if (need > n - i)
            return largest;
        i += need;
    }
    return largest;
}

PyDoc_STRVAR(memo_bound_doc,
"memo_bound(data, /)\n--\n\n"
"The largest memo index (PUT, BINPUT, LONG_BINPUT) the pickle ``data`` names\n"
"before its STOP, or -1 for none.");

static PyObject *
memo_bound(PyObject *Py_UNUSED(module), PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t largest = largest_memo_index((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(largest);
}

PyDoc_STRVAR(load_checked_doc,
"load_checked(data, /)\n--\n\n"
"``pickle.loads(data)`` once ``data`` was checked as memo_bound checks it:\n"
"ValueError for a pickle naming a memo index beyond its own length.");

static PyObject *pickle_loads = NULL; /* pickle.loads, looked up on first use */

static PyObject *
load_checked(PyObject *Py_UNUSED(module), PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t largest = largest_memo_index((const unsigned char *)view.buf, view.len);
    Py_ssize_t length = view.len;
    PyBuffer_Release(&view);
    if (largest >= length) {
        PyErr_SetString(PyExc_ValueError, "a memo index beyond the pickle's own length");
        return NULL;
    }
    if (pickle_loads == NULL) {
        PyObject *pickle = PyImport_ImportModule("pickle");
        if (pickle == NULL)
            return NULL;
        pickle_loads = PyObject_GetAttrString(pickle, "loads");
        Py_DECREF(pickle);
        if (pickle_loads == NULL)
            return NULL;
    }
    return PyObject_CallOneArg(pickle_loads, data);
}

PyDoc_STRVAR(fan_out_doc,
"fan_out(lanes, entry, /)\n--\n\n"
"Append ``entry`` to every lane of the tuple ``lanes`` (an outbox's\n"
"``[queue, room, courier_idle]``, see localnet._events.Outbox.lane) whose\n"
"queue is shorter than its room; None when that was all, else ``(idle,\n"
"full)``: the indices of the lanes that took it with their courier idle\n"
"(to wake), and of those that did not take it (for the locked path).");

/* Append ``index`` to the list ``*into``, made on first use; -1 on failure. */
static int
collect(PyObject **into, Py_ssize_t index)
{
    if (*into == NULL && (*into = PyList_New(0)) == NULL)
        return -1;
    PyObject *number = PyLong_FromSsize_t(index);
    if (number == NULL)
        return -1;
    int rc = PyList_Append(*into, number);
    Py_DECREF(number);
    return rc;
}

static PyObject *
fan_out(PyObject *Py_UNUSED(module), PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 2 || !PyTuple_Check(argv[0])) {
        PyErr_SetString(PyExc_TypeError, "fan_out() takes a tuple of lanes and an entry");
        return NULL;
    }
    PyObject *lanes = argv[0], *entry = argv[1];
    PyObject *idle = NULL, *full = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(lanes);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *lane = PyTuple_GET_ITEM(lanes, i);
        if (!PyList_CheckExact(lane) || PyList_GET_SIZE(lane) != 3
                || !PyList_CheckExact(PyList_GET_ITEM(lane, 0))) {
            PyErr_SetString(PyExc_TypeError, "a lane is a list [queue, room, courier_idle]");
            goto failed;
        }
        PyObject *queue = PyList_GET_ITEM(lane, 0);
        Py_ssize_t room = PyLong_AsSsize_t(PyList_GET_ITEM(lane, 1));
        if (room == -1 && PyErr_Occurred())
            goto failed;
        if (PyList_GET_SIZE(queue) >= room) {
            if (collect(&full, i) < 0)
                goto failed;
            continue;
        }
        if (PyList_Append(queue, entry) < 0)
            goto failed;
        /* appended first, then looked: a writer found busy will see the entry */
        if (PyList_GET_ITEM(lane, 2) == Py_True && collect(&idle, i) < 0)
            goto failed;
    }
    if (idle == NULL && full == NULL)
        Py_RETURN_NONE;
    if (idle == NULL && (idle = PyList_New(0)) == NULL)
        goto failed;
    if (full == NULL && (full = PyList_New(0)) == NULL)
        goto failed;
    return Py_BuildValue("(NN)", idle, full);
failed:
    Py_XDECREF(idle);
    Py_XDECREF(full);
    return NULL;
}

/* True when a lane of ``lanes`` (as fan_out() checks them) has room for one more entry. */
static int
any_room(PyObject *lanes)
{
    Py_ssize_t n = PyTuple_GET_SIZE(lanes);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *lane = PyTuple_GET_ITEM(lanes, i);
        if (!PyList_CheckExact(lane) || PyList_GET_SIZE(lane) != 3
                || !PyList_CheckExact(PyList_GET_ITEM(lane, 0)))
            return 1;  /* (fan_out() says what is wrong with it) */
        Py_ssize_t room = PyLong_AsSsize_t(PyList_GET_ITEM(lane, 1));
        if (room == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 1;
        }
        if (PyList_GET_SIZE(PyList_GET_ITEM(lane, 0)) < room)
            return 1;
    }
    return 0;
}

PyDoc_STRVAR(ring_fan_out_doc,
"ring_fan_out(state, ring, lanes, event, item, /)\n--\n\n"
"Copy the bytes ``item`` into an event ring and queue its entry ``(event,\n"
"item, position, number)`` on ``lanes`` as fan_out() does, returning what\n"
"fan_out() returns.  ``ring`` is the writable segment and ``state`` the\n"
"list ``[head, tail, number, pause, size, start]`` of\n"
"localnet._ring.EventRing, updated here.  False, writing nothing, when the\n"
"ring has no room for it or pauses (pause > 0 counts down; < 0: closed).\n"
"When no lane has room, nothing is written and every lane is full.\n"
"Runs without letting go of the GIL: a ring write and its fan-out are one step.");

static PyObject *
ring_fan_out(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 5 || !PyList_CheckExact(argv[0]) || PyList_GET_SIZE(argv[0]) != 6
            || !PyTuple_Check(argv[2]) || !PyBytes_CheckExact(argv[4])) {
        PyErr_SetString(PyExc_TypeError, "ring_fan_out() takes a state list of 6, a ring, "
                        "a tuple of lanes, an event and bytes");
        return NULL;
    }
    PyObject *state = argv[0], *item = argv[4];
    long long v[6];
    for (int i = 0; i < 6; i++) {
        v[i] = PyLong_AsLongLong(PyList_GET_ITEM(state, i));
        if (v[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    long long head = v[0], tail = v[1], number = v[2], pause = v[3], size = v[4], start = v[5];
    if (pause != 0) {
        if (pause > 0) {
            PyObject *left = PyLong_FromLongLong(pause - 1);
            if (left == NULL || PyList_SetItem(state, 3, left) < 0)
                return NULL;
        }
        Py_RETURN_FALSE;
    }
    if (!any_room(argv[2])) {  /* nobody takes it: write nothing, all to the locked path */
        PyObject *args[2] = {argv[2], Py_None};
        return fan_out(module, args, 2);
    }
    long long n = (long long)PyBytes_GET_SIZE(item);
    if (size <= 0 || n > size || head < 0 || start < 0)
        Py_RETURN_FALSE;
    long long pos = head, offset = head % size;
    if (offset + n > size) {  /* never across the end: on to the next lap */
        pos += size - offset;
        offset = 0;
    }
    if (pos + n - tail > size)
        Py_RETURN_FALSE;
    Py_buffer view;
    if (PyObject_GetBuffer(argv[1], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (start + offset + n > (long long)view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "the ring is smaller than its state says");
        return NULL;
    }
    memcpy((char *)view.buf + start + offset, PyBytes_AS_STRING(item), (size_t)n);
    PyBuffer_Release(&view);
    PyObject *where = PyLong_FromLongLong(pos);
    PyObject *count = PyLong_FromLongLong(number + 1);
    PyObject *next = PyLong_FromLongLong(pos + n);
    PyObject *entry = (where && count && next)
        ? PyTuple_Pack(4, argv[3], item, where, count) : NULL;
    Py_XDECREF(where);
    if (entry == NULL) {
        Py_XDECREF(count);
        Py_XDECREF(next);
        return NULL;
    }
    PyList_SetItem(state, 0, next);  /* (steals the references) */
    PyList_SetItem(state, 2, count);
    PyObject *args[2] = {argv[2], entry};
    PyObject *result = fan_out(module, args, 2);
    Py_DECREF(entry);
    return result;
}

PyDoc_STRVAR(dispatch_doc,
"dispatch(items, start, event, handler, catalog, table, /)\n--\n\n"
"Run ``handler(*args, **kwargs)`` for the events ``items[start:]`` (a list of\n"
"``(event, args, kwargs)``) while they are events named ``event`` and\n"
"``catalog.by_event`` is still ``table`` (a handler may unsubscribe).\n"
"Returns ``(status, index, value)``: status 0, all were run (index is\n"
"len(items)); 1, ``items[index]`` was not run (another event, or not such a\n"
"triple, or the subscriptions changed); 2, ``items[index]``'s handler raised\n"
"``value`` (an Exception); 3, it returned ``value``, which is not None.  A\n"
"BaseException that is not an Exception (KeyboardInterrupt) propagates.");

static PyObject *by_event_name = NULL;

static PyObject *
dispatch(PyObject *Py_UNUSED(module), PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 6 || !PyList_CheckExact(argv[0])) {
        PyErr_SetString(PyExc_TypeError, "dispatch() takes a list of events, a start index, "
                        "an event name, a handler, the catalog and its table");
        return NULL;
    }
    PyObject *items = argv[0], *event = argv[2], *handler = argv[3];
    PyObject *catalog = argv[4], *table = argv[5];
    Py_ssize_t i = PyLong_AsSsize_t(argv[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (by_event_name == NULL && (by_event_name = PyUnicode_InternFromString("by_event")) == NULL)
        return NULL;
    for (; i < PyList_GET_SIZE(items); i++) {
        PyObject *message = PyList_GET_ITEM(items, i);
        if (!PyTuple_CheckExact(message) || PyTuple_GET_SIZE(message) != 3)
            return Py_BuildValue("(inO)", 1, i, Py_None);
        PyObject *name = PyTuple_GET_ITEM(message, 0);
        PyObject *args = PyTuple_GET_ITEM(message, 1);
        PyObject *kwargs = PyTuple_GET_ITEM(message, 2);
        if (name != event) {
            if (!PyUnicode_CheckExact(name))
                return Py_BuildValue("(inO)", 1, i, Py_None);
            int same = PyUnicode_Compare(name, event);
            if (same == -1 && PyErr_Occurred())
                return NULL;
            if (same != 0)
                return Py_BuildValue("(inO)", 1, i, Py_None);
        }
        if (!PyTuple_CheckExact(args) || !PyDict_CheckExact(kwargs))
            return Py_BuildValue("(inO)", 1, i, Py_None);
        PyObject *now = PyObject_GetAttr(catalog, by_event_name);
        if (now == NULL)
            return NULL;
        Py_DECREF(now);
        if (now != table)
            return Py_BuildValue("(inO)", 1, i, Py_None);
        PyObject *result = PyObject_Call(handler, args, PyDict_GET_SIZE(kwargs) ? kwargs : NULL);
        if (result == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return NULL;
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            if (traceback != NULL && value != NULL)
                PyException_SetTraceback(value, traceback);
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            PyObject *answer = Py_BuildValue("(inO)", 2, i, value ? value : Py_None);
            Py_XDECREF(value);
            return answer;
        }
        if (result != Py_None)
            return Py_BuildValue("(inN)", 3, i, result);
        Py_DECREF(result);
    }
    return Py_BuildValue("(inO)", 0, i, Py_None);
}

PyDoc_STRVAR(ring_run_doc,
"ring_run(entries, /)\n--\n\n"
"True when the list ``entries`` is not empty and holds only entries of the\n"
"event ring, ``(event, item, position, number)``, numbered one after the other.");

static PyObject *
ring_run(PyObject *Py_UNUSED(module), PyObject *entries)
{
    if (!PyList_CheckExact(entries)) {
        PyErr_SetString(PyExc_TypeError, "ring_run() takes a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(entries);
    long long first = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry = PyList_GET_ITEM(entries, i);
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 4
                || !PyLong_CheckExact(PyTuple_GET_ITEM(entry, 3)))
            Py_RETURN_FALSE;
        long long number = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 3));
        if (number == -1 && PyErr_Occurred())
            return NULL;
        if (i == 0)
            first = number;
        else if (number != first + i)
            Py_RETURN_FALSE;
    }
    if (n == 0)
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(ring_frames_doc,
"ring_frames(entries, low, high, size, first, nfds, per_frame, batch, head, mark, /)\n--\n\n"
"The RING frames for ``entries[low:high]``, consecutive entries of an event\n"
"ring of ``size`` bytes ``(event, item, position, number)``, as one bytes\n"
"object: frames of 33 bytes, each naming the bytes ``[start, end)`` of the\n"
"ring that hold up to ``per_frame`` events, at most ``batch`` bytes and never\n"
"across the end of a lap (localnet._ring.ring_runs), the first numbered\n"
"``first`` + its events - 1 and so on.  ``head`` is (version, kind) of the\n"
"header, ``nfds`` the descriptor count of the first frame, ``mark`` the\n"
"first byte of each body.");

/* The ring position and the end of entry ``i`` of ``entries``; -1 on a malformed entry. */
static int
ring_span(PyObject *entries, Py_ssize_t i, long long *start, long long *end)
{
    PyObject *entry = PyList_GET_ITEM(entries, i);
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 4
            || !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 1))) {
        PyErr_SetString(PyExc_TypeError, "a ring entry is (event, item, position, number)");
        return -1;
    }
    *start = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 2));
    if (*start == -1 && PyErr_Occurred())
        return -1;
    *end = *start + (long long)PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1));
    return 0;
}

static void
put_le(unsigned char *at, unsigned long long value, int n)
{
    for (int i = 0; i < n; i++)
        at[i] = (unsigned char)(value >> (8 * i));
}

static PyObject *
ring_frames(PyObject *Py_UNUSED(module), PyObject *const *argv, Py_ssize_t argc)
{
    long long v[8];
    if (argc != 10 || !PyList_CheckExact(argv[0]) || !PyTuple_Check(argv[8])
            || PyTuple_GET_SIZE(argv[8]) != 2) {
        PyErr_SetString(PyExc_TypeError, "ring_frames() takes a list, 7 integers, a "
                        "(version, kind) pair and a mark");
        return NULL;
    }
    for (int i = 1; i < 8; i++) {
        v[i] = PyLong_AsLongLong(argv[i]);
        if (v[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    long version = PyLong_AsLong(PyTuple_GET_ITEM(argv[8], 0));
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(argv[8], 1));
    long mark = PyLong_AsLong(argv[9]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *entries = argv[0];
    long long low = v[1], n = v[2], size = v[3], first = v[4], nfds = v[5];
    long long per_frame = v[6], batch = v[7];
    if (low < 0 || n > PyList_GET_SIZE(entries) || low >= n || size <= 0 || per_frame <= 0) {
        PyErr_SetString(PyExc_ValueError, "ring_frames(): an empty or impossible range");
        return NULL;
    }
    enum { FRAME = 33 };  /* a 16-byte header and a 17-byte body: mark, start, end */
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((n - low) * FRAME));
    if (out == NULL)
        return NULL;
    unsigned char *at = (unsigned char *)PyBytes_AS_STRING(out);
    long long origin = low;
    while (low < n) {
        long long high = low + per_frame < n ? low + per_frame : n;
        long long start, end, ignored;
        if (ring_span(entries, (Py_ssize_t)low, &start, &ignored) < 0)
            goto failed;
        for (;;) {
            long long last_start;
            if (ring_span(entries, (Py_ssize_t)(high - 1), &last_start, &end) < 0)
                goto failed;
            if (high - low == 1 || (end - start <= batch && (end - 1) / size == start / size))
                break;
            high = low + (high - low) / 2;
        }
        at[0] = (unsigned char)version;
        at[1] = (unsigned char)kind;
        put_le(at + 2, (unsigned long long)(low == origin ? nfds : 0), 2);
        put_le(at + 4, 17, 4);
        put_le(at + 8, (unsigned long long)(first + (high - origin) - 1), 8);
        at[16] = (unsigned char)mark;
        put_le(at + 17, (unsigned long long)start, 8);
        put_le(at + 25, (unsigned long long)end, 8);
        at += FRAME;
        low = high;
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)(at - (unsigned char *)PyBytes_AS_STRING(out))) < 0)
        return NULL;
    return out;
failed:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(sizes_doc,
"sizes(entries, start, end, mode, /)\n--\n\n"
"The bytes held by ``entries[start:end]`` (a list of queued ``(event, frame,\n"
"...)`` entries, see localnet._budget): mode 0 counts the items (bytes not\n"
"starting with 0x80), mode 1 the rest (whole pickles, and a shared-memory\n"
"payload's ``nbytes``), mode 2 both.");

static PyObject *
sizes(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "sizes(entries: list, start, end, mode)");
        return NULL;
    }
    PyObject *entries = args[0];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    long mode = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (mode < 0 || mode > 2) {
        PyErr_SetString(PyExc_ValueError, "sizes: mode is 0, 1 or 2");
        return NULL;
    }
    if (start < 0)
        start = 0;
    long long total = 0;
    /* (re-read the size each time: only this thread cuts the list, others append) */
    for (Py_ssize_t i = start; i < end && i < PyList_GET_SIZE(entries); i++) {
        PyObject *entry = PyList_GET_ITEM(entries, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 2) {
            PyErr_SetString(PyExc_TypeError, "sizes: an entry is a tuple (event, frame, ...)");
            return NULL;
        }
        PyObject *frame = PyTuple_GET_ITEM(entry, 1);
        if (PyBytes_CheckExact(frame)) {
            Py_ssize_t n = PyBytes_GET_SIZE(frame);
            int item = n > 0 && (unsigned char)PyBytes_AS_STRING(frame)[0] != 0x80;
            if (mode == 2 || (mode == 0) == item)
                total += n;
        } else if (mode != 0) {
            Py_INCREF(entry);  /* (the attribute may run code that changes the list) */
            PyObject *nbytes = PyObject_GetAttrString(frame, "nbytes");
            Py_DECREF(entry);
            if (nbytes == NULL)
                return NULL;
            long long n = PyLong_AsLongLong(nbytes);
            Py_DECREF(nbytes);
            if (n == -1 && PyErr_Occurred())
                return NULL;
            total += n;
        }
    }
    return PyLong_FromLongLong(total);
}

static PyMethodDef methods[] = {
    {"sizes", (PyCFunction)(void (*)(void))sizes, METH_FASTCALL, sizes_doc},
    {"load_checked", load_checked, METH_O, load_checked_doc},
    {"encode_item", (PyCFunction)(void (*)(void))encode_item, METH_FASTCALL, encode_item_doc},
    {"encode_call", (PyCFunction)(void (*)(void))encode_call, METH_FASTCALL, encode_call_doc},
    {"encode_value", (PyCFunction)(void (*)(void))encode_value, METH_FASTCALL, encode_value_doc},
    {"memo_bound", memo_bound, METH_O, memo_bound_doc},
    {"fan_out", (PyCFunction)(void (*)(void))fan_out, METH_FASTCALL, fan_out_doc},
    {"ring_fan_out", (PyCFunction)(void (*)(void))ring_fan_out, METH_FASTCALL,
     ring_fan_out_doc},
    {"dispatch", (PyCFunction)(void (*)(void))dispatch, METH_FASTCALL, dispatch_doc},
    {"ring_run", ring_run, METH_O, ring_run_doc},
    {"ring_frames", (PyCFunction)(void (*)(void))ring_frames, METH_FASTCALL, ring_frames_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "localnet._speedups",
    "The event trigger's item encoder, in C (optional; see _serial.dumps_event).",
    0,
    methods,
    NULL, /* m_slots */
    NULL, /* m_traverse */
    NULL, /* m_clear */
    NULL, /* m_free */
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module);
}
