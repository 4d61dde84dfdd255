/* localnet._trigger: an event trigger's common case, in C.
 *
 * Optional, like localnet._speedups (whose encoder and fan-outs it calls):
 * without it a peer's ``publish`` is Publisher.publish, in Python.
 *
 *   Trigger(peer, running, slow, finish, encode_item, fan_out, ring_fan_out,
 *           item_max)
 *       trigger(event, args, kwargs) does what ``slow(event, args, kwargs)``
 *       (Publisher.publish) does, for the events of its table ``routes``:
 *       while ``peer.state is running``, an event found in the table whose
 *       arguments make an item (``encode_item(event, args, kwargs,
 *       item_max)`` is bytes) is queued on the lanes the table gives, and
 *       ``finish(route, event, item, rest)`` runs only when the fan-out
 *       left something to do (``rest`` not None).  Everything else goes to
 *       ``slow``, which fills the table (Publisher._table_add).
 *
 * The table maps an event to a tuple:
 *   ()                                 no subscriber: the item is made (as
 *                                      ``slow`` would) and goes nowhere;
 *   (route, lanes)                     ``fan_out(lanes, (event, item))``;
 *   (route, lanes, ring_state, ring)   ``ring_fan_out(ring_state, ring,
 *                                      lanes, event, item)``.
 * The publisher replaces the table (a new dict) whenever its routes change,
 * so an entry is never older than the routes it was made from.
 *
 *   EventCall
 *       The base of localnet.Event: calling one runs ``func(*args,
 *       **kwargs)``, checks that it returned a tuple of a tuple and a dict
 *       (else ``self._check(out)`` converts or raises), and passes them to
 *       ``publish(name, args, kwargs)`` of the current peer: ``live[-1]``,
 *       or ``current_peer()`` when no peer is live.  Returns what the
 *       function returned.  The members are set by Event.__init__.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyObject *routes;        /* dict: event -> tuple (above) */
    PyObject *peer;
    PyObject *running;       /* the peer's state while it runs */
    PyObject *slow;          /* Publisher.publish */
    PyObject *finish;        /* Publisher._finish */
    PyObject *encode_item;   /* localnet._speedups.encode_item */
    PyObject *fan_out;       /* localnet._speedups.fan_out */
    PyObject *ring_fan_out;  /* localnet._speedups.ring_fan_out */
    PyObject *item_max;      /* int */
    vectorcallfunc vectorcall;
} Trigger;

static PyObject *str_state;  /* "state", interned */

static PyObject *
trigger_slow(Trigger *self, PyObject *const *argv)
{
    return PyObject_Vectorcall(self->slow, argv, 3, NULL);
}

static PyObject *
trigger_call(Trigger *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "publish() takes an event, args and kwargs");
        return NULL;
    }
    if (self->routes == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the trigger was cleared");
        return NULL;
    }
    PyObject *state = PyObject_GetAttr(self->peer, str_state);
    if (state == NULL)
        return NULL;
    Py_DECREF(state);  /* (only compared) */
    if (state != self->running)
        return trigger_slow(self, argv);  /* it raises what the peer's state says */
    PyObject *event = argv[0];
    PyObject *entry = PyDict_GetItemWithError(self->routes, event);
    if (entry == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return trigger_slow(self, argv);
    }
    Py_INCREF(entry);  /* (the publisher may replace its table meanwhile) */
    PyObject *result = NULL;
    PyObject *encode[4] = {event, argv[1], argv[2], self->item_max};
    PyObject *item = PyObject_Vectorcall(self->encode_item, encode, 4, NULL);
    if (item == NULL)
        goto done;
    if (item == Py_None) {  /* not an item of plain values: pickled the slow way */
        Py_DECREF(item);
        result = trigger_slow(self, argv);
        goto done;
    }
    Py_ssize_t n = PyTuple_Check(entry) ? PyTuple_GET_SIZE(entry) : -1;
    PyObject *rest;
    if (n == 0) {
        Py_DECREF(item);
        result = Py_NewRef(Py_None);
        goto done;
    } else if (n == 2) {
        PyObject *pair = PyTuple_Pack(2, event, item);
        if (pair == NULL) {
            Py_DECREF(item);
            goto done;
        }
        PyObject *args[2] = {PyTuple_GET_ITEM(entry, 1), pair};
        rest = PyObject_Vectorcall(self->fan_out, args, 2, NULL);
        Py_DECREF(pair);
    } else if (n == 4) {
        PyObject *args[5] = {PyTuple_GET_ITEM(entry, 2), PyTuple_GET_ITEM(entry, 3),
                             PyTuple_GET_ITEM(entry, 1), event, item};
        rest = PyObject_Vectorcall(self->ring_fan_out, args, 5, NULL);
    } else {
        Py_DECREF(item);
        PyErr_SetString(PyExc_TypeError, "a trigger's route is (), (route, lanes) or "
                        "(route, lanes, ring_state, ring)");
        goto done;
    }
    if (rest == NULL) {
        Py_DECREF(item);
        goto done;
    }
    if (rest == Py_None) {
        result = rest;
    } else {
        PyObject *args[4] = {PyTuple_GET_ITEM(entry, 0), event, item, rest};
        result = PyObject_Vectorcall(self->finish, args, 4, NULL);
        Py_DECREF(rest);
    }
    Py_DECREF(item);
