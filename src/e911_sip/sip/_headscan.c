/* The passes of a SIP message's plain parse over its text, as native code: cutting the
 * header block into lines (split_head), confirming their names against a template and
 * reading the values of fixed form (read_plain), and reading a Via written the common way
 * (via_parts). e911_sip/sip/headscan.py and uri._via_parts hold the Python functions
 * they replace, with the same contract, and docs/decisions.md says why and what it gains.
 *
 * Compiled by mypyc, each string operation the parse makes from Python (a split, a
 * startswith per header line, a find, a slice, a strip) is a call of a few hundred
 * instructions; done here they are a memchr, a memcmp or a loop over a few bytes. Nothing
 * here decides anything the Python functions would not: what these cannot vouch for is
 * answered None or False, and the Python code reads it again. Every argument is checked
 * for its type: a wrong one raises TypeError, never reads memory it should not.
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

/* 1 when the two lists are as long as each other and each line starts with the spelling at
 * its index (headscan.names_match_python), 0 when not, -1 with an exception set. Both are
 * latin-1 strings, as split_head and the parser's templates make them. */
static int
match_names(PyObject *lines, PyObject *spellings)
{
    if (!PyList_Check(lines) || !PyList_Check(spellings)) {
        PyErr_SetString(PyExc_TypeError, "names are matched between two lists");
        return -1;
    }
    const Py_ssize_t count = PyList_GET_SIZE(lines);
    if (PyList_GET_SIZE(spellings) != count) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        PyObject *spelt = PyList_GET_ITEM(spellings, i);
        if (!PyUnicode_Check(line) || !PyUnicode_Check(spelt)
            || PyUnicode_KIND(line) != PyUnicode_1BYTE_KIND
            || PyUnicode_KIND(spelt) != PyUnicode_1BYTE_KIND) {
            PyErr_SetString(PyExc_TypeError, "names are matched between latin-1 strings");
            return -1;
        }
        const Py_ssize_t length = PyUnicode_GET_LENGTH(spelt);
        if (PyUnicode_GET_LENGTH(line) < length
            || memcmp(PyUnicode_DATA(line), PyUnicode_DATA(spelt), (size_t)length) != 0) {
            return 0;
        }
    }
    return 1;
}


/* -- read_plain ------------------------------------------------------------------------ */

/* The methods the plain parse takes (headscan.METHODS), as interned strings: a request's
 * method and its CSeq's are returned as these objects, with nothing to allocate. */
static const char *const METHOD_NAMES[] = {
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
    "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH",
};
#define METHOD_COUNT ((Py_ssize_t)(sizeof(METHOD_NAMES) / sizeof(METHOD_NAMES[0])))
static PyObject *methods[sizeof(METHOD_NAMES) / sizeof(METHOD_NAMES[0])];

/* What str.strip() removes, for the 256 characters of latin-1 (Py_UNICODE_ISSPACE). */
static int
is_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f) || c == 0x85
           || c == 0xa0;
}

typedef struct {
    const unsigned char *text;
    Py_ssize_t length;
} span;

static span
strip(span s)
{
    while (s.length > 0 && is_space(s.text[0])) {
        s.text++;
        s.length--;
    }
    while (s.length > 0 && is_space(s.text[s.length - 1])) {
        s.length--;
    }
    return s;
}

static Py_ssize_t
find_char(span s, unsigned char c, Py_ssize_t from)
{
    if (from >= s.length) {
        return -1;
    }
    const unsigned char *hit = memchr(s.text + from, c, (size_t)(s.length - from));
    return hit == NULL ? -1 : hit - s.text;
}

/* numbers.short_uint: one to nine ASCII digits, else -1. */
static long
short_uint(span s)
{
    if (s.length == 0 || s.length > 9) {
        return -1;
    }
    long value = 0;
    for (Py_ssize_t i = 0; i < s.length; i++) {
        unsigned int digit = (unsigned int)s.text[i] - '0';
        if (digit > 9) {
            return -1;
        }
        value = value * 10 + (long)digit;
    }
    return value;
}

static PyObject *
method_of(span s)
{
    for (Py_ssize_t i = 0; i < METHOD_COUNT; i++) {
        const char *name = METHOD_NAMES[i];
        if ((size_t)s.length == strlen(name) && memcmp(s.text, name, (size_t)s.length) == 0) {
            return methods[i];
        }
    }
    return NULL;
}

