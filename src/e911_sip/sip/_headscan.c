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
#include <stdint.h>
#include <string.h>

/* split_head(data) -> (end, start_line, at) | None
 *
 * ``end`` is the index of the first CRLFCRLF (the end of the header block), the start line
 * is the block up to its first CRLF, decoded as latin-1, and ``at`` holds where each header
 * line starts and then end + 2, as 32-bit integers (headscan.split_head_python). None when
 * there is no CRLFCRLF past the first byte, a CR or LF outside those CRLFs, no header line,
 * an empty start line, or an end past what 32 bits hold.
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
    if (end > (Py_ssize_t)UINT32_MAX - 2) {
        goto none; /* offsets past 32 bits */
    }

    /* The start of each header line, then end + 2 (where a line after the last would
     * start), as 32-bit integers. */
    PyObject *at = PyBytes_FromStringAndSize(NULL, (cuts + 1) * 4);
    if (at == NULL) {
        goto error;
    }
    char *out = PyBytes_AS_STRING(at);
    const char *crlf = memchr(base, '\r', (size_t)(stop - base));
    PyObject *first = PyUnicode_DecodeLatin1(base, crlf - base, NULL);
    if (first == NULL) {
        Py_DECREF(at);
        goto error;
    }
    for (Py_ssize_t i = 0; i < cuts; i++) {
        const uint32_t start = (uint32_t)(crlf + 2 - base);
        memcpy(out + 4 * i, &start, 4);
        crlf = (i + 1 < cuts) ? memchr(crlf + 2, '\r', (size_t)(stop - crlf - 2)) : stop;
    }
    const uint32_t after = (uint32_t)(end + 2);
    memcpy(out + 4 * cuts, &after, 4);
    PyObject *index = PyLong_FromSsize_t(end);
    if (index == NULL) {
        Py_DECREF(first);
        Py_DECREF(at);
        goto error;
    }
    result = PyTuple_New(3);
    if (result == NULL) {
        Py_DECREF(index);
        Py_DECREF(first);
        Py_DECREF(at);
        goto error;
    }
    PyTuple_SET_ITEM(result, 0, index);
    PyTuple_SET_ITEM(result, 1, first);
    PyTuple_SET_ITEM(result, 2, at);
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

/* Where the header lines of ``data`` (``size`` bytes) are, from an ``at`` as split_head makes
 * it, checked so that every line lies inside ``data``: ``*count`` is the number of lines.
 * NULL with TypeError or ValueError for anything else. */
static const char *
offsets_of(PyObject *at, Py_ssize_t size, Py_ssize_t *count)
{
    if (!PyBytes_CheckExact(at)) {
        PyErr_SetString(PyExc_TypeError, "the offsets of the lines are bytes");
        return NULL;
    }
    const Py_ssize_t length = PyBytes_GET_SIZE(at);
    if (length < 8 || length % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "the offsets are of one line or more");
        return NULL;
    }
    const char *offsets = PyBytes_AS_STRING(at);
    uint32_t last;
    memcpy(&last, offsets, 4);
    for (Py_ssize_t i = 4; i < length; i += 4) {
        uint32_t next;
        memcpy(&next, offsets + i, 4);
        if (next < last || next - last < 2 || (Py_ssize_t)next > size) {
            PyErr_SetString(PyExc_ValueError, "the offsets are not of lines of these bytes");
            return NULL;
        }
        last = next;
    }
    *count = length / 4 - 1;
    return offsets;
}

/* Line ``i`` of the ``offsets_of`` checked: where it starts and how long it is. */
static void
line_at(const char *offsets, Py_ssize_t i, Py_ssize_t *start, Py_ssize_t *length)
{
    uint32_t pair[2];
    memcpy(pair, offsets + 4 * i, 8);
    *start = (Py_ssize_t)pair[0];
    *length = (Py_ssize_t)pair[1] - 2 - (Py_ssize_t)pair[0];
}

