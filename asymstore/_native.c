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
 *
 * crc32c_copy(dst, src, n, value) copies n bytes and returns their crc32c (Castagnoli, continuing from value,
 * as the crc32c package computes it) in the same pass: a restore from a host slot into new memory reads each
 * byte once. The checksum uses the SSE4.2 crc32 instruction on three interleaved lanes (its latency is three
 * times its throughput), whose lane checksums are combined with a precomputed "append LANE zero bytes"
 * operator; a memory-bound copy hides it entirely. CRC32C says whether the running CPU has the instruction;
 * where it is 0, crc32c_copy raises and callers use the crc32c package and copy().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_CRC32C_HW 1
#include <nmmintrin.h>
#else
#define HAVE_CRC32C_HW 0
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

#if HAVE_CRC32C_HW
#define LANE 8192 /* bytes per lane; three lanes (24 KiB) of source stay in L1 while they are copied */
static uint32_t zeros_op[4][256]; /* the raw crc state after LANE zero bytes, as four byte-indexed tables */
static int crc_hw;                /* the running CPU has SSE4.2 and zeros_op is filled */

__attribute__((target("sse4.2"))) static uint32_t crc_raw(uint32_t c, const unsigned char *p, size_t n) {
    uint64_t v = c;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        v = _mm_crc32_u64(v, w);
    }
    c = (uint32_t)v;
    for (; n; n--, p++)
        c = _mm_crc32_u8(c, *p);
    return c;
}

static inline uint32_t append_zeros(uint32_t c) {
    return zeros_op[0][c & 255] ^ zeros_op[1][(c >> 8) & 255] ^ zeros_op[2][(c >> 16) & 255] ^ zeros_op[3][c >> 24];
}

/* The raw state is linear over GF(2): crc_raw(s, A || B) = zeros(|B|)(crc_raw(s, A)) ^ crc_raw(0, B). The
 * operator for |B| = LANE is built from its images of the 32 basis states. */
static void crc_init(void) {
    static const unsigned char zero[LANE];
    uint32_t basis[32];
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("sse4.2"))
        return;
    for (int i = 0; i < 32; i++)
        basis[i] = crc_raw(1u << i, zero, LANE);
    for (int j = 0; j < 4; j++)
        for (int b = 0; b < 256; b++) {
            uint32_t r = 0;
            for (int k = 0; k < 8; k++)
                if ((b >> k) & 1)
                    r ^= basis[8 * j + k];
            zeros_op[j][b] = r;
        }
    crc_hw = 1;
}

__attribute__((target("sse4.2"))) static uint32_t crc_copy(unsigned char *d, const unsigned char *s, size_t n,
                                                            uint32_t value) {
    uint32_t c = ~value;
    for (; n >= 3 * LANE; n -= 3 * LANE, s += 3 * LANE, d += 3 * LANE) {
        uint64_t a = c, b = 0, e = 0;
        for (size_t i = 0; i < LANE; i += 8) {
            uint64_t x, y, z;
            memcpy(&x, s + i, 8);
            memcpy(&y, s + LANE + i, 8);
            memcpy(&z, s + 2 * LANE + i, 8);
            a = _mm_crc32_u64(a, x);
            b = _mm_crc32_u64(b, y);
            e = _mm_crc32_u64(e, z);
            memcpy(d + i, &x, 8);
            memcpy(d + LANE + i, &y, 8);
            memcpy(d + 2 * LANE + i, &z, 8);
        }
        c = append_zeros(append_zeros((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)e;
    }
    memcpy(d, s, n);
    return ~crc_raw(c, s, n);
}
#endif

static PyObject *native_crc32c_copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src;
    Py_ssize_t n;
    unsigned int value = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKn|I:crc32c_copy", &dst, &src, &n, &value))
        return NULL;
#if HAVE_CRC32C_HW
    if (!crc_hw) {
#endif
        PyErr_SetString(PyExc_RuntimeError, "crc32c_copy: this CPU has no crc32c instruction (see CRC32C)");
        return NULL;
#if HAVE_CRC32C_HW
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "crc32c_copy: negative length");
        return NULL;
    }
    if (n == 0)
        return PyLong_FromUnsignedLong(value);
    if (!dst || !src) {
        PyErr_SetString(PyExc_ValueError, "crc32c_copy: null address");
        return NULL;
    }
    unsigned char *d = (unsigned char *)(uintptr_t)dst;
    const unsigned char *s = (const unsigned char *)(uintptr_t)src;
    if ((d < s + n) && (s < d + n)) {
        PyErr_SetString(PyExc_ValueError, "crc32c_copy: the ranges overlap");
        return NULL;
    }
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS
    crc = crc_copy(d, s, (size_t)n, value);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(crc);
#endif
}

static PyMethodDef methods[] = {
    {"copy", native_copy, METH_VARARGS,
     "copy(dst, src, n): copy n bytes between raw addresses with non-temporal stores (GIL released)."},
    {"crc32c_copy", native_crc32c_copy, METH_VARARGS,
     "crc32c_copy(dst, src, n, value=0): copy n bytes between raw addresses and return their crc32c, continuing "
     "from value, in one pass (GIL released; RuntimeError where CRC32C is 0)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "asymstore._native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#if HAVE_CRC32C_HW
    crc_init();
    if (PyModule_AddIntConstant(m, "CRC32C", crc_hw) < 0) {
#else
    if (PyModule_AddIntConstant(m, "CRC32C", 0) < 0) {
#endif
        Py_DECREF(m);
        return NULL;
    }
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
