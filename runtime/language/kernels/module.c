/* The CPython module tinygptv_edge.runtime.language.kernels._native (ops.py is its Python side): the
 * ggml custom ops' addresses for the graph, and each op on one thread with a named path for the tests
 * ('plain', or PATH: what this CPU runs; any other name is refused with ValueError). Also PATH,
 * SUPPORTED, COMPILED and the constants ops.py needs. Loading it fills the dispatch table once. */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python asks */

#include "native.h"

static PyObject *py_op_address(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromVoidPtr((void *)kq_op);
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int type, n, k, t;
    unsigned long long w, x, out;
    Py_ssize_t ldx, ldo;
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKiiKinKns", &type, &w, &n, &k, &x, &t, &ldx, &out, &ldo, &name)) return NULL;
    const kq_ops *ops = kq_ops_named(name);
    if (!ops) {
        PyErr_Format(PyExc_ValueError, "kernel path: expected 'plain' or '%s' (what this CPU runs), got '%s'",
                     kq_dispatch.name, name);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kq_matmul(ops, type, (const void *)(uintptr_t)w, n, k, (const float *)(uintptr_t)x, t, (size_t)ldx,
                   (float *)(uintptr_t)out, (size_t)ldo, 0, 1);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        PyErr_Format(PyExc_ValueError, "unsupported matmul: type %d, %d rows of %d, %d tokens", type, n, k, t);
        return NULL;
    }
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_attn_op_address(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromVoidPtr((void *)kq_attn_op);
}

static PyObject *py_attn1_op_address(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromVoidPtr((void *)kq_attn1_op);
}

/* attention(args, path) or attention1(args, path): the op on one thread */
static PyObject *run_attention(PyObject *args, int decode) {
    unsigned long long p;
    const char *name, *op = decode ? "attention1" : "attention";
    if (!PyArg_ParseTuple(args, "Ks", &p, &name)) return NULL;
    const kq_ops *ops = kq_ops_named(name);
    if (!ops) {
        PyErr_Format(PyExc_ValueError, "%s: unknown path '%s'", op, name);
        return NULL;
    }
    const kq_attn_args *a = (const kq_attn_args *)(uintptr_t)p;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = decode ? kq_attention1(ops, a, 0, 1) : kq_attention(ops, a, 0, 1);
    Py_END_ALLOW_THREADS
    if (rc == -2) {
        PyErr_Format(PyExc_ValueError, "%s: bad arguments (head size, counts, or a query seeing no slot)", op);
        return NULL;
    }
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    (void)self;
    return run_attention(args, 0);
}

static PyObject *py_attention1(PyObject *self, PyObject *args) {
    (void)self;
    return run_attention(args, 1);
}

static PyObject *py_epilogue(PyObject *self, PyObject *args) {
    int t, n, act;
    unsigned long long out, bias;
    Py_ssize_t ldo;
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "KniiKis", &out, &ldo, &t, &n, &bias, &act, &name)) return NULL;
    const kq_ops *ops = kq_ops_named(name);
    if (!ops || (act != KQ_ACT_NONE && act != KQ_ACT_GELU)) {
        PyErr_Format(PyExc_ValueError, "epilogue: unknown path '%s' or activation %d", name, act);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    kq_epilogue(ops, (float *)(uintptr_t)out, (size_t)ldo, t, 0, n, (const float *)(uintptr_t)bias, act);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* the names of the paths i with mask[i], as a tuple */
static PyObject *path_tuple(const int *mask) {
    PyObject *list = PyList_New(0), *tuple;
    for (int i = 0; list && i < KQ_NPATHS; i++) {
        if (!mask[i]) continue;
        PyObject *s = PyUnicode_FromString(kq_path_names[i]);
        if (!s || PyList_Append(list, s)) Py_CLEAR(list);
        Py_XDECREF(s);
    }
    if (!list) return NULL;
    tuple = PyList_AsTuple(list);
    Py_DECREF(list);
    return tuple;
}

static PyMethodDef methods[] = {
    {"op_address", py_op_address, METH_NOARGS, "Address of the ggml custom op (ggml_custom_op_t)."},
    {"attn_op_address", py_attn_op_address, METH_NOARGS, "Address of the prompt attention custom op."},
    {"attn1_op_address", py_attn1_op_address, METH_NOARGS, "Address of the decode attention custom op."},
    {"attention", py_attention, METH_VARARGS,
     "attention(args_address, path): the prompt attention of a kq_attn_args struct on one thread."},
    {"attention1", py_attention1, METH_VARARGS,
     "attention1(args_address, path): the decode attention (T = 1) of a kq_attn_args struct, one thread."},
    {"epilogue", py_epilogue, METH_VARARGS,
     "epilogue(out, ldo, t, n, bias, act, path): out[:t, :n] += bias (0: none), then GELU if act == 1."},
    {"matmul", py_matmul, METH_VARARGS,
     "matmul(type, w, n, k, x, t, ldx, out, ldo, path): out = x @ dequant(w).T on one thread, with the\n"
     "named path ('plain' or PATH)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    kq_dispatch_init();
    int runs[KQ_NPATHS];
    for (int i = 0; i < KQ_NPATHS; i++) runs[i] = i == KQ_PLAIN || i == kq_dispatch.id;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *compiled = path_tuple(kq_compiled), *supported = path_tuple(runs);
    const int bad = !compiled || !supported || PyModule_AddObjectRef(m, "COMPILED", compiled) ||
                    PyModule_AddObjectRef(m, "SUPPORTED", supported) ||
                    PyModule_AddStringConstant(m, "PATH", kq_dispatch.name) ||
                    PyModule_AddIntConstant(m, "ROWS", ROWS) || PyModule_AddIntConstant(m, "QK", QK) ||
                    PyModule_AddIntConstant(m, "Q4_0_X8", TYPE_Q4_0_X8) ||
                    PyModule_AddIntConstant(m, "ACT_GELU", KQ_ACT_GELU) ||
                    PyModule_AddIntConstant(m, "ATTENTION1_OWN", kq_dispatch.attention1_own);
    Py_XDECREF(compiled);
    Py_XDECREF(supported);
    if (bad) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