/* 1 when ``spellings`` has one entry per line and each line starts with the spelling at its
 * index (headscan.names_match_python), 0 when not, -1 with an exception set. The spellings
 * are latin-1 strings, as the parser's templates make them. */
static int
match_names(const char *data, const char *offsets, Py_ssize_t count, PyObject *spellings)
{
    if (!PyList_Check(spellings)) {
        PyErr_SetString(PyExc_TypeError, "names are matched against a list");
        return -1;
    }
    if (PyList_GET_SIZE(spellings) != count) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *spelt = PyList_GET_ITEM(spellings, i);
        if (!PyUnicode_Check(spelt) || PyUnicode_KIND(spelt) != PyUnicode_1BYTE_KIND) {
            PyErr_SetString(PyExc_TypeError, "names are matched against latin-1 strings");
            return -1;
        }
        Py_ssize_t start, length;
        line_at(offsets, i, &start, &length);
        const Py_ssize_t size = PyUnicode_GET_LENGTH(spelt);
        if (length < size || memcmp(data + start, PyUnicode_DATA(spelt), (size_t)size) != 0) {
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

/* 1 when ``s`` holds "tag" in any case (the test ``"tag" in value.lower()`` makes: no
 * latin-1 character but T, A and G lowers to t, a or g). */
static int
has_tag(span s)
{
    for (Py_ssize_t i = 0; i + 3 <= s.length; i++) {
        if ((s.text[i] | 0x20) == 't' && (s.text[i + 1] | 0x20) == 'a'
            && (s.text[i + 2] | 0x20) == 'g') {
            return 1;
        }
    }
    return 0;
}

/* headscan.tag_in_place: the tag of a value written ``...<uri>;tag=x[;...]`` with no quote,
 * as a span in ``*tag``; 0 for any other spelling. */
static int
tag_in_place(span value, span *tag)
{
    if (find_char(value, '"', 0) >= 0) {
        return 0;
    }
    const Py_ssize_t lt = find_char(value, '<', 0);
    if (lt < 0) {
        return 0;
    }
    const Py_ssize_t gt = find_char(value, '>', lt);
    if (gt <= lt || strip((span){value.text + lt + 1, gt - lt - 1}).length == 0) {
        return 0;
    }
    const span rest = {value.text + gt + 1, value.length - gt - 1};
    if (rest.length < 5 || memcmp(rest.text, ";tag=", 5) != 0) {
        return 0;
    }
    const Py_ssize_t end = find_char(rest, ';', 5);
    *tag = strip((span){rest.text + 5, (end < 0 ? rest.length : end) - 5});
    return 1;
}

/* read_plain(data, end, first, at, template, max_headers, datagram) -> tuple | False | None
 *
 * headscan.read_plain_python, for ``end``, ``first`` and ``at`` as split_head gives them
 * (``at`` is checked to lie inside the block); see there for what the tuple holds.
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
    PyObject *at_lines = args[3];
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
    if (!PyTuple_Check(template) || PyTuple_GET_SIZE(template) != 5) {
        PyErr_SetString(PyExc_TypeError, "read_plain() takes a template");
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
    Py_ssize_t count;
    const char *offsets = offsets_of(at_lines, end + 2, &count);
    if (offsets == NULL) {
        return NULL;
    }
    const char *bytes = PyBytes_AS_STRING(data);
    PyObject *keys = PyTuple_GET_ITEM(template, 1);
    PyObject *at_obj = PyTuple_GET_ITEM(template, 2);
    PyObject *cut_obj = PyTuple_GET_ITEM(template, 4);
    if (!PyList_Check(keys) || !PyList_Check(at_obj) || !PyList_Check(cut_obj)
        || PyList_GET_SIZE(at_obj) != SLOTS || PyList_GET_SIZE(cut_obj) != SLOTS) {
        PyErr_SetString(PyExc_TypeError, "read_plain() takes a template as the parser keeps");
        return NULL;
    }
    int hit = match_names(bytes, offsets, count, PyTuple_GET_ITEM(template, 0));
    if (hit <= 0) {
        /* False: the lines are not of this template's names (the caller makes another) */
        return hit < 0 ? NULL : Py_NewRef(Py_False);
    }
    const Py_ssize_t lengths = PyLong_AsSsize_t(PyTuple_GET_ITEM(template, 3));
    if (lengths == -1 && PyErr_Occurred()) {
        return NULL;
    }
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
        Py_ssize_t start;
        span line;
        line_at(offsets, at[slot], &start, &line.length);
        line.text = (const unsigned char *)bytes + start;
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
    int tag_read = -1; /* -1: left to the parser (False); 0: no tag (None); 1: ``tag`` */
    span tag = {NULL, 0};
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
        if (!has_tag(to_value)) {
            tag_read = 0;
        }
        else if (tag_in_place(to_value, &tag)) {
            tag_read = 1;
        }
        if (at[7] >= 0) {
            mf = strip(value[7]);
            mf_read = mf.length < 4 ? short_uint(mf) : -1;
        }
    }

    /* Every check passed: the values as objects. */
    PyObject *items[14] = {NULL};
    items[0] = Py_NewRef(keys); /* shared: no message changes its keys in place */
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
    items[13] = tag_read == 1   ? text_of(tag)
                : tag_read == 0 ? Py_NewRef(Py_None)
                                : Py_NewRef(Py_False);
    PyObject *result = PyTuple_New(14);
    for (Py_ssize_t i = 0; i < 14; i++) {
        if (items[i] == NULL || result == NULL) {
            for (Py_ssize_t j = 0; j < 14; j++) {
                Py_XDECREF(items[j]);
            }
            Py_XDECREF(result);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < 14; i++) {
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

/* The text of ``arg`` for via_parts and uri_parts (``name`` for the error): 1 with ``*text``
 * and ``*length`` set when it is an ASCII string, 0 when it is a string of other
 * characters (the Python code reads it), -1 with TypeError when it is not a string. */
static int
ascii_arg(PyObject *arg, const char *name, const unsigned char **text, Py_ssize_t *length)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s() reads a string", name);
        return -1;
    }
    if (!PyUnicode_IS_ASCII(arg)) {
        return 0;
    }
    *text = PyUnicode_1BYTE_DATA(arg);
    *length = PyUnicode_GET_LENGTH(arg);
    return 1;
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

/* numbers.bounded_uint(text, 65535) of a port's digits (short_uint below five digits, where
 * the two agree), or -1. */
static long
port_of(span digits)
{
    if (digits.length < 5) {
        return short_uint(digits);
    }
    for (Py_ssize_t i = 0; i < digits.length; i++) {
        if (digits.text[i] < '0' || digits.text[i] > '9') {
            return -1;
        }
    }
    Py_ssize_t at = 0;
    while (at < digits.length && digits.text[at] == '0') {
        at++;
    }
    if (digits.length - at > 5) {
        return -1;
    }
    if (digits.length == at) {
        return 0;
    }
    const long port = short_uint((span){digits.text + at, digits.length - at});
    return port > 65535 ? -1 : port;
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
    const unsigned char *text;
    Py_ssize_t length;
    const int ascii = ascii_arg(arg, "via_parts", &text, &length);
    if (ascii <= 0) {
        return ascii < 0 ? NULL : Py_NewRef(Py_None);
    }
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
        port = port_of((span){colon + 1, rest + hostport - colon - 1});
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

/* -- uri_parts ------------------------------------------------------------------------- */

static PyObject *scheme_sip;
static PyObject *scheme_sips;

/* uri_parts(text) -> (scheme, user, host, port, params) | None
 *
 * What uri.read_uri reads of a sip or sips URI written the common way: all ASCII, no
 * whitespace, no IPv6 reference, a user (when there is an '@') that is not empty, a host,
 * a port of digits worth at most 65535. None for anything else, which the Python code
 * reads (and refuses, when it must).
 */
static PyObject *
uri_parts(PyObject *module, PyObject *arg)
{
    (void)module;
    const unsigned char *text;
    Py_ssize_t length;
    const int ascii = ascii_arg(arg, "uri_parts", &text, &length);
    if (ascii <= 0) {
        return ascii < 0 ? NULL : Py_NewRef(Py_None);
    }
    for (Py_ssize_t i = 0; i < length; i++) {
        if (is_ascii_space(text[i]) || text[i] == '[' || text[i] == ']') {
            Py_RETURN_NONE;
        }
    }
    PyObject *scheme;
    Py_ssize_t at;
    if (length >= 4 && (text[0] | 0x20) == 's' && (text[1] | 0x20) == 'i'
        && (text[2] | 0x20) == 'p' && text[3] == ':') {
        scheme = scheme_sip;
        at = 4;
    }
    else if (length >= 5 && (text[0] | 0x20) == 's' && (text[1] | 0x20) == 'i'
             && (text[2] | 0x20) == 'p' && (text[3] | 0x20) == 's' && text[4] == ':') {
        scheme = scheme_sips;
        at = 5;
    }
    else {
        Py_RETURN_NONE;
    }
    span rest = {text + at, length - at};
    span user = {NULL, 0};
    const Py_ssize_t sign = find_char(rest, '@', 0);
    if (sign >= 0) {
        const span userinfo = {rest.text, sign};
        const Py_ssize_t colon = find_char(userinfo, ':', 0);
        user = (span){userinfo.text, colon < 0 ? userinfo.length : colon};
        if (user.length == 0) {
            Py_RETURN_NONE;
        }
        rest = (span){rest.text + sign + 1, rest.length - sign - 1};
    }
    const Py_ssize_t question = find_char(rest, '?', 0);
    if (question >= 0) {
        rest.length = question;
    }
    const Py_ssize_t semi = find_char(rest, ';', 0);
    const span hostport = {rest.text, semi < 0 ? rest.length : semi};
    const Py_ssize_t colon = find_char(hostport, ':', 0);
    const span host = {hostport.text, colon < 0 ? hostport.length : colon};
    if (host.length == 0) {
        Py_RETURN_NONE;
    }
    long port = -1;
    if (colon >= 0 && colon + 1 < hostport.length) {
        port = port_of((span){hostport.text + colon + 1, hostport.length - colon - 1});
        if (port < 0) {
            Py_RETURN_NONE;
        }
    }
    PyObject *items[5] = {NULL};
    items[0] = Py_NewRef(scheme);
    items[1] = user.text == NULL ? Py_NewRef(Py_None) : text_of(user);
    items[2] = lower_text(host.text, host.length);
    items[3] = port < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(port);
    items[4] = semi < 0 ? PyTuple_New(0)
                        : split_params(rest.text + semi + 1, rest.length - semi - 1);
    PyObject *result = NULL;
    if (items[1] != NULL && items[2] != NULL && items[3] != NULL && items[4] != NULL) {
        result = PyTuple_Pack(5, items[0], items[1], items[2], items[3], items[4]);
    }
    for (Py_ssize_t i = 0; i < 5; i++) {
        Py_XDECREF(items[i]);
    }
    return result;
}

/* -- the lines of a parsed message, when asked for ----------------------------------- */

/* The bytes and the offsets a lines_of, line_of or pop_first is given, checked. */
static const char *
lines_args(PyObject *data, PyObject *at, Py_ssize_t *count)
{
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "the lines are read from bytes");
        return NULL;
    }
    return offsets_of(at, PyBytes_GET_SIZE(data), count);
}

