/* asymstore._native: a host-memory copy with non-temporal stores, for the snapshot copy thread.
 *
 * The copy thread copies the training state into a host snapshot slot while training runs. glibc's
 * memmove uses cached stores (``rep movsb``) below a large size threshold (3/4 of the last-level cache,
 * hundreds of MiB on server parts), so a partition-sized copy reads every destination line before
 * overwriting it and fills the caches training is using with bytes nobody reads soon. Streaming stores
 * skip both (benchmarks/bench_hostcopy.py measures the difference).
 *
 * copy(dst, src, n) takes raw addresses (Python ints), releases the GIL, and returns None. Where SSE2 is
 * not available at compile time it is a plain memcpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static void stream_copy(unsigned char *d, const unsigned char *s, size_t n) {
#if defined(__SSE2__)
    size_t head = (64 - ((uintptr_t)d & 63)) & 63; /* align the destination to a cache line */
    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    size_t lines = n / 64;
    for (size_t i = 0; i < lines; i++, s += 64, d += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + 0));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)(d + 0), a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    _mm_sfence(); /* streaming stores are weakly ordered: make them visible before returning */
    memcpy(d, s, n - lines * 64);
#else
    memcpy(d, s, n);
#endif
}

static PyObject *native_copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKn:copy", &dst, &src, &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "copy: negative length");
        return NULL;
    }
    if (n == 0)
        Py_RETURN_NONE;
    if (!dst || !src) {
        PyErr_SetString(PyExc_ValueError, "copy: null address");
        return NULL;
    }
    unsigned char *d = (unsigned char *)(uintptr_t)dst;
    const unsigned char *s = (const unsigned char *)(uintptr_t)src;
    if ((d < s + n) && (s < d + n)) { /* overlapping ranges: memmove's job */
        Py_BEGIN_ALLOW_THREADS
        memmove(d, s, (size_t)n);
        Py_END_ALLOW_THREADS
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    stream_copy(d, s, (size_t)n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", native_copy, METH_VARARGS,
     "copy(dst, src, n): copy n bytes between raw addresses with non-temporal stores (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "asymstore._native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#if defined(__SSE2__)
    if (PyModule_AddIntConstant(m, "STREAMING", 1) < 0) {
#else
    if (PyModule_AddIntConstant(m, "STREAMING", 0) < 0) {
#endif
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