done:
    Py_DECREF(entry);
    return result;
}

static PyObject *
trigger_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"peer", "running", "slow", "finish", "encode_item", "fan_out",
                            "ring_fan_out", "item_max", NULL};
    PyObject *peer, *running, *slow, *finish, *encode_item, *fan_out, *ring_fan_out, *item_max;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOO!:Trigger", names, &peer, &running,
                                     &slow, &finish, &encode_item, &fan_out, &ring_fan_out,
                                     &PyLong_Type, &item_max))
        return NULL;
    Trigger *self = (Trigger *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if ((self->routes = PyDict_New()) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->peer = Py_NewRef(peer);
    self->running = Py_NewRef(running);
    self->slow = Py_NewRef(slow);
    self->finish = Py_NewRef(finish);
    self->encode_item = Py_NewRef(encode_item);
    self->fan_out = Py_NewRef(fan_out);
    self->ring_fan_out = Py_NewRef(ring_fan_out);
    self->item_max = Py_NewRef(item_max);
    self->vectorcall = (vectorcallfunc)trigger_call;
    return (PyObject *)self;
}

static int
trigger_traverse(Trigger *self, visitproc visit, void *arg)
{
    Py_VISIT(self->routes);
    Py_VISIT(self->peer);
    Py_VISIT(self->running);
    Py_VISIT(self->slow);
    Py_VISIT(self->finish);
    Py_VISIT(self->encode_item);
    Py_VISIT(self->fan_out);
    Py_VISIT(self->ring_fan_out);
    Py_VISIT(self->item_max);
    return 0;
}

static int
trigger_clear(Trigger *self)
{
    Py_CLEAR(self->routes);
    Py_CLEAR(self->peer);
    Py_CLEAR(self->running);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->finish);
    Py_CLEAR(self->encode_item);
    Py_CLEAR(self->fan_out);
    Py_CLEAR(self->ring_fan_out);
    Py_CLEAR(self->item_max);
    return 0;
}

static void
trigger_dealloc(Trigger *self)
{
    PyObject_GC_UnTrack(self);
    trigger_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
trigger_get_routes(Trigger *self, void *Py_UNUSED(closure))
{
    if (self->routes == NULL)
        return PyDict_New();
    return Py_NewRef(self->routes);
}

static int
trigger_set_routes(Trigger *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyDict_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "a trigger's routes are a dict");
        return -1;
    }
    Py_XSETREF(self->routes, Py_NewRef(value));
    return 0;
}

static PyGetSetDef trigger_getset[] = {
    {"routes", (getter)trigger_get_routes, (setter)trigger_set_routes,
     "The table: event -> (), (route, lanes) or (route, lanes, ring_state, ring).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef trigger_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Trigger, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TriggerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "localnet._trigger.Trigger",
    .tp_doc = PyDoc_STR("An event trigger's common case in C: see the module's comment."),
    .tp_basicsize = sizeof(Trigger),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = trigger_new,
    .tp_traverse = (traverseproc)trigger_traverse,
    .tp_clear = (inquiry)trigger_clear,
    .tp_dealloc = (destructor)trigger_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Trigger, vectorcall),
    .tp_getset = trigger_getset,
    .tp_members = trigger_members,
};

/* -- EventCall ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *func;
    PyObject *name;
    PyObject *live;          /* list: the live peers, the current one last */
    PyObject *current_peer;  /* the current peer, made when none is live */
    vectorcallfunc vectorcall;
} EventCall;

static PyObject *str_check, *str_publish;  /* "_check", "publish", interned */