/* lines_of(data, at) -> list of str: every header line, decoded as latin-1
 * (headscan.lines_of_python). */
static PyObject *
lines_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lines_of() takes exactly 2 arguments");
        return NULL;
    }
    Py_ssize_t count;
    const char *offsets = lines_args(args[0], args[1], &count);
    if (offsets == NULL) {
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    PyObject *lines = PyList_New(count);
    if (lines == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t start, length;
        line_at(offsets, i, &start, &length);
        PyObject *text = PyUnicode_DecodeLatin1(data + start, length, NULL);
        if (text == NULL) {
            Py_DECREF(lines);
            return NULL;
        }
        PyList_SET_ITEM(lines, i, text);
    }
    return lines;
}

/* The bytes, offsets and line index a line_of or pop_first is given (``name`` for the
 * errors), checked: the offsets of the lines, with ``*index`` a line among them. */
static const char *
line_args(PyObject *const *args, const char *name, Py_ssize_t *index)
{
    Py_ssize_t count;
    const char *offsets = lines_args(args[0], args[1], &count);
    if (offsets == NULL) {
        return NULL;
    }
    *index = PyLong_AsSsize_t(args[2]);
    if (*index == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (*index < 0 || *index >= count) {
        PyErr_Format(PyExc_IndexError, "%s() index out of range", name);
        return NULL;
    }
    return offsets;
}

/* line_of(data, at, index) -> str: header line ``index``, decoded as latin-1
 * (headscan.line_of_python). */
static PyObject *
line_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "line_of() takes exactly 3 arguments");
        return NULL;
    }
    Py_ssize_t index;
    const char *offsets = line_args(args, "line_of", &index);
    if (offsets == NULL) {
        return NULL;
    }
    Py_ssize_t start, length;
    line_at(offsets, index, &start, &length);
    return PyUnicode_DecodeLatin1(PyBytes_AS_STRING(args[0]) + start, length, NULL);
}

