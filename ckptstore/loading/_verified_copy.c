/* Verify-then-copy of many byte ranges in one call: the compiled core of a load.
 *
 * A load checks every chunk's crc32c and copies it into its destination. In Python that is a
 * loop of three calls per chunk, and for the tens of thousands of small tensors of a model
 * the copies go through the cache (each destination line is read before it is written).
 * Here one call verifies and copies a whole column of ranges: crc32c with the SSE4.2
 * instruction on three interleaved streams, and copies with non-temporal stores (the
 * destination is not read first, and the copy does not evict the source still to be read).
 *
 * Every range is checked against both buffers before a byte moves; a range whose crc32c
 * does not match is not copied and stops the call. Only built where the CPU has the
 * instruction (x86-64); elsewhere verified_copy.py uses its Python loop.
 *
 * check_and_copy(src, src_first, starts, ends, crcs, dest, dest_at) -> (status, index)
 *   src[0] is file byte src_first; range i is file bytes [starts[i], ends[i]), expected
 *   crc32c crcs[i], copied to dest[dest_at[i]:]. status 0: all copied (index -1); 1: range
 *   `index` failed its crc32c; 2: range `index` lies outside src or dest. Ranges before
 *   `index` were copied. The columns are numpy arrays (int64; crcs also uint32) or
 *   sequences of ints.
 * crc32c(buffer) -> int
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_SSE42_BUILD 1
#include <immintrin.h>
#else
#define HAVE_SSE42_BUILD 0
#endif

#define POLY 0x82f63b78u /* crc32c, reflected */
#define SHORT 256        /* bytes per stream in a short interleaved stretch */
#define LONG 8192        /* ... in a long one */

static int hardware = 0;
static uint32_t shift_short[4][256], shift_long[4][256];

/* a * b modulo the polynomial (reflected: bit 31 is x^0). */
static uint32_t multmodp(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

/* x^(8n) modulo the polynomial: the operator that appends n zero bytes to a crc register. */
static uint32_t x8n(size_t n) {
    uint32_t xp = 1u << 31, sq = 1u << 30; /* 1, x */
    uint64_t bits = (uint64_t)n * 8;
    while (bits) {
        if (bits & 1) xp = multmodp(sq, xp);
        sq = multmodp(sq, sq);
        bits >>= 1;
    }
    return xp;
}

/* Tables that multiply a register by k one byte at a time (the operator is linear). */
static void shift_tables(uint32_t k, uint32_t t[4][256]) {
    for (int j = 0; j < 4; j++)
        for (uint32_t b = 0; b < 256; b++) t[j][b] = multmodp(k, b << (8 * j));
}

static inline uint32_t shifted(uint32_t t[4][256], uint32_t c) {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

#if HAVE_SSE42_BUILD
__attribute__((target("sse4.2"))) static uint32_t serial(uint64_t c, const unsigned char *p,
                                                         size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}

/* Three streams of `len` bytes at once (the instruction's latency is three cycles, its
 * throughput one), joined by shifting the first two over the bytes that follow them. */
__attribute__((target("sse4.2"))) static uint32_t stretch(uint32_t crc, const unsigned char *p,
                                                          size_t len, uint32_t t[4][256]) {
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    const unsigned char *a = p, *b = p + len, *d = p + 2 * len;
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w0, w1, w2;
        memcpy(&w0, a + i, 8);
        memcpy(&w1, b + i, 8);
        memcpy(&w2, d + i, 8);
        c0 = __builtin_ia32_crc32di(c0, w0);
        c1 = __builtin_ia32_crc32di(c1, w1);
        c2 = __builtin_ia32_crc32di(c2, w2);
    }
    uint32_t r = shifted(t, (uint32_t)c0) ^ (uint32_t)c1;
    return shifted(t, r) ^ (uint32_t)c2;
}

/* The crc register after `n` bytes from register `crc` (no pre- or post-inversion). */
static uint32_t crc_register(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 3 * LONG) {
        crc = stretch(crc, p, LONG, shift_long);
        p += 3 * LONG;
        n -= 3 * LONG;
    }
    while (n >= 3 * SHORT) {
        crc = stretch(crc, p, SHORT, shift_short);
        p += 3 * SHORT;
        n -= 3 * SHORT;
    }
    return serial(crc, p, n);
}

/* Copy without reading the destination into the cache first (streaming stores). */
__attribute__((target("sse2"))) static void stream_copy(unsigned char *d, const unsigned char *s,
                                                        size_t n) {
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (n < 256 + head) {
        memcpy(d, s, n);
        return;
    }
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i x0 = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i x1 = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i x2 = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i x3 = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), x0);
        _mm_stream_si128((__m128i *)(d + i + 16), x1);
        _mm_stream_si128((__m128i *)(d + i + 32), x2);
        _mm_stream_si128((__m128i *)(d + i + 48), x3);
    }
    memcpy(d + i, s + i, n - i);
}
#endif /* HAVE_SSE42_BUILD */

static PyObject *py_crc32c(PyObject *self, PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*:crc32c", &b)) return NULL;
    if (!hardware) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_RuntimeError, "no crc32c instruction on this CPU");
        return NULL;
    }
    uint32_t c = 0;