static PyObject *
text_of(span s)
{
    return PyUnicode_DecodeLatin1((const char *)s.text, s.length, NULL);
}

/* The text of a latin-1 string; 0 with TypeError for any other. */
static int
span_of(PyObject *text, span *out)
{
    if (!PyUnicode_Check(text) || PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND) {
        PyErr_SetString(PyExc_TypeError, "read_plain() reads latin-1 strings");
        return 0;
    }
    out->text = PyUnicode_1BYTE_DATA(text);
    out->length = PyUnicode_GET_LENGTH(text);
    return 1;
}

#define SLOTS 8

/* read_plain(data, end, first, lines, template, max_headers, datagram) -> tuple | False | None
 *
 * headscan.read_plain_python, for ``end``, ``first`` and ``lines`` as split_head gives
 * them; see there for what the tuple holds.
 */
static PyObject *
read_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "read_plain() takes exactly 7 arguments");
        return NULL;
    }
    PyObject *data = args[0];
    PyObject *first_obj = args[2];
    PyObject *lines = args[3];
    PyObject *template = args[4];
    const Py_ssize_t end = PyLong_AsSsize_t(args[1]);
    if (end == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const Py_ssize_t max_headers = PyLong_AsSsize_t(args[5]);
    if (max_headers == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const int datagram = PyObject_IsTrue(args[6]);
    if (datagram < 0) {
        return NULL;
    }
    if (!PyList_Check(lines) || !PyTuple_Check(template) || PyTuple_GET_SIZE(template) != 5) {
        PyErr_SetString(PyExc_TypeError, "read_plain() takes the lines and a template");
        return NULL;
    }
    if (!PyBytes_CheckExact(data)) {
        Py_RETURN_NONE;
    }
    const Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (end < 0 || end > size - 4) {
        PyErr_SetString(PyExc_ValueError, "read_plain() takes the end split_head found");
        return NULL;
    }
    PyObject *keys = PyTuple_GET_ITEM(template, 1);
    PyObject *at_obj = PyTuple_GET_ITEM(template, 2);
    PyObject *cut_obj = PyTuple_GET_ITEM(template, 4);
    if (!PyList_Check(keys) || !PyList_Check(at_obj) || !PyList_Check(cut_obj)
        || PyList_GET_SIZE(at_obj) != SLOTS || PyList_GET_SIZE(cut_obj) != SLOTS) {
        PyErr_SetString(PyExc_TypeError, "read_plain() takes a template as the parser keeps");
        return NULL;
    }
    int hit = match_names(lines, PyTuple_GET_ITEM(template, 0));
    if (hit <= 0) {
        /* False: the lines are not of this template's names (the caller makes another) */
        return hit < 0 ? NULL : Py_NewRef(Py_False);
    }
    const Py_ssize_t lengths = PyLong_AsSsize_t(PyTuple_GET_ITEM(template, 3));
    if (lengths == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const Py_ssize_t count = PyList_GET_SIZE(lines);
    if (count > max_headers || lengths != 1) {
        Py_RETURN_NONE;
    }
    Py_ssize_t at[SLOTS];
    span value[SLOTS];
    for (Py_ssize_t slot = 0; slot < SLOTS; slot++) {
        at[slot] = PyLong_AsSsize_t(PyList_GET_ITEM(at_obj, slot));
        const Py_ssize_t cut = PyLong_AsSsize_t(PyList_GET_ITEM(cut_obj, slot));
        if ((at[slot] == -1 || cut == -1) && PyErr_Occurred()) {
            return NULL;
        }
        value[slot].text = NULL;
        value[slot].length = 0;
        if (slot == 0 || at[slot] < 0) {
            continue;
        }
        if (at[slot] >= count || cut < 0) {
            PyErr_SetString(PyExc_ValueError, "read_plain() takes a template of these lines");
            return NULL;
        }
        span line;
        if (!span_of(PyList_GET_ITEM(lines, at[slot]), &line)) {
            return NULL;
        }
        /* line[cut:] */
        const Py_ssize_t from = cut < line.length ? cut : line.length;
        value[slot].text = line.text + from;
        value[slot].length = line.length - from;
    }
    if (at[1] < 0 || at[2] < 0 || at[3] < 0 || at[4] < 0 || at[5] < 0 || at[6] < 0) {
        Py_RETURN_NONE; /* a mandatory header missing: the careful path names it */
    }

    span v = strip(value[6]);
    const long length = v.length <= 5 ? short_uint(v) : -1;
    if (length < 0) {
        Py_RETURN_NONE;
    }
    const Py_ssize_t body_at = end + 4;
    Py_ssize_t body_end = size;
    if (length != size - body_at) {
        if (length > size - body_at) {
            Py_RETURN_NONE;
        }
        if (datagram) {
            body_end = body_at + length;
        }
    }

    v = strip(value[5]);
    const Py_ssize_t space = find_char(v, ' ', 0);
    if (space < 0) {
        Py_RETURN_NONE;
    }
    const long number = short_uint((span){v.text, space});
    PyObject *cseq_method =
        method_of((span){v.text + space + 1, v.length - space - 1});
    if (cseq_method == NULL || number < 0) {
        Py_RETURN_NONE;
    }

    const span call_id = strip(value[4]);
    if (call_id.length == 0) {
        Py_RETURN_NONE;
    }

    v = value[2];
    Py_ssize_t lt = find_char(v, '<', 0);
    const int from_check =
        lt < 0 || find_char(v, '"', 0) >= 0 || find_char(v, '>', lt) < 0;
    const span from_value = strip(v);
    v = value[3];
    lt = find_char(v, '<', 0);
    const int to_check = lt < 0 || find_char(v, '"', 0) >= 0 || find_char(v, '>', lt) < 0;
    const span to_value = strip(v);

    v = value[1];
    const Py_ssize_t comma = find_char(v, ',', 0);
    span via = strip(comma < 0 ? v : (span){v.text, comma});
    const int via_plain =
        via.length > 0 && find_char(via, '"', 0) < 0 && find_char(via, '<', 0) < 0;
    if (!via_plain) {
        via = strip(v);
    }

    span first;
    if (!span_of(first_obj, &first)) {
        return NULL;
    }
    long status = 0;
    span text;
    span mf = {NULL, 0};
    long mf_read = -2; /* -2: no Max-Forwards; -1: the text; else its value */
    if (first.length >= 8 && memcmp(first.text, "SIP/2.0 ", 8) == 0) {
        const Py_ssize_t gap = find_char(first, ' ', 8);
        const span code = {first.text + 8, (gap < 0 ? first.length : gap) - 8};
        text = gap < 0 ? (span){first.text, 0}
                       : (span){first.text + gap + 1, first.length - gap - 1};
        status = code.length == 3 ? short_uint(code) : -1;
        if (status < 100) {
            Py_RETURN_NONE; /* not three digits, or a first digit of 0 */
        }
    }
    else {
        const Py_ssize_t one = find_char(first, ' ', 0);
        const Py_ssize_t two = one < 0 ? -1 : find_char(first, ' ', one + 1);
        if (two < 0 || find_char(first, ' ', two + 1) >= 0) {
            Py_RETURN_NONE; /* not three parts */
        }
        const span method = {first.text, one};
        const span version = {first.text + two + 1, first.length - two - 1};
        text = (span){first.text + one + 1, two - one - 1};
        if (method_of(method) != cseq_method || version.length != 7
            || memcmp(version.text, "SIP/2.0", 7) != 0 || text.length == 0) {
            Py_RETURN_NONE;
        }
        if (at[7] >= 0) {
            mf = strip(value[7]);
            mf_read = mf.length < 4 ? short_uint(mf) : -1;
        }
    }

    /* Every check passed: the values as objects. */
    PyObject *items[13] = {NULL};
    items[0] = PyList_GetSlice(keys, 0, PyList_GET_SIZE(keys));
    items[1] = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + body_at, body_end - body_at);
    items[2] = body_end == size ? Py_NewRef(data)
                                : PyBytes_FromStringAndSize(PyBytes_AS_STRING(data), body_end);
    PyObject *cseq_number = PyLong_FromLong(number);
    items[3] = cseq_number == NULL ? NULL : PyTuple_Pack(2, cseq_number, cseq_method);
    Py_XDECREF(cseq_number);
    items[4] = text_of(call_id);
    items[5] = from_check ? text_of(from_value) : Py_NewRef(Py_None);
    items[6] = text_of(to_value);
    items[7] = PyBool_FromLong(to_check);
    items[8] = text_of(via);
    items[9] = PyBool_FromLong(via_plain);
    items[10] = PyLong_FromLong(status);
    items[11] = text_of(text); /* the reason phrase, or the Request-URI */
    items[12] = mf_read >= 0    ? PyLong_FromLong(mf_read)
                : mf_read == -1 ? text_of(mf)
                                : Py_NewRef(Py_None);
    PyObject *result = PyTuple_New(13);
    for (Py_ssize_t i = 0; i < 13; i++) {
        if (items[i] == NULL || result == NULL) {
            for (Py_ssize_t j = 0; j < 13; j++) {
                Py_XDECREF(items[j]);
            }
            Py_XDECREF(result);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < 13; i++) {
        PyTuple_SET_ITEM(result, i, items[i]);
    }
    return result;
}

/* -- via_parts ------------------------------------------------------------------------- */

/* The sent-protocols uri._VIA_PROTOCOLS spells, and the transports they give. */
static const char *const PROTOCOLS[] = {
    "SIP/2.0/UDP", "SIP/2.0/TCP", "SIP/2.0/TLS", "SIP/2.0/SCTP", "SIP/2.0/TLS-SCTP",
    "SIP/2.0/WS", "SIP/2.0/WSS",
};
#define PROTOCOL_COUNT ((Py_ssize_t)(sizeof(PROTOCOLS) / sizeof(PROTOCOLS[0])))
static PyObject *transports[sizeof(PROTOCOLS) / sizeof(PROTOCOLS[0])];

/* Whitespace of str.split() among the ASCII characters. */
static int
is_ascii_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

static PyObject *
lower_text(const unsigned char *text, Py_ssize_t length)
{
    PyObject *out = PyUnicode_New(length, 127);
    if (out == NULL) {
        return NULL;
    }
    Py_UCS1 *data = PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t i = 0; i < length; i++) {
        const unsigned char c = text[i];
        data[i] = (c >= 'A' && c <= 'Z') ? (Py_UCS1)(c + 32) : (Py_UCS1)c;
    }
    return out;
}

/* uri._split_params of ``text``, which holds no whitespace and only ASCII. */
static PyObject *
split_params(const unsigned char *text, Py_ssize_t length)
{
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    Py_ssize_t start = 0;
    while (start <= length && length > 0) {
        const unsigned char *semi = memchr(text + start, ';', (size_t)(length - start));
        const Py_ssize_t stop = semi == NULL ? length : semi - text;
        const unsigned char *part = text + start;
        const Py_ssize_t size = stop - start;
        const unsigned char *eq = size > 0 ? memchr(part, '=', (size_t)size) : NULL;
        PyObject *pair = NULL;
        if (eq == NULL) {
            if (size > 0) {
                PyObject *name = lower_text(part, size);
                pair = name == NULL ? NULL : PyTuple_Pack(2, name, Py_None);
                Py_XDECREF(name);
                if (pair == NULL) {
                    goto error;
                }
            }
        }
        else {
            PyObject *name = lower_text(part, eq - part);
            PyObject *value = name == NULL ? NULL : text_of((span){eq + 1, part + size - eq - 1});
            pair = value == NULL ? NULL : PyTuple_Pack(2, name, value);
            Py_XDECREF(name);
            Py_XDECREF(value);
            if (pair == NULL) {
                goto error;
            }
        }
        if (pair != NULL) {
            int failed = PyList_Append(out, pair);
            Py_DECREF(pair);
            if (failed) {
                goto error;
            }
        }
        start = stop + 1;
    }
    PyObject *params = PyList_AsTuple(out);
    Py_DECREF(out);
    return params;
error:
    Py_DECREF(out);
    return NULL;
}

/* via_parts(text) -> (transport, host, port, params) | None
 *
 * What uri._via_parts reads of a Via written the common way (a known sent-protocol, one
 * space, then host[:port][;params] with no whitespace, no IPv6 reference), for text that is
 * all ASCII; None for anything else, which the Python definitions read instead.
 */
static PyObject *
via_parts(PyObject *module, PyObject *arg)
{
    (void)module;
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "via_parts() reads a string");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(arg)) {
        Py_RETURN_NONE;
    }
    const unsigned char *text = PyUnicode_1BYTE_DATA(arg);
    const Py_ssize_t length = PyUnicode_GET_LENGTH(arg);
    const unsigned char *gap = memchr(text, ' ', (size_t)length);
    if (gap == NULL || gap == text) {
        Py_RETURN_NONE;
    }
    const Py_ssize_t space = gap - text;
    PyObject *transport = NULL;
    for (Py_ssize_t i = 0; i < PROTOCOL_COUNT; i++) {
        if ((size_t)space == strlen(PROTOCOLS[i])
            && memcmp(text, PROTOCOLS[i], (size_t)space) == 0) {
            transport = transports[i];
            break;
        }
    }
    if (transport == NULL) {
        Py_RETURN_NONE;
    }
    const unsigned char *rest = gap + 1;
    const Py_ssize_t size = length - space - 1;
    if (size == 0) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        if (is_ascii_space(rest[i])) {
            Py_RETURN_NONE;
        }
    }
    const unsigned char *semi = memchr(rest, ';', (size_t)size);
    const Py_ssize_t hostport = semi == NULL ? size : semi - rest;
    if (memchr(rest, '[', (size_t)hostport) != NULL
        || memchr(rest, ']', (size_t)hostport) != NULL) {
        Py_RETURN_NONE;
    }
    const unsigned char *colon = memchr(rest, ':', (size_t)hostport);
    const Py_ssize_t host = colon == NULL ? hostport : colon - rest;
    if (host == 0) {
        Py_RETURN_NONE;
    }
    long port = -1;
    if (colon != NULL) {
        /* numbers.short_uint below five digits, bounded_uint(text, 65535) from five on */
        const span digits = {colon + 1, rest + hostport - colon - 1};
        if (digits.length < 5) {
            port = short_uint(digits);
        }
        else {
            Py_ssize_t at = 0;
            while (at < digits.length && digits.text[at] == '0') {
                at++;
            }
            port = 0;
            for (Py_ssize_t i = 0; i < digits.length; i++) {
                if (digits.text[i] < '0' || digits.text[i] > '9') {
                    port = -1;
                    break;
                }
            }
            if (port == 0) {
                if (digits.length - at > 5) {
                    port = -1;
                }
                else {
                    port = short_uint((span){digits.text + at, digits.length - at});
                    if (digits.length == at) {
                        port = 0;
                    }
                    if (port > 65535) {
                        port = -1;
                    }
                }
            }
        }
        if (port < 0) {
            Py_RETURN_NONE;
        }
    }
    PyObject *items[4] = {NULL};
    items[0] = Py_NewRef(transport);
    items[1] = lower_text(rest, host);
    items[2] = port < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(port);
    items[3] = semi == NULL ? PyTuple_New(0) : split_params(semi + 1, rest + size - semi - 1);
    PyObject *result = NULL;
    if (items[1] != NULL && items[2] != NULL && items[3] != NULL) {
        result = PyTuple_Pack(4, items[0], items[1], items[2], items[3]);
    }
    for (Py_ssize_t i = 0; i < 4; i++) {
        Py_XDECREF(items[i]);
    }
    return result;
}