/* pop_first(wire, at, index, first, other) -> (wire, at) | None
 *
 * headscan.pop_first_python: the bytes and offsets less ``first`` and the ", " after it in
 * header line ``index``, when that line is ``Name: <first>, <other>`` written plainly (and
 * its other value is ``other``, unless that is None).
 */
static PyObject *
pop_first(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "pop_first() takes exactly 5 arguments");
        return NULL;
    }
    Py_ssize_t index;
    const char *offsets = line_args(args, "pop_first", &index);
    if (offsets == NULL) {
        return NULL;
    }
    PyObject *first_obj = args[3];
    if (!PyUnicode_Check(first_obj)) {
        PyErr_SetString(PyExc_TypeError, "pop_first() takes the first value as a string");
        return NULL;
    }
    PyObject *expected_obj = args[4];
    if (expected_obj != Py_None && !PyUnicode_Check(expected_obj)) {
        PyErr_SetString(PyExc_TypeError, "pop_first() takes the other value as a string or None");
        return NULL;
    }
    if (PyUnicode_KIND(first_obj) != PyUnicode_1BYTE_KIND
        || (expected_obj != Py_None && PyUnicode_KIND(expected_obj) != PyUnicode_1BYTE_KIND)) {
        Py_RETURN_NONE; /* not latin-1: not the text of any line */
    }
    const span first = {PyUnicode_1BYTE_DATA(first_obj), PyUnicode_GET_LENGTH(first_obj)};
    const char *wire = PyBytes_AS_STRING(args[0]);
    Py_ssize_t start;
    span line;
    line_at(offsets, index, &start, &line.length);
    line.text = (const unsigned char *)wire + start;

    const Py_ssize_t colon = find_char(line, ':', 0);
    if (colon <= 0 || line.text[colon - 1] == ' ' || line.text[colon - 1] == '\t') {
        Py_RETURN_NONE;
    }
    const Py_ssize_t head = colon + 2; /* past "Name: " */
    const Py_ssize_t after = head + first.length;
    if (after + 2 > line.length || line.text[colon + 1] != ' '
        || memcmp(line.text + head, first.text, (size_t)first.length) != 0
        || line.text[after] != ',' || line.text[after + 1] != ' ') {
        Py_RETURN_NONE;
    }
    const span other = {line.text + after + 2, line.length - after - 2};
    const span trimmed = strip(first);
    if (other.length == 0 || trimmed.length == 0 || find_char(other, ',', 0) >= 0
        || find_char(first, ',', 0) >= 0 || find_char(line, '"', 0) >= 0
        || find_char(line, '<', 0) >= 0 || find_char(line, '\n', 0) >= 0
        || is_space(other.text[0]) || is_space(other.text[other.length - 1])) {
        Py_RETURN_NONE;
    }
    if (expected_obj != Py_None
        && (PyUnicode_GET_LENGTH(expected_obj) != other.length
            || memcmp(PyUnicode_1BYTE_DATA(expected_obj), other.text, (size_t)other.length) != 0)) {
        Py_RETURN_NONE;
    }

    const Py_ssize_t cut = first.length + 2;
    const Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size - cut);
    if (out == NULL) {
        return NULL;
    }
    char *to = PyBytes_AS_STRING(out);
    memcpy(to, wire, (size_t)(start + head));
    memcpy(to + start + head, wire + start + after + 2, (size_t)(size - start - after - 2));
    const Py_ssize_t bytes = PyBytes_GET_SIZE(args[1]);
    PyObject *moved = PyBytes_FromStringAndSize(offsets, bytes);
    if (moved == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    char *shifted = PyBytes_AS_STRING(moved);
    for (Py_ssize_t i = 4 * (index + 1); i < bytes; i += 4) {
        uint32_t value;
        memcpy(&value, shifted + i, 4);
        value -= (uint32_t)cut;
        memcpy(shifted + i, &value, 4);
    }
    PyObject *result = PyTuple_Pack(2, out, moved);
    Py_DECREF(out);
    Py_DECREF(moved);
    return result;
}