static int
is_args_kwargs(PyObject *out)
{
    return PyTuple_CheckExact(out) && PyTuple_GET_SIZE(out) == 2
        && PyTuple_CheckExact(PyTuple_GET_ITEM(out, 0))
        && PyDict_CheckExact(PyTuple_GET_ITEM(out, 1));
}

static PyObject *
event_call(EventCall *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames)
{
    if (self->func == NULL || self->name == NULL || self->live == NULL
            || self->current_peer == NULL || !PyList_Check(self->live)) {
        PyErr_SetString(PyExc_TypeError, "an event trigger needs func, name, _live (a list) "
                        "and _current_peer");
        return NULL;
    }
    PyObject *out = PyObject_Vectorcall(self->func, argv, nargsf, kwnames);
    if (out == NULL)
        return NULL;
    if (!is_args_kwargs(out)) {
        Py_SETREF(out, PyObject_CallMethodOneArg((PyObject *)self, str_check, out));
        if (out == NULL)
            return NULL;
        if (!is_args_kwargs(out)) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_TypeError, "_check() must return (args, kwargs)");
            return NULL;
        }
    }
    PyObject *peer;
    Py_ssize_t n = PyList_GET_SIZE(self->live);
    if (n > 0)
        peer = Py_NewRef(PyList_GET_ITEM(self->live, n - 1));
    else if ((peer = PyObject_CallNoArgs(self->current_peer)) == NULL)
        goto failed;
    PyObject *publish = PyObject_GetAttr(peer, str_publish);
    Py_DECREF(peer);
    if (publish == NULL)
        goto failed;
    PyObject *args[3] = {self->name, PyTuple_GET_ITEM(out, 0), PyTuple_GET_ITEM(out, 1)};
    PyObject *done = PyObject_Vectorcall(publish, args, 3, NULL);
    Py_DECREF(publish);
    if (done == NULL)
        goto failed;
    Py_DECREF(done);
    return out;
failed:
    Py_DECREF(out);
    return NULL;
}

static PyObject *
event_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    EventCall *self = (EventCall *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->vectorcall = (vectorcallfunc)event_call;
    return (PyObject *)self;
}

static int
event_traverse(EventCall *self, visitproc visit, void *arg)
{
    /* (the Python subclass's traverse visits its type, and its dealloc lets go of it) */
    Py_VISIT(self->func);
    Py_VISIT(self->name);
    Py_VISIT(self->live);
    Py_VISIT(self->current_peer);
    return 0;
}

static int
event_clear(EventCall *self)
{
    Py_CLEAR(self->func);
    Py_CLEAR(self->name);
    Py_CLEAR(self->live);
    Py_CLEAR(self->current_peer);
    return 0;
}

static void
event_dealloc(EventCall *self)
{
    PyObject_GC_UnTrack(self);
    event_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef event_members[] = {
    {"func", T_OBJECT_EX, offsetof(EventCall, func), 0, "The decorated function."},
    {"name", T_OBJECT_EX, offsetof(EventCall, name), 0, "The event's name."},
    {"_live", T_OBJECT_EX, offsetof(EventCall, live), 0, "The live peers (localnet._current)."},
    {"_current_peer", T_OBJECT_EX, offsetof(EventCall, current_peer), 0,
     "The current peer when none is live (localnet._default.current_peer)."},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(EventCall, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject EventCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "localnet._trigger.EventCall",
    .tp_doc = PyDoc_STR("The base of localnet.Event: its call in C (see the module's comment)."),
    .tp_basicsize = sizeof(EventCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC
        | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = event_new,
    .tp_traverse = (traverseproc)event_traverse,
    .tp_clear = (inquiry)event_clear,
    .tp_dealloc = (destructor)event_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(EventCall, vectorcall),
    .tp_members = event_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "localnet._trigger",
    "An event trigger's common case, in C (optional; see localnet._publisher).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__trigger(void)
{
    if ((str_state = PyUnicode_InternFromString("state")) == NULL
            || (str_check = PyUnicode_InternFromString("_check")) == NULL
            || (str_publish = PyUnicode_InternFromString("publish")) == NULL)
        return NULL;
    if (PyType_Ready(&TriggerType) < 0 || PyType_Ready(&EventCallType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Trigger", (PyObject *)&TriggerType) < 0
            || PyModule_AddObjectRef(m, "EventCall", (PyObject *)&EventCallType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
