/* The fields of many tensors in one pass: the compiled core of flattening a state_dict.
 *
 * A model's state_dict holds tens of thousands of DTensors. Flattening one reads about ten
 * attributes of it (its spec, the spec's mesh, placements, global shape and shard order,
 * its local tensor, that tensor's shape and dtype) and looks its box up in a cache. As a
 * Python pass per attribute, each pass meets every object again, fresh from memory; here
 * one loop reads all of one DTensor's attributes while its objects are in the cache. Only
 * the Python C API is used: the same attributes Python reads, through the same getters.
 *
 * dtensor_rows(values, known, replicate, shard) -> (locals, global_shapes, boxes, dtypes)
 *   For each DTensor of the list `values`: key = (id(spec.mesh), placements or None,
 *   spec.tensor_meta.shape, getattr(spec, "shard_order", None)), looked up in `known`
 *   (a mapping: key -> (mesh, global shape, box)). The placements are None when they equal
 *   those of values[0], shown without calling a Placement's __eq__ or __hash__: the same
 *   object, or at each mesh dimension the exact class `replicate`, or the exact class
 *   `shard` with an equal `dim`. Returns None when a spec has no tensor_meta, and the index
 *   of the first DTensor whose local tensor's shape is not its box's.
 * host_addresses(tensors, addresses, nbytes) -> None
 *   For each tensor of the list `tensors`: addresses[i] = t.data_ptr() if t.is_cpu and
 *   t.is_contiguous() and not t.is_conj() and not t.is_neg() else 0 (memory holding the
 *   tensor's values); nbytes[i] = t.nbytes. `addresses` and `nbytes` are writable
 *   C-contiguous buffers of len(tensors) 8-byte integers (int64 numpy arrays).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *s_spec, *s_tensor_meta, *s_mesh, *s_placements, *s_shape, *s_shard_order,
    *s_local_tensor, *s_dtype, *s_dim, *s_is_cpu, *s_is_contiguous, *s_data_ptr, *s_nbytes, *s_is_conj, *s_is_neg;

/* The placements every DTensor is compared with: values[0]'s, and the dim of each of its
 * `shard` placements (NULL elsewhere). `usable` is 0 when they are not a tuple. */
typedef struct {
    PyObject *tuple;
    PyObject **dims;
    Py_ssize_t n;
    int usable;
} First;

static void first_clear(First *f) {
    if (f->dims) {
        for (Py_ssize_t j = 0; j < f->n; j++) Py_XDECREF(f->dims[j]);
        PyMem_Free(f->dims);
    }
    Py_XDECREF(f->tuple);
    f->dims = NULL;
    f->tuple = NULL;
}

/* 0, or -1 with an exception set (out of memory). A placement whose dim cannot be read
 * makes the tuple unusable: every DTensor then keys by its own placements. */
static int first_set(First *f, PyObject *placements, PyObject *shard) {
    f->tuple = Py_NewRef(placements);
    f->usable = PyTuple_CheckExact(placements);
    if (!f->usable) return 0;
    f->n = PyTuple_GET_SIZE(placements);
    f->dims = PyMem_Calloc(f->n ? f->n : 1, sizeof(PyObject *));
    if (!f->dims) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < f->n; j++) {
        PyObject *p = PyTuple_GET_ITEM(placements, j);
        if ((PyObject *)Py_TYPE(p) != shard) continue;
        f->dims[j] = PyObject_GetAttr(p, s_dim);
        if (!f->dims[j]) {
            PyErr_Clear();
            f->usable = 0;
            return 0;
        }
    }
    return 0;
}

/* 1: `placements` equals the first ones (as shown above); 0: not shown; -1: an error. */
static int same_as_first(PyObject *placements, const First *f, PyObject *replicate,
                         PyObject *shard) {
    if (placements == f->tuple) return 1;
    if (!f->usable || !PyTuple_CheckExact(placements) || PyTuple_GET_SIZE(placements) != f->n)
        return 0;
    for (Py_ssize_t j = 0; j < f->n; j++) {
        PyObject *p = PyTuple_GET_ITEM(placements, j), *q = PyTuple_GET_ITEM(f->tuple, j);
        PyObject *kind = (PyObject *)Py_TYPE(p);
        if (p == q) continue;
        if (kind != (PyObject *)Py_TYPE(q)) return 0;
        if (kind == replicate) continue;
        if (kind != shard) return 0;
        PyObject *dim = PyObject_GetAttr(p, s_dim);
        if (!dim) {
            PyErr_Clear();
            return 0;
        }
        int equal = PyLong_CheckExact(dim) && PyLong_CheckExact(f->dims[j])
                        ? PyObject_RichCompareBool(dim, f->dims[j], Py_EQ)
                        : 0;
        Py_DECREF(dim);
        if (equal <= 0) return equal;
    }
    return 1;
}