/* copy_lines(data, at, keys, wanted, head, last, last_key) -> (wire, at, keys)
 *
 * headscan.copy_lines_python: a new message head made of ``head`` (a start line and its
 * CRLF), each header line of ``data`` whose key (``keys``, one per line) is in ``wanted``,
 * in order, and ``last`` as its last line, then the blank line; with the offsets of its
 * lines as split_head gives them, and their keys.
 */
static PyObject *
copy_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "copy_lines() takes exactly 7 arguments");
        return NULL;
    }
    Py_ssize_t count;
    const char *offsets = lines_args(args[0], args[1], &count);
    if (offsets == NULL) {
        return NULL;
    }
    PyObject *keys = args[2];
    PyObject *wanted = args[3];
    PyObject *head = args[4];
    PyObject *last = args[5];
    PyObject *last_key = args[6];
    /* Exactly a set or frozenset: a subclass's own __contains__ is what the Python
     * definition would call, and PySet_Contains would not. */
    if (!PyList_Check(keys) || !(PyFrozenSet_CheckExact(wanted) || PySet_CheckExact(wanted)) || !PyBytes_CheckExact(head) || !PyBytes_CheckExact(last)
        || !PyUnicode_Check(last_key)) {
        PyErr_SetString(PyExc_TypeError,
                        "copy_lines() takes a list and a set of keys, the head and last line "
                        "as bytes and the last line's key as a string");
        return NULL;
    }
    if (PyList_GET_SIZE(keys) != count) {
        PyErr_SetString(PyExc_ValueError, "copy_lines() takes one key per line");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[0]);
    const Py_ssize_t head_size = PyBytes_GET_SIZE(head);
    const Py_ssize_t last_size = PyBytes_GET_SIZE(last);
    /* Which lines are taken, found once: a key's membership is a hash lookup, and the list
     * may change under a lookup that runs Python code (a str subclass's __eq__), so its
     * items are read again, checked, in the copying pass below. */
    char picked_small[64];
    char *picked = count <= 64 ? picked_small : PyMem_Malloc((size_t)count);
    if (picked == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t taken = 0;
    Py_ssize_t size = head_size + last_size + 4;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (i >= PyList_GET_SIZE(keys)) {
            PyErr_SetString(PyExc_ValueError, "copy_lines() takes one key per line");
            goto error;
        }
        PyObject *key = PyList_GET_ITEM(keys, i);
        Py_INCREF(key);
        const int found = PySet_Contains(wanted, key);
        Py_DECREF(key);
        if (found < 0) {
            goto error;
        }
        picked[i] = (char)found;
        if (found) {
            Py_ssize_t start, length;
            line_at(offsets, i, &start, &length);
            size += length + 2;
            taken++;
        }
    }
    if (PyList_GET_SIZE(keys) != count) {
        PyErr_SetString(PyExc_ValueError, "copy_lines() takes one key per line");
        goto error;
    }
    if (size > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "copy_lines() makes a head past 32-bit offsets");
        goto error;
    }
    PyObject *wire = PyBytes_FromStringAndSize(NULL, size);
    PyObject *at = PyBytes_FromStringAndSize(NULL, (taken + 2) * 4);
    PyObject *new_keys = PyList_New(taken + 1);
    if (wire == NULL || at == NULL || new_keys == NULL) {
        Py_XDECREF(wire);
        Py_XDECREF(at);
        Py_XDECREF(new_keys);
        goto error;
    }
    char *to = PyBytes_AS_STRING(wire);
    char *out = PyBytes_AS_STRING(at);
    memcpy(to, PyBytes_AS_STRING(head), (size_t)head_size);
    Py_ssize_t written = head_size;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!picked[i]) {
            continue;
        }
        Py_ssize_t start, length;
        line_at(offsets, i, &start, &length);
        const uint32_t where = (uint32_t)written;
        memcpy(out + 4 * n, &where, 4);
        memcpy(to + written, data + start, (size_t)length + 2); /* the line and its CRLF */
        written += length + 2;
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyList_SET_ITEM(new_keys, n, Py_NewRef(key));
        n++;
    }
    const uint32_t where = (uint32_t)written;
    memcpy(out + 4 * n, &where, 4);
    memcpy(to + written, PyBytes_AS_STRING(last), (size_t)last_size);
    written += last_size;
    memcpy(to + written, "\r\n\r\n", 4);
    const uint32_t after = (uint32_t)(written + 2);
    memcpy(out + 4 * (n + 1), &after, 4);
    PyList_SET_ITEM(new_keys, n, Py_NewRef(last_key));
    if (picked != picked_small) {
        PyMem_Free(picked);
    }
    PyObject *result = PyTuple_Pack(3, wire, at, new_keys);
    Py_DECREF(wire);
    Py_DECREF(at);
    Py_DECREF(new_keys);
    return result;

