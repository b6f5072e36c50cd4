/* The two passes of a SIP message's plain parse that touch every byte of its header
 * block, as native code: e911_sip/sip/headscan.py holds the Python functions they replace,
 * with the same contract, and docs/decisions.md says why and what it gains.
 *
 * Compiled by mypyc, each string operation the parse makes from Python (a split, a
 * startswith per header line, a join and two searches to rule out a bare CR or LF) is a
 * call of a few hundred instructions; done here they are a memchr or a memcmp per line.
 * Nothing here decides anything headscan.py would not: a block these functions cannot
 * vouch for is answered None or False, and the careful parse reads it again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* split_head(data) -> (end, start_line, header_lines) | None
 *
 * ``end`` is the index of the first CRLFCRLF (the end of the header block), the start line
 * and the header lines are the block cut at each CRLF, each decoded as latin-1. None when
 * there is no CRLFCRLF past the first byte, a CR or LF outside those CRLFs, no header line,
 * or an empty start line.
 */
static PyObject *
split_head(PyObject *module, PyObject *data)
{
    Py_buffer view;
    const char *base;
    Py_ssize_t size;
    int have_view = 0;
    PyObject *result = NULL;

    (void)module;
    if (PyBytes_CheckExact(data)) {
        base = PyBytes_AS_STRING(data);
        size = PyBytes_GET_SIZE(data);
    }
    else {
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        have_view = 1;
        base = (const char *)view.buf;
        size = view.len;
    }

    /* One pass over the lines up to the first CRLFCRLF: every LF must follow a CR, and no
     * other CR may stand inside a line. A bare CR or LF before that CRLFCRLF lies inside
     * the block, so the block is not plain whichever comes first. */
    const char *limit = base + size;
    const char *p = base;
    const char *stop = NULL;
    Py_ssize_t cuts = 0;
    for (;;) {
        const char *lf = memchr(p, '\n', (size_t)(limit - p));
        if (lf == NULL) {
            goto none; /* no end of the block */
        }
        if (lf == base || lf[-1] != '\r' || memchr(p, '\r', (size_t)(lf - 1 - p)) != NULL) {
            goto none; /* a bare LF, or a CR inside a line */
        }
        if (limit - lf > 2 && lf[1] == '\r' && lf[2] == '\n') {
            stop = lf - 1;
            break;
        }
        cuts++;
        p = lf + 1;
    }
    if (cuts == 0 || base[0] == '\r') {
        goto none; /* no header line, or an empty start line (a CRLF before it) */
    }
    const Py_ssize_t end = stop - base;

    PyObject *lines = PyList_New(cuts);
    if (lines == NULL) {
        goto error;
    }
    const char *line = base;
    const char *crlf = memchr(line, '\r', (size_t)(stop - line));
    PyObject *first = PyUnicode_DecodeLatin1(line, crlf - line, NULL);
    if (first == NULL) {
        Py_DECREF(lines);
        goto error;
    }
    for (Py_ssize_t i = 0; i < cuts; i++) {
        line = crlf + 2;
        crlf = (i + 1 < cuts) ? memchr(line, '\r', (size_t)(stop - line)) : stop;
        PyObject *text = PyUnicode_DecodeLatin1(line, crlf - line, NULL);
        if (text == NULL) {
            Py_DECREF(first);
            Py_DECREF(lines);
            goto error;
        }
        PyList_SET_ITEM(lines, i, text);
    }
    PyObject *index = PyLong_FromSsize_t(end);
    if (index == NULL) {
        Py_DECREF(first);
        Py_DECREF(lines);
        goto error;
    }
    result = PyTuple_New(3);
    if (result == NULL) {
        Py_DECREF(index);
        Py_DECREF(first);
        Py_DECREF(lines);
        goto error;
    }
    PyTuple_SET_ITEM(result, 0, index);
    PyTuple_SET_ITEM(result, 1, first);
    PyTuple_SET_ITEM(result, 2, lines);
    goto done;

none:
    result = Py_NewRef(Py_None);
done:
error:
    if (have_view) {
        PyBuffer_Release(&view);
    }
    return result;
}

/* names_match(lines, spellings) -> bool
 *
 * True when the two lists are as long as each other and each line starts with the
 * spelling at its index: ``all(line.startswith(s) for line, s in zip(lines, spellings))``.
 */
static PyObject *
names_match(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "names_match() takes exactly 2 arguments");
        return NULL;
    }
    PyObject *lines = args[0];
    PyObject *spellings = args[1];
    if (!PyList_Check(lines) || !PyList_Check(spellings)) {
        PyErr_SetString(PyExc_TypeError, "names_match() takes two lists");
        return NULL;
    }
    const Py_ssize_t count = PyList_GET_SIZE(lines);
    if (PyList_GET_SIZE(spellings) != count) {
        Py_RETURN_FALSE;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        PyObject *spelt = PyList_GET_ITEM(spellings, i);
        if (!PyUnicode_Check(line) || !PyUnicode_Check(spelt)) {
            PyErr_SetString(PyExc_TypeError, "names_match() compares strings");
            return NULL;
        }
        const Py_ssize_t length = PyUnicode_GET_LENGTH(spelt);
        if (PyUnicode_GET_LENGTH(line) < length) {
            Py_RETURN_FALSE;
        }
        if (PyUnicode_KIND(line) == PyUnicode_1BYTE_KIND
            && PyUnicode_KIND(spelt) == PyUnicode_1BYTE_KIND) {
            if (memcmp(PyUnicode_DATA(line), PyUnicode_DATA(spelt), (size_t)length) != 0) {
                Py_RETURN_FALSE;
            }
        }
        else {
            /* Wider strings than latin-1 never come from a parse; compared the slow way. */
            Py_ssize_t hit = PyUnicode_Tailmatch(line, spelt, 0, PY_SSIZE_T_MAX, -1);
            if (hit < 0) {
                return NULL;
            }
            if (hit == 0) {
                Py_RETURN_FALSE;
            }
        }
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"split_head", (PyCFunction)split_head, METH_O,
     "split_head(data) -> (end, start_line, header_lines) or None"},
    {"names_match", (PyCFunction)(void (*)(void))names_match, METH_FASTCALL,
     "names_match(lines, spellings) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "e911_sip.sip._headscan",
    .m_doc = "Native passes over a SIP header block; see e911_sip.sip.headscan.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__headscan(void)
{
    return PyModuleDef_Init(&module_def);
}