/* getattr(obj, name, None) */
static PyObject *attr_or_none(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (!value && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        value = Py_NewRef(Py_None);
    }
    return value;
}

/* The cache key of one DTensor's spec (a new reference), or NULL with an exception set; sets
 * *no_meta when the spec has no tensor_meta. */
static PyObject *spec_key(PyObject *spec, First *first, PyObject *replicate, PyObject *shard,
                          int *no_meta) {
    PyObject *key = NULL, *mesh = NULL, *placements = NULL, *shape = NULL, *order = NULL,
             *mesh_id = NULL;
    PyObject *meta = PyObject_GetAttr(spec, s_tensor_meta);
    if (!meta) return NULL;
    if (meta == Py_None) {
        *no_meta = 1;
        goto done;
    }
    if (!(mesh = PyObject_GetAttr(spec, s_mesh))) goto done;
    if (!(placements = PyObject_GetAttr(spec, s_placements))) goto done;
    if (!(shape = PyObject_GetAttr(meta, s_shape))) goto done;
    if (!(order = attr_or_none(spec, s_shard_order))) goto done;
    if (!first->tuple && first_set(first, placements, shard) < 0) goto done;
    int same = same_as_first(placements, first, replicate, shard);
    if (same < 0) goto done;
    if (!(mesh_id = PyLong_FromVoidPtr(mesh))) goto done;
    key = PyTuple_Pack(4, mesh_id, same ? Py_None : placements, shape, order);
done:
    Py_DECREF(meta);
    Py_XDECREF(mesh);
    Py_XDECREF(placements);
    Py_XDECREF(shape);
    Py_XDECREF(order);
    Py_XDECREF(mesh_id);
    return key;
}

static PyObject *py_dtensor_rows(PyObject *self, PyObject *args) {
    PyObject *values, *known, *replicate, *shard;
    if (!PyArg_ParseTuple(args, "O!OOO:dtensor_rows", &PyList_Type, &values, &known, &replicate,
                          &shard))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(values);
    PyObject *locals = PyList_New(n), *shapes = PyList_New(n), *boxes = PyList_New(n),
             *dtypes = PyList_New(n), *out = NULL;
    First first = {NULL, NULL, 0, 0};
    if (!locals || !shapes || !boxes || !dtypes) goto done;
    for (Py_ssize_t i = 0; i < n && i < PyList_GET_SIZE(values); i++) {
        PyObject *value = Py_NewRef(PyList_GET_ITEM(values, i)); /* `known` runs Python */
        PyObject *spec = PyObject_GetAttr(value, s_spec);
        int no_meta = 0;
        PyObject *key = spec ? spec_key(spec, &first, replicate, shard, &no_meta) : NULL;
        Py_XDECREF(spec);
        PyObject *found = key ? PyObject_GetItem(known, key) : NULL;
        Py_XDECREF(key);
        if (!found) {
            Py_DECREF(value);
            if (no_meta) out = Py_NewRef(Py_None);
            goto done;
        }
        PyObject *box = NULL;
        if (PyTuple_CheckExact(found) && PyTuple_GET_SIZE(found) == 3) box = PyTuple_GET_ITEM(found, 2);
        if (!box || !PyTuple_CheckExact(box) || PyTuple_GET_SIZE(box) != 2) {
            Py_DECREF(found);
            Py_DECREF(value);
            PyErr_SetString(PyExc_TypeError, "dtensor_rows: known[key] is not (mesh, shape, box)");
            goto done;
        }
        PyObject *local = PyObject_GetAttr(value, s_local_tensor);
        PyObject *local_shape = local ? PyObject_GetAttr(local, s_shape) : NULL;
        int fits = local_shape ? PyObject_RichCompareBool(local_shape, PyTuple_GET_ITEM(box, 1), Py_EQ) : -1;
        Py_XDECREF(local_shape);
        PyObject *dtype = fits > 0 ? PyObject_GetAttr(local, s_dtype) : NULL;
        Py_DECREF(value);
        if (!dtype) {
            Py_XDECREF(local);
            Py_DECREF(found);
            if (fits == 0) out = PyLong_FromSsize_t(i);
            goto done;
        }
        PyList_SET_ITEM(locals, i, local);
        PyList_SET_ITEM(shapes, i, Py_NewRef(PyTuple_GET_ITEM(found, 1)));
        PyList_SET_ITEM(boxes, i, Py_NewRef(box));
        PyList_SET_ITEM(dtypes, i, dtype);
        Py_DECREF(found);
    }
    if (PyList_GET_SIZE(values) != n) {
        PyErr_SetString(PyExc_RuntimeError, "dtensor_rows: the list changed size");
        goto done;
    }
    out = PyTuple_Pack(4, locals, shapes, boxes, dtypes);
done:
    first_clear(&first);
    Py_XDECREF(locals);
    Py_XDECREF(shapes);
    Py_XDECREF(boxes);
    Py_XDECREF(dtypes);
    return out;
}