error:
    if (picked != picked_small) {
        PyMem_Free(picked);
    }
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"split_head", (PyCFunction)split_head, METH_O,
     "split_head(data) -> (end, start_line, at) or None"},
    {"read_plain", (PyCFunction)(void (*)(void))read_plain, METH_FASTCALL,
     "read_plain(data, end, first, at, template, max_headers, datagram) -> tuple, False or None"},
    {"lines_of", (PyCFunction)(void (*)(void))lines_of, METH_FASTCALL,
     "lines_of(data, at) -> list of str"},
    {"line_of", (PyCFunction)(void (*)(void))line_of, METH_FASTCALL,
     "line_of(data, at, index) -> str"},
    {"pop_first", (PyCFunction)(void (*)(void))pop_first, METH_FASTCALL,
     "pop_first(wire, at, index, first, other) -> (wire, at) or None"},
    {"copy_lines", (PyCFunction)(void (*)(void))copy_lines, METH_FASTCALL,
     "copy_lines(data, at, keys, wanted, head, last, last_key) -> (wire, at, keys)"},
    {"uri_parts", (PyCFunction)uri_parts, METH_O,
     "uri_parts(text) -> (scheme, user, host, port, params) or None"},
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
    if (scheme_sip == NULL) {
        scheme_sip = PyUnicode_InternFromString("sip");
        scheme_sips = PyUnicode_InternFromString("sips");
        if (scheme_sip == NULL || scheme_sips == NULL) {
            return -1;
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