static PyMethodDef module_methods[] = {
    {"split_head", (PyCFunction)split_head, METH_O,
     "split_head(data) -> (end, start_line, header_lines) or None"},
    {"read_plain", (PyCFunction)(void (*)(void))read_plain, METH_FASTCALL,
     "read_plain(data, end, first, lines, template, max_headers, datagram) -> tuple, False or None"},
    {"via_parts", (PyCFunction)via_parts, METH_O,
     "via_parts(text) -> (transport, host, port, params) or None"},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *module)
{
    (void)module;
    for (Py_ssize_t i = 0; i < METHOD_COUNT; i++) {
        if (methods[i] == NULL) {
            methods[i] = PyUnicode_InternFromString(METHOD_NAMES[i]);
            if (methods[i] == NULL) {
                return -1;
            }
        }
    }
    for (Py_ssize_t i = 0; i < PROTOCOL_COUNT; i++) {
        if (transports[i] == NULL) {
            /* "SIP/2.0/" is 8 characters */
            transports[i] = PyUnicode_InternFromString(PROTOCOLS[i] + 8);
            if (transports[i] == NULL) {
                return -1;
            }
        }
    }
    return 0;
}

static struct PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "e911_sip.sip._headscan",
    .m_doc = "Native passes over a SIP header block; see e911_sip.sip.headscan.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__headscan(void)
{
    return PyModuleDef_Init(&module_def);
}