/* A writable buffer of `n` 8-byte integers, or -1 with an exception set. */
static int int64_column(PyObject *obj, Py_buffer *view, Py_ssize_t n, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->itemsize != 8 || view->len != n * 8) {
        PyErr_Format(PyExc_ValueError, "host_addresses: %s must hold %zd 8-byte integers", what, n);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* An integer that fits int64, or -1 with an exception set (the caller checks). */
static int as_int64(PyObject *obj, int64_t *out) {
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

static PyObject *py_host_addresses(PyObject *self, PyObject *args) {
    PyObject *tensors, *address_obj, *nbytes_obj;
    if (!PyArg_ParseTuple(args, "O!OO:host_addresses", &PyList_Type, &tensors, &address_obj,
                          &nbytes_obj))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(tensors);
    Py_buffer av, nv;
    if (int64_column(address_obj, &av, n, "addresses") < 0) return NULL;
    if (int64_column(nbytes_obj, &nv, n, "nbytes") < 0) {
        PyBuffer_Release(&av);
        return NULL;
    }
    int64_t *addresses = av.buf, *nbytes = nv.buf;
    int failed = 0;
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        if (i >= PyList_GET_SIZE(tensors)) {
            PyErr_SetString(PyExc_RuntimeError, "host_addresses: the list changed size");
            failed = 1;
            break;
        }
        PyObject *t = PyList_GET_ITEM(tensors, i);
        Py_INCREF(t);
        PyObject *flag = PyObject_GetAttr(t, s_is_cpu), *size = NULL, *address = NULL;
        int usable = flag ? PyObject_IsTrue(flag) : -1;
        Py_XDECREF(flag);
        if (usable > 0) {
            flag = PyObject_CallMethodNoArgs(t, s_is_contiguous);
            usable = flag ? PyObject_IsTrue(flag) : -1;
            Py_XDECREF(flag);
        }
        PyObject *const lazy_bits[2] = {s_is_conj, s_is_neg};
        for (int b = 0; b < 2 && usable > 0; b++) {
            flag = PyObject_CallMethodNoArgs(t, lazy_bits[b]);
            int set = flag ? PyObject_IsTrue(flag) : -1;
            usable = set < 0 ? -1 : !set;
            Py_XDECREF(flag);
        }
        if (usable > 0) address = PyObject_CallMethodNoArgs(t, s_data_ptr);
        if (usable >= 0 && (usable == 0 || address)) size = PyObject_GetAttr(t, s_nbytes);
        addresses[i] = 0;
        failed = !size || (address && as_int64(address, &addresses[i]) < 0) ||
                 as_int64(size, &nbytes[i]) < 0;
        Py_XDECREF(address);
        Py_XDECREF(size);
        Py_DECREF(t);
    }
    PyBuffer_Release(&av);
    PyBuffer_Release(&nv);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"dtensor_rows", py_dtensor_rows, METH_VARARGS,
     "Local tensors, global shapes, boxes and dtypes of many DTensors (see the module source)."},
    {"host_addresses", py_host_addresses, METH_VARARGS,
     "Host addresses and sizes in bytes of many tensors (see the module source)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tensor_fields",
                                    "The fields of many tensors in one pass.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__tensor_fields(void) {
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {{&s_spec, "_spec"},
                 {&s_tensor_meta, "tensor_meta"},
                 {&s_mesh, "mesh"},
                 {&s_placements, "placements"},
                 {&s_shape, "shape"},
                 {&s_shard_order, "shard_order"},
                 {&s_local_tensor, "_local_tensor"},
                 {&s_dtype, "dtype"},
                 {&s_dim, "dim"},
                 {&s_is_cpu, "is_cpu"},
                 {&s_is_contiguous, "is_contiguous"},
                 {&s_data_ptr, "data_ptr"},
                 {&s_nbytes, "nbytes"},
                 {&s_is_conj, "is_conj"},
                 {&s_is_neg, "is_neg"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].name);
        if (!*names[i].slot) return NULL;
    }
    return PyModule_Create(&module);
}