#if HAVE_SSE42_BUILD
    Py_BEGIN_ALLOW_THREADS c = ~crc_register(0xffffffffu, (const unsigned char *)b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(c);
}

/* One column as int64: from an array of int64, uint32 or int32 (numpy's, without a Python
 * object per entry), else from a sequence of Python ints. NULL and an exception when an
 * entry is not an int, or the column does not have n entries. */
static int64_t *int_column(PyObject *obj, Py_ssize_t n, const char *what) {
    int64_t *out = PyMem_Malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    Py_buffer view;
    if (PyObject_CheckBuffer(obj) && PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        const char *f = view.format ? view.format : "B";
        if (*f == '<' || *f == '=' || *f == '@') f++;
        int ok = view.ndim == 1 && view.shape[0] == n && f[0] && !f[1];
        if (ok && view.itemsize == 8 && (f[0] == 'q' || f[0] == 'l')) {
            memcpy(out, view.buf, sizeof(int64_t) * (size_t)n);
        } else if (ok && view.itemsize == 4 && (f[0] == 'I' || f[0] == 'L')) {
            for (Py_ssize_t i = 0; i < n; i++) out[i] = ((const uint32_t *)view.buf)[i];
        } else if (ok && view.itemsize == 4 && (f[0] == 'i' || f[0] == 'l')) {
            for (Py_ssize_t i = 0; i < n; i++) out[i] = ((const int32_t *)view.buf)[i];
        } else {
            PyBuffer_Release(&view);
            PyMem_Free(out);
            PyErr_Format(PyExc_ValueError, "%s: not %zd int64, uint32 or int32 entries", what, n);
            return NULL;
        }
        PyBuffer_Release(&view);
        return out;
    }
    PyErr_Clear();
    PyObject *fast = PySequence_Fast(obj, what);
    if (!fast) {
        PyMem_Free(out);
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: %zd entries, expected %zd", what,
                     PySequence_Fast_GET_SIZE(fast), n);
        Py_DECREF(fast);
        PyMem_Free(out);
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(items[i]);
        if (out[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            PyMem_Free(out);
            return NULL;
        }
    }
    Py_DECREF(fast);
    return out;
}

static PyObject *py_check_and_copy(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    long long first;
    PyObject *starts, *ends, *crcs, *at;
    if (!PyArg_ParseTuple(args, "y*LOOOw*O:check_and_copy", &src, &first, &starts, &ends, &crcs,
                          &dst, &at))
        return NULL;
    PyObject *out = NULL;
    int64_t *lo = NULL, *hi = NULL, *crc = NULL, *d = NULL;
    if (!hardware) {
        PyErr_SetString(PyExc_RuntimeError, "no crc32c instruction on this CPU");
        goto done;
    }
    if (first < 0) {
        PyErr_SetString(PyExc_ValueError, "src_first must not be negative");
        goto done;
    }
    Py_ssize_t n = PyObject_Length(starts);
    if (n < 0) goto done;
    if (!(lo = int_column(starts, n, "starts")) || !(hi = int_column(ends, n, "ends")) ||
        !(crc = int_column(crcs, n, "crcs")) || !(d = int_column(at, n, "dest_at")))
        goto done;
    int status = 0;
    Py_ssize_t i = 0;
#if HAVE_SSE42_BUILD
    const unsigned char *s = (const unsigned char *)src.buf;
    unsigned char *t = (unsigned char *)dst.buf;
    const int64_t slen = (int64_t)src.len, dlen = (int64_t)dst.len;
    Py_BEGIN_ALLOW_THREADS for (; i < n; i++) {
        /* Offsets relative to the buffers, each bound checked without overflow. */
        if (lo[i] < first || hi[i] < lo[i] || lo[i] - first > slen || hi[i] - lo[i] > slen - (lo[i] - first) ||
            d[i] < 0 || d[i] > dlen || hi[i] - lo[i] > dlen - d[i]) {
            status = 2;
            break;
        }
        const unsigned char *p = s + (lo[i] - first);
        size_t len = (size_t)(hi[i] - lo[i]);
        if ((uint32_t)~crc_register(0xffffffffu, p, len) != (uint32_t)crc[i] || crc[i] < 0 ||
            crc[i] > 0xffffffffLL) {
            status = 1;
            break;
        }
        stream_copy(t + d[i], p, len);
    }
    _mm_sfence();
    Py_END_ALLOW_THREADS
#endif
    out = Py_BuildValue("(in)", status, status ? i : (Py_ssize_t)-1);
done:
    PyMem_Free(lo);
    PyMem_Free(hi);
    PyMem_Free(crc);
    PyMem_Free(d);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return out;
}

static PyMethodDef methods[] = {
    {"crc32c", py_crc32c, METH_VARARGS, "crc32c of a buffer."},
    {"check_and_copy", py_check_and_copy, METH_VARARGS,
     "Verify byte ranges of src by crc32c and copy each into dest (see the module source)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_verified_copy",
                                    "Verify-then-copy of many byte ranges in one call.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__verified_copy(void) {
#if HAVE_SSE42_BUILD
    __builtin_cpu_init();
    hardware = __builtin_cpu_supports("sse4.2");
#endif
    if (hardware) {
        shift_tables(x8n(SHORT), shift_short);
        shift_tables(x8n(LONG), shift_long);
    }
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "HARDWARE", hardware) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
