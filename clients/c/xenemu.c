/*
 * libxenemu: framing, a minimal msgpack codec (maps, str, bin, ints, arrays, nil, bool), the
 * requests of PROTOCOL.md that guests and emulators make, and libxc's way of reporting errors:
 * -1 and errno, the detail kept on the handle, nothing printed.
 */
#define _POSIX_C_SOURCE 200809L

#include "xenemu.h"
#include "xen_errno.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FRAME (4u * 1024u * 1024u)
/* Distinct events held for the caller: kicks coalesce per server, LPIs per (vCPU, INTID). */
#define MAX_EVENTS 4096

struct event_queue {
    uint64_t *keys;
    unsigned int len, cap;
    int overflowed;
};

struct xc_interface_core {
    int fd;
    int broken;          /* the stream is no longer usable: every call fails at once */
    int domid;
    uint32_t next_id;
    struct event_queue ioreqs, lpis;
    xc_error error;
};

/* The detail of the last failed xc_interface_open() in this thread (there is no handle). */
static _Thread_local xc_error open_error;

/* The names of the errnos the ABI defines (abi/xen_errno.h), for the detail messages. */
static const char *errno_name(int err)
{
    switch (err) {
    case XEN_EPERM: return "EPERM";
    case XEN_ENOENT: return "ENOENT";
    case XEN_ESRCH: return "ESRCH";
    case XEN_EIO: return "EIO";
    case XEN_ENXIO: return "ENXIO";
    case XEN_E2BIG: return "E2BIG";
    case XEN_ENOMEM: return "ENOMEM";
    case XEN_EACCES: return "EACCES";
    case XEN_EBUSY: return "EBUSY";
    case XEN_EEXIST: return "EEXIST";
    case XEN_ENODEV: return "ENODEV";
    case XEN_EINVAL: return "EINVAL";
    case XEN_ENOSPC: return "ENOSPC";
    case XEN_EOPNOTSUPP: return "EOPNOTSUPP";
    case XEN_EDQUOT: return "EDQUOT";
    case XEN_EMFILE: return "EMFILE";
    case XEN_ETIMEDOUT: return "ETIMEDOUT";
    case XEN_EPROTO: return "EPROTO";
    case XEN_EBADMSG: return "EBADMSG";
    case XEN_EMSGSIZE: return "EMSGSIZE";
    case XEN_EPROTONOSUPPORT: return "EPROTONOSUPPORT";
    default: return NULL;
    }
}

static enum xc_error_code code_for(int err)
{
    switch (err) {
    case 0: return XC_ERROR_NONE;
    case ENOMEM: return XC_OUT_OF_MEMORY;
    case EINVAL: case E2BIG: case ENAMETOOLONG: case ERANGE: return XC_INVALID_PARAM;
    default: return XC_INTERNAL_ERROR;
    }
}

/* Record the error and set errno: every failing path ends here, and returns -1. */
static int fail_into(xc_error *e, int err, const char *fmt, ...)
{
    va_list ap;
    e->code = code_for(err);
    e->errnum = err;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

#define fail(xch, err, ...) fail_into(&(xch)->error, (err), __VA_ARGS__)

/* -- msgpack writer ------------------------------------------------------------------------- */
struct wbuf {
    uint8_t *data;
    size_t len, cap;
    int failed;
};

static void w_bytes(struct wbuf *w, const void *src, size_t n)
{
    if (w->failed)
        return;
    if (w->len + n > MAX_FRAME) {
        w->failed = 1;
        return;
    }
    if (w->len + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->len + n)
            cap *= 2;
        uint8_t *grown = realloc(w->data, cap);
        if (!grown) {
            w->failed = 1;
            return;
        }
        w->data = grown;
        w->cap = cap;
    }
    if (n)
        memcpy(w->data + w->len, src, n);
    w->len += n;
}

static void w_u8(struct wbuf *w, uint8_t v) { w_bytes(w, &v, 1); }

static void w_be(struct wbuf *w, uint64_t v, int n)
{
    uint8_t b[8];
    for (int i = 0; i < n; i++)
        b[i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    w_bytes(w, b, (size_t)n);
}

static void w_map(struct wbuf *w, uint32_t n)
{
    if (n < 16) w_u8(w, (uint8_t)(0x80 | n));
    else { w_u8(w, 0xde); w_be(w, n, 2); }
}

static void w_str(struct wbuf *w, const char *s)
{
    size_t n = strlen(s);
    if (n < 32) w_u8(w, (uint8_t)(0xa0 | n));
    else if (n <= 0xff) { w_u8(w, 0xd9); w_u8(w, (uint8_t)n); }
    else if (n <= 0xffff) { w_u8(w, 0xda); w_be(w, n, 2); }
    else { w->failed = 1; return; }
    w_bytes(w, s, n);
}

static void w_uint(struct wbuf *w, uint64_t v)
{
    if (v < 128) w_u8(w, (uint8_t)v);
    else if (v <= 0xff) { w_u8(w, 0xcc); w_be(w, v, 1); }
    else if (v <= 0xffff) { w_u8(w, 0xcd); w_be(w, v, 2); }
    else if (v <= 0xffffffffu) { w_u8(w, 0xce); w_be(w, v, 4); }
    else { w_u8(w, 0xcf); w_be(w, v, 8); }
}

static void w_bool(struct wbuf *w, int v) { w_u8(w, v ? 0xc3 : 0xc2); }

static void w_bin(struct wbuf *w, const void *p, size_t n)
{
    if (n <= 0xff) { w_u8(w, 0xc4); w_be(w, n, 1); }
    else if (n <= 0xffff) { w_u8(w, 0xc5); w_be(w, n, 2); }
    else { w_u8(w, 0xc6); w_be(w, n, 4); }
    w_bytes(w, p, n);
}

static void w_array(struct wbuf *w, uint32_t n)
{
    if (n < 16) w_u8(w, (uint8_t)(0x90 | n));
    else if (n <= 0xffff) { w_u8(w, 0xdc); w_be(w, n, 2); }
    else { w_u8(w, 0xdd); w_be(w, n, 4); }
}

/* A request's arguments: the map's body and how many pairs it holds. */
struct args {
    struct wbuf w;
    uint32_t n;
};

static void a_uint(struct args *a, const char *key, uint64_t v) { w_str(&a->w, key); w_uint(&a->w, v); a->n++; }
static void a_str(struct args *a, const char *key, const char *v) { w_str(&a->w, key); w_str(&a->w, v); a->n++; }
static void a_bool(struct args *a, const char *key, int v) { w_str(&a->w, key); w_bool(&a->w, v); a->n++; }
static void a_uints(struct args *a, const char *key, const uint64_t *v, unsigned long n)
{
    w_str(&a->w, key);
    w_array(&a->w, (uint32_t)n);
    for (unsigned long i = 0; i < n; i++)
        w_uint(&a->w, v[i]);
    a->n++;
}

static void a_bin(struct args *a, const char *key, const void *p, size_t len)
{
    w_str(&a->w, key);
    w_bin(&a->w, p, len);
    a->n++;
}

/* -- msgpack reader ------------------------------------------------------------------------- */
struct rbuf {
    const uint8_t *p, *end;
};

static int r_need(struct rbuf *r, size_t n) { return (size_t)(r->end - r->p) >= n; }

static uint64_t r_be(struct rbuf *r, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | r->p[i];
    r->p += n;
    return v;
}

/* Reads an integer (any width, signed or not); -1 if the next value is not one. */
static int r_int(struct rbuf *r, int64_t *out)
{
    if (!r_need(r, 1)) return -1;
    uint8_t t = *r->p;
    if (t < 0x80 || t >= 0xe0) { r->p++; *out = (int8_t)t; if (t < 0x80) *out = t; return 0; }
    int widths[] = {1, 2, 4, 8};
    if (t >= 0xcc && t <= 0xcf) {
        int n = widths[t - 0xcc];
        if (!r_need(r, 1 + (size_t)n)) return -1;
        r->p++;
        *out = (int64_t)r_be(r, n);
        return 0;
    }
    if (t >= 0xd0 && t <= 0xd3) {
        int n = widths[t - 0xd0];
        if (!r_need(r, 1 + (size_t)n)) return -1;
        r->p++;
        uint64_t v = r_be(r, n);
        int shift = 64 - 8 * n;
        *out = shift ? ((int64_t)(v << shift)) >> shift : (int64_t)v;
        return 0;
    }
    return -1;
}

/* str or bin: a pointer into the frame and its length. */
static int r_blob(struct rbuf *r, const uint8_t **ptr, size_t *len)
{
    if (!r_need(r, 1)) return -1;
    uint8_t t = *r->p;
    size_t n;
    int hdr;
    if ((t & 0xe0) == 0xa0) { n = t & 0x1f; hdr = 0; }
    else if (t == 0xd9 || t == 0xc4) hdr = 1;
    else if (t == 0xda || t == 0xc5) hdr = 2;
    else if (t == 0xdb || t == 0xc6) hdr = 4;
    else return -1;
    if (!r_need(r, 1 + (size_t)hdr)) return -1;
    r->p++;
    if (hdr) n = (size_t)r_be(r, hdr);
    if (!r_need(r, n)) return -1;
    *ptr = r->p;
    *len = n;
    r->p += n;
    return 0;
}

static int r_container(struct rbuf *r, int map, uint32_t *n)
{
    if (!r_need(r, 1)) return -1;
    uint8_t t = *r->p;
    uint8_t fix = map ? 0x80 : 0x90, b16 = map ? 0xde : 0xdc, b32 = map ? 0xdf : 0xdd;
    if ((t & 0xf0) == fix) { r->p++; *n = t & 0x0f; return 0; }
    if (t == b16 && r_need(r, 3)) { r->p++; *n = (uint32_t)r_be(r, 2); return 0; }
    if (t == b32 && r_need(r, 5)) { r->p++; *n = (uint32_t)r_be(r, 4); return 0; }
    return -1;
}

static int r_skip(struct rbuf *r, int depth)
{
    if (depth > 32 || !r_need(r, 1)) return -1;
    uint8_t t = *r->p;
    int64_t i;
    const uint8_t *p;
    size_t n;
    uint32_t count;
    if (t == 0xc0 || t == 0xc2 || t == 0xc3) { r->p++; return 0; }
    if (t == 0xca && r_need(r, 5)) { r->p += 5; return 0; }
    if (t == 0xcb && r_need(r, 9)) { r->p += 9; return 0; }
    if (r_int(r, &i) == 0 || r_blob(r, &p, &n) == 0) return 0;
    if (r_container(r, 1, &count) == 0) {
        for (uint32_t k = 0; k < 2 * count; k++)
            if (r_skip(r, depth + 1)) return -1;
        return 0;
    }
    if (r_container(r, 0, &count) == 0) {
        for (uint32_t k = 0; k < count; k++)
            if (r_skip(r, depth + 1)) return -1;
        return 0;
    }
    return -1;
}

static int key_is(const uint8_t *k, size_t n, const char *want)
{
    return strlen(want) == n && memcmp(k, want, n) == 0;
}

static int r_nil(struct rbuf *r)
{
    if (r_need(r, 1) && *r->p == 0xc0) { r->p++; return 1; }
    return 0;
}

static int r_bool(struct rbuf *r, int *out)
{
    if (!r_need(r, 1) || (*r->p != 0xc2 && *r->p != 0xc3)) return -1;
    *out = *r->p++ == 0xc3;
    return 0;
}

/* -- replies --------------------------------------------------------------------------------- */
struct blob {
    const uint8_t *p;
    size_t len;
    int present;
};

struct reply {
    int is_event, has_id, has_value, has_fault, ok;
    int64_t id, ret, domid, ioserver, vcpu, intid, value, fault_bfn, status, waited;
    struct blob event, buf, page, data, message, reason;
    struct rbuf sync, mfns;
    int has_sync, has_mfns;
    uint8_t *frame;
};

static int r_int_field(struct rbuf *r, int64_t *out, int *present)
{
    if (r_nil(r)) return 0;
    if (r_int(r, out)) return -1;
    if (present) *present = 1;
    return 0;
}

static int r_blob_field(struct rbuf *r, struct blob *out)
{
    if (r_nil(r)) return 0;
    if (r_blob(r, &out->p, &out->len)) return -1;
    out->present = 1;
    return 0;
}

/* Decode the reply's top-level map; values point into frame. -1 if it is not what PROTOCOL.md
 * says a reply or an event is. */
static int parse_reply(uint8_t *frame, size_t len, struct reply *out)
{
    struct rbuf r = {frame, frame + len};
    uint32_t n;
    memset(out, 0, sizeof(*out));
    out->frame = frame;
    if (r_container(&r, 1, &n)) return -1;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *k;
        size_t klen;
        int bad;
        if (r_blob(&r, &k, &klen)) return -1;
        if (key_is(k, klen, "event")) { out->is_event = 1; bad = r_blob_field(&r, &out->event); }
        else if (key_is(k, klen, "id")) bad = r_int_field(&r, &out->id, &out->has_id);
        else if (key_is(k, klen, "ret")) bad = r_int(&r, &out->ret);
        else if (key_is(k, klen, "domid")) bad = r_int_field(&r, &out->domid, NULL);
        else if (key_is(k, klen, "ioserver")) bad = r_int_field(&r, &out->ioserver, NULL);
        else if (key_is(k, klen, "vcpu")) bad = r_int_field(&r, &out->vcpu, NULL);
        else if (key_is(k, klen, "intid")) bad = r_int_field(&r, &out->intid, NULL);
        else if (key_is(k, klen, "value")) bad = r_int_field(&r, &out->value, &out->has_value);
        else if (key_is(k, klen, "fault_bfn")) bad = r_int_field(&r, &out->fault_bfn, &out->has_fault);
        else if (key_is(k, klen, "ok")) bad = r_bool(&r, &out->ok);
        else if (key_is(k, klen, "status")) bad = r_int_field(&r, &out->status, NULL);
        else if (key_is(k, klen, "waited")) bad = r_int_field(&r, &out->waited, NULL);
        else if (key_is(k, klen, "mfns")) {
            out->mfns = r;
            out->has_mfns = 1;
            bad = r_skip(&r, 0);
        }
        else if (key_is(k, klen, "buf")) bad = r_blob_field(&r, &out->buf);
        else if (key_is(k, klen, "page")) bad = r_blob_field(&r, &out->page);
        else if (key_is(k, klen, "data")) bad = r_blob_field(&r, &out->data);
        else if (key_is(k, klen, "message")) bad = r_blob_field(&r, &out->message);
        else if (key_is(k, klen, "reason")) bad = r_blob_field(&r, &out->reason);
        else if (key_is(k, klen, "sync")) {
            out->sync = r;
            out->has_sync = 1;
            bad = r_skip(&r, 0);
        }
        else bad = r_skip(&r, 0);
        if (bad) return -1;
    }
    return 0;
}

/* -- events ---------------------------------------------------------------------------------- */
static void queue_push(struct event_queue *q, uint64_t key)
{
    for (unsigned int i = 0; i < q->len; i++)
        if (q->keys[i] == key) return;  /* coalesces, as the daemon's own queue does */
    if (q->len == q->cap) {
        unsigned int cap = q->cap ? q->cap * 2 : 16;
        uint64_t *grown = cap <= MAX_EVENTS ? realloc(q->keys, cap * sizeof(*grown)) : NULL;
        if (!grown) { q->overflowed = 1; return; }
        q->keys = grown;
        q->cap = cap;
    }
    q->keys[q->len++] = key;
}

static uint64_t queue_pop(struct event_queue *q)
{
    uint64_t key = q->keys[0];
    memmove(q->keys, q->keys + 1, (q->len - 1) * sizeof(*q->keys));
    q->len--;
    return key;
}

static void queue_event(xc_interface *xch, const struct reply *ev)
{
    if (ev->event.present && key_is(ev->event.p, ev->event.len, "ioreq"))
        queue_push(&xch->ioreqs, (uint64_t)ev->ioserver);
    else if (ev->event.present && key_is(ev->event.p, ev->event.len, "lpi"))
        queue_push(&xch->lpis, (uint64_t)ev->vcpu << 32 | (uint32_t)ev->intid);
    /* other events are skipped, as PROTOCOL.md asks */
}

/* -- transport ------------------------------------------------------------------------------- */
/* The stream is lost: every later call fails at once with the same errno. */
static int lost(xc_interface *xch, const char *op, int err)
{
    xch->broken = err ? err : ECONNRESET;
    return fail(xch, xch->broken, "%s: connection lost: %s", op,
                err ? strerror(err) : "the daemon closed the connection");
}

static int send_all(xc_interface *xch, const char *op, const uint8_t *p, size_t n)
{
    while (n) {
        /* MSG_NOSIGNAL: a daemon that went away is EPIPE here, never a SIGPIPE in the host. */
        ssize_t done = send(xch->fd, p, n, MSG_NOSIGNAL);
        if (done < 0) {
            if (errno == EINTR) continue;
            return lost(xch, op, errno);
        }
        p += done;
        n -= (size_t)done;
    }
    return 0;
}

static int recv_all(xc_interface *xch, const char *op, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t done = recv(xch->fd, p, n, 0);
        if (done == 0) return lost(xch, op, 0);
        if (done < 0) {
            if (errno == EINTR) continue;
            return lost(xch, op, errno);
        }
        p += done;
        n -= (size_t)done;
    }
    return 0;
}

/* The next frame, decoded into out (free out->frame after): 0, or -1 with the error set. */
static int read_frame(xc_interface *xch, const char *op, struct reply *out)
{
    uint8_t hdr[4];
    if (recv_all(xch, op, hdr, 4)) return -1;
    uint32_t len = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
    if (len > MAX_FRAME) {
        xch->broken = EMSGSIZE;
        return fail(xch, EMSGSIZE, "%s: the daemon sent a frame of %u bytes, over MAX_FRAME", op, len);
    }
    uint8_t *frame = malloc(len ? len : 1);
    if (!frame) return fail(xch, ENOMEM, "%s: no memory for a %u-byte reply", op, len);
    if (recv_all(xch, op, frame, len)) { free(frame); return -1; }
    if (parse_reply(frame, len, out)) {
        free(frame);
        return fail(xch, EBADMSG, "%s: the daemon's reply is not a msgpack map as PROTOCOL.md says", op);
    }
    return 0;
}

/* A refusal: "op: ENAME: message" (the daemon's message, cut to fit), or "op: ENAME (text)". */
static int refused(xc_interface *xch, const char *op, struct reply *r)
{
    int err = r->ret < 0 && r->ret > -4096 ? (int)-r->ret : EIO;
    const char *name = errno_name(err);
    char number[16];
    if (!name) {
        snprintf(number, sizeof(number), "errno %d", err);
        name = number;
    }
    if (r->message.present && r->message.len)
        fail(xch, err, "%s: %s: %.*s", op, name, (int)(r->message.len > 512 ? 512 : r->message.len),
             (const char *)r->message.p);
    else
        fail(xch, err, "%s: %s (%s)", op, name, strerror(err));
    free(r->frame);
    errno = err;
    return -1;
}

/* Send {"id", "op", "args"} and wait for its reply (events read meanwhile are queued).
 * 0 with out holding the reply (free out->frame), or -1 and errno with the error set. */
static int call(xc_interface *xch, const char *op, struct args *args, struct reply *out)
{
    if (xch->broken) {
        free(args->w.data);
        return fail(xch, xch->broken, "%s: connection lost earlier: %s", op, strerror(xch->broken));
    }
    struct wbuf w = {0};
    uint32_t id = ++xch->next_id;
    w_bytes(&w, "\0\0\0\0", 4);  /* the length header, filled in below */
    w_map(&w, 3);
    w_str(&w, "id");
    w_uint(&w, id);
    w_str(&w, "op");
    w_str(&w, op);
    w_str(&w, "args");
    w_map(&w, args->n);
    w_bytes(&w, args->w.data, args->w.len);
    int too_big = args->w.failed || w.failed;
    free(args->w.data);
    if (too_big) {
        free(w.data);
        return fail(xch, w.len + 256 > MAX_FRAME || args->w.len + 256 > MAX_FRAME ? E2BIG : ENOMEM,
                    "%s: the request does not fit in a frame (MAX_FRAME is %u bytes)", op, MAX_FRAME);
    }
    size_t len = w.len - 4;
    w.data[0] = (uint8_t)(len >> 24), w.data[1] = (uint8_t)(len >> 16);
    w.data[2] = (uint8_t)(len >> 8), w.data[3] = (uint8_t)len;
    int rc = send_all(xch, op, w.data, w.len);
    free(w.data);
    if (rc) return -1;
    for (;;) {
        if (read_frame(xch, op, out)) return -1;
        if (out->is_event && !out->has_id) {
            queue_event(xch, out);
            free(out->frame);
            continue;
        }
        if (!out->has_id || out->id == id) break;  /* an id-less reply is about our frame */
        free(out->frame);
    }
    if (out->ret < 0) return refused(xch, op, out);
    return 0;
}

/* A request whose reply carries nothing the caller needs. */
static int simple(xc_interface *xch, const char *op, struct args *args)
{
    struct reply r;
    if (call(xch, op, args, &r)) return -1;
    free(r.frame);
    return 0;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read frames until q holds an event: 1, 0 after timeout_ms (negative: no limit), or -1. */
static int wait_event(xc_interface *xch, const char *op, struct event_queue *q, int timeout_ms)
{
    int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : 0;
    while (!q->len) {
        if (q->overflowed)
            return fail(xch, ENOBUFS, "%s: more than %d distinct events held; some were dropped", op, MAX_EVENTS);
        if (xch->broken)
            return fail(xch, xch->broken, "%s: connection lost earlier: %s", op, strerror(xch->broken));
        int left = -1;
        if (timeout_ms >= 0) {
            int64_t rest = deadline - now_ms();
            left = rest > 0 ? (int)rest : 0;
        }
        struct pollfd pfd = {.fd = xch->fd, .events = POLLIN};
        int ready = poll(&pfd, 1, left);
        if (ready < 0) {
            if (errno == EINTR) continue;
            return fail(xch, errno, "%s: poll: %s", op, strerror(errno));
        }
        if (ready == 0) return 0;
        struct reply r;
        if (read_frame(xch, op, &r)) return -1;
        if (r.is_event) queue_event(xch, &r);
        else if (!r.has_id && r.ret < 0) {  /* unasked, as ETIMEDOUT: the daemon then closes */
            xch->broken = (int)-r.ret;
            return refused(xch, op, &r);
        }
        free(r.frame);
    }
    return 1;
}

/* -- errors ---------------------------------------------------------------------------------- */
const xc_error *xc_get_last_error(xc_interface *xch) { return xch ? &xch->error : &open_error; }

void xc_clear_last_error(xc_interface *xch)
{
    xc_error *e = xch ? &xch->error : &open_error;
    memset(e, 0, sizeof(*e));
}

const char *xc_error_code_to_desc(int code)
{
    switch (code) {
    case XC_ERROR_NONE: return "No error details";
    case XC_INTERNAL_ERROR: return "Internal error";
    case XC_INVALID_KERNEL: return "Invalid kernel";
    case XC_INVALID_PARAM: return "Invalid configuration";
    case XC_OUT_OF_MEMORY: return "Out of memory";
    }
    return "Unknown error code";
}

const char *xc_last_error(xc_interface *xch) { return xc_get_last_error(xch)->message; }

/* -- the handle ------------------------------------------------------------------------------ */
xc_interface *xc_interface_open(const char *socket_path, const char *token)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memset(&open_error, 0, sizeof(open_error));
    if (!socket_path || !token) {
        fail_into(&open_error, EINVAL, "xc_interface_open: a socket path and a token are needed");
        return NULL;
    }
    if (strlen(socket_path) >= sizeof(addr.sun_path)) {
        fail_into(&open_error, ENAMETOOLONG, "xc_interface_open: %.200s: longer than a Unix socket path may be",
                  socket_path);
        return NULL;
    }
    strcpy(addr.sun_path, socket_path);
    xc_interface *xch = calloc(1, sizeof(*xch));
    if (!xch) {
        fail_into(&open_error, ENOMEM, "xc_interface_open: no memory for a handle");
        return NULL;
    }
    xch->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (xch->fd < 0 || fcntl(xch->fd, F_SETFD, FD_CLOEXEC) < 0
        || connect(xch->fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int saved = errno;
        if (xch->fd >= 0) close(xch->fd);
        free(xch);
        fail_into(&open_error, saved, "xc_interface_open: %.200s: %s", socket_path, strerror(saved));
        return NULL;
    }
    struct args a = {0};
    a_uint(&a, "version", 1);
    a_str(&a, "token", token);
    struct reply r;
    if (call(xch, "hello", &a, &r)) {
        int saved = errno;
        open_error = xch->error;
        close(xch->fd);
        free(xch);
        errno = saved;
        return NULL;
    }
    xch->domid = (int)r.domid;
    free(r.frame);
    return xch;
}

int xc_interface_close(xc_interface *xch)
{
    if (!xch) return 0;
    int rc = close(xch->fd);
    int saved = errno;
    free(xch->ioreqs.keys);
    free(xch->lpis.keys);
    free(xch);
    if (rc) errno = saved;
    return rc ? -1 : 0;
}

int xc_domid(xc_interface *xch) { return xch->domid; }

int xc_fd(xc_interface *xch) { return xch->fd; }

/* -- PV IOMMU -------------------------------------------------------------------------------- */
int xc_iommu_op(xc_interface *xch, struct pv_iommu_op *ops, unsigned int count)
{
    struct args a = {0};
    a_bin(&a, "buf", ops, (size_t)count * sizeof(*ops));
    a_uint(&a, "count", count);
    struct reply r;
    if (call(xch, "iommu_op", &a, &r)) return -1;
    int rc = 0;
    if (r.buf.present && r.buf.len == (size_t)count * sizeof(*ops))
        memcpy(ops, r.buf.p, r.buf.len);
    else
        rc = fail(xch, EBADMSG, "iommu_op: the reply's buffer is not the %u ops sent", count);
    free(r.frame);
    return rc;
}

/* -- IOREQ servers --------------------------------------------------------------------------- */
int xc_ioreq_server_create(xc_interface *xch, domid_t target, ioservid_t *id)
{
    struct args a = {0};
    a_uint(&a, "target", target);
    struct reply r;
    if (call(xch, "create_ioreq_server", &a, &r)) return -1;
    *id = (ioservid_t)r.ioserver;
    free(r.frame);
    return 0;
}

int xc_ioreq_server_destroy(xc_interface *xch, ioservid_t id)
{
    struct args a = {0};
    a_uint(&a, "ioserver", id);
    return simple(xch, "destroy_ioreq_server", &a);
}

int xc_ioreq_ack(xc_interface *xch, ioservid_t id, uint32_t read_pointer)
{
    struct args a = {0};
    a_uint(&a, "ioserver", id);
    a_uint(&a, "read_pointer", read_pointer);
    return simple(xch, "ioreq_ack", &a);
}

int xc_ioreq_complete(xc_interface *xch, ioservid_t id, uint32_t req_id)
{
    struct args a = {0};
    a_uint(&a, "ioserver", id);
    a_uint(&a, "id", req_id);
    return simple(xch, "ioreq_complete", &a);
}

int xc_ioreq_wait(xc_interface *xch, int timeout_ms, ioservid_t *id)
{
    int rc = wait_event(xch, "xc_ioreq_wait", &xch->ioreqs, timeout_ms);
    if (rc == 1) *id = (ioservid_t)queue_pop(&xch->ioreqs);
    return rc;
}

int xc_ioreq_fetch(xc_interface *xch, ioservid_t id, buffered_iopage_t *page,
                   ioreq_t *sync, uint32_t *sync_ids, unsigned int max_sync, unsigned int *nr_sync)
{
    struct args a = {0};
    a_uint(&a, "ioserver", id);
    struct reply r;
    if (call(xch, "ioreq_fetch", &a, &r)) return -1;
    *nr_sync = 0;
    if (!r.page.present || r.page.len != sizeof(*page)) {
        free(r.frame);
        return fail(xch, EBADMSG, "ioreq_fetch: the reply's page is not a buffered_iopage_t");
    }
    memcpy(page, r.page.p, sizeof(*page));
    if (r.has_sync) {
        uint32_t n;
        struct rbuf s = r.sync;
        if (r_container(&s, 0, &n)) { free(r.frame); return fail(xch, EBADMSG, "ioreq_fetch: bad sync list"); }
        for (uint32_t i = 0; i < n; i++) {
            uint32_t pair;
            int64_t req_id;
            const uint8_t *raw;
            size_t raw_len;
            if (r_container(&s, 0, &pair) || pair != 2 || r_int(&s, &req_id) || r_blob(&s, &raw, &raw_len)
                || raw_len != sizeof(ioreq_t)) {
                free(r.frame);
                return fail(xch, EBADMSG, "ioreq_fetch: bad synchronous request %u", i);
            }
            if (*nr_sync < max_sync) {
                memcpy(&sync[*nr_sync], raw, sizeof(ioreq_t));
                sync_ids[*nr_sync] = (uint32_t)req_id;
                (*nr_sync)++;
            }
        }
    }
    free(r.frame);
    return 0;
}

/* -- ballooning ----------------------------------------------------------------------------- */
/* Both return the GFNs done; one that stopped early also sets errno to why (and the detail). */
static long memory_op(xc_interface *xch, const char *op, unsigned long nr, uint64_t *gfns, int out)
{
    if (nr > 65536) return fail(xch, E2BIG, "%s: %lu GFNs, more than the 65,536 one call takes", op, nr);
    struct args a = {0};
    a_uints(&a, "gfns", gfns, nr);
    struct reply r;
    if (call(xch, op, &a, &r)) return -1;
    long done = (long)r.ret;
    if (out && r.has_mfns) {  /* a PV guest's new frames */
        uint32_t n;
        struct rbuf m = r.mfns;
        if (r_container(&m, 0, &n) || n > nr) { free(r.frame); return fail(xch, EBADMSG, "%s: bad mfns", op); }
        for (uint32_t i = 0; i < n; i++) {
            int64_t mfn;
            if (r_int(&m, &mfn)) { free(r.frame); return fail(xch, EBADMSG, "%s: bad mfns", op); }
            gfns[i] = (uint64_t)mfn;
        }
    }
    if (r.status < 0) {
        int err = (int)-r.status;
        const char *name = errno_name(err);
        fail(xch, err, "%s: stopped after %ld of %lu GFNs: %s", op, done, nr, name ? name : strerror(err));
    }
    free(r.frame);
    return done;
}

long xc_domain_decrease_reservation(xc_interface *xch, unsigned long nr, const uint64_t *gfns)
{
    return memory_op(xch, "decrease_reservation", nr, (uint64_t *)gfns, 0);
}

long xc_domain_populate_physmap(xc_interface *xch, unsigned long nr, uint64_t *gfns)
{
    return memory_op(xch, "populate_physmap", nr, gfns, 1);
}

/* -- grant tables ---------------------------------------------------------------------------- */
int xc_gnttab_grant_access(xc_interface *xch, grant_ref_t ref, domid_t domid, uint64_t gfn, int readonly)
{
    struct args a = {0};
    a_uint(&a, "ref", ref);
    a_uint(&a, "domid", domid);
    a_uint(&a, "gfn", gfn);
    a_bool(&a, "readonly", readonly);
    return simple(xch, "grant_access", &a);
}

int xc_gnttab_end_access(xc_interface *xch, grant_ref_t ref)
{
    struct args a = {0};
    a_uint(&a, "ref", ref);
    return simple(xch, "end_access", &a);
}

int xc_gnttab_op(xc_interface *xch, unsigned int cmd, void *uops, unsigned int count)
{
    size_t size;
    const char *name;
    if (cmd == GNTTABOP_map_grant_ref) { size = sizeof(gnttab_map_grant_ref_t); name = "map_grant_ref"; }
    else if (cmd == GNTTABOP_unmap_grant_ref) { size = sizeof(gnttab_unmap_grant_ref_t); name = "unmap_grant_ref"; }
    else return fail(xch, EOPNOTSUPP, "grant_table_op: command %u is not map_grant_ref or unmap_grant_ref", cmd);
    struct args a = {0};
    a_str(&a, "cmd", name);
    a_bin(&a, "buf", uops, size * count);
    a_uint(&a, "count", count);
    struct reply r;
    if (call(xch, "grant_table_op", &a, &r)) return -1;
    int rc = 0;
    if (r.buf.present && r.buf.len == size * count)
        memcpy(uops, r.buf.p, r.buf.len);
    else
        rc = fail(xch, EBADMSG, "grant_table_op: the reply's buffer is not the %u ops sent", count);
    free(r.frame);
    return rc;
}

/* -- guest memory and devices ---------------------------------------------------------------- */
int xc_guest_write(xc_interface *xch, uint64_t gfn, uint32_t offset, const void *data, size_t len)
{
    struct args a = {0};
    a_uint(&a, "gfn", gfn);
    a_uint(&a, "offset", offset);
    a_bin(&a, "data", data, len);
    return simple(xch, "guest_write", &a);
}

int xc_guest_read(xc_interface *xch, uint64_t gfn, uint32_t offset, void *data, size_t len)
{
    struct args a = {0};
    a_uint(&a, "gfn", gfn);
    a_uint(&a, "offset", offset);
    a_uint(&a, "length", len);
    struct reply r;
    if (call(xch, "guest_read", &a, &r)) return -1;
    int rc = 0;
    if (r.data.present && r.data.len == len)
        memcpy(data, r.data.p, len);
    else
        rc = fail(xch, EBADMSG, "guest_read: the reply holds not the %zu bytes asked", len);
    free(r.frame);
    return rc;
}

int xc_device_dma(xc_interface *xch, const char *bdf, uint64_t addr, void *data, size_t len, int write,
                  uint64_t *fault_bfn)
{
    struct args a = {0};
    a_str(&a, "bdf", bdf);
    a_uint(&a, "addr", addr);
    if (write) a_bin(&a, "data", data, len);
    else a_uint(&a, "length", len);
    struct reply r;
    if (call(xch, "device_dma", &a, &r)) return -1;
    int rc = 0;
    if (!r.ok) {
        if (fault_bfn) *fault_bfn = r.has_fault ? (uint64_t)r.fault_bfn : 0;
        int rlen = r.reason.present ? (int)(r.reason.len > 64 ? 64 : r.reason.len) : 0;
        rc = fail(xch, EFAULT, "device_dma: %s faulted at BFN %#llx: %.*s", bdf,
                  (unsigned long long)(r.has_fault ? r.fault_bfn : 0), rlen,
                  rlen ? (const char *)r.reason.p : "");
    } else if (!write) {
        if (r.data.present && r.data.len == len) memcpy(data, r.data.p, len);
        else rc = fail(xch, EBADMSG, "device_dma: the reply holds not the %zu bytes read", len);
    }
    free(r.frame);
    return rc;
}

/* -- the vITS -------------------------------------------------------------------------------- */
static int its_mmio(xc_interface *xch, enum xc_its_frame frame, unsigned int index, uint64_t offset,
                    unsigned int size, const uint64_t *write, uint64_t *read)
{
    if (frame != XC_ITS_FRAME_ITS && frame != XC_ITS_FRAME_REDIST)
        return fail(xch, EINVAL, "its_mmio: frame %d is neither XC_ITS_FRAME_ITS nor XC_ITS_FRAME_REDIST", frame);
    struct args a = {0};
    a_str(&a, "frame", frame == XC_ITS_FRAME_ITS ? "its" : "redist");
    a_uint(&a, "index", index);
    a_uint(&a, "offset", offset);
    a_uint(&a, "size", size);
    if (write) a_uint(&a, "value", *write);
    struct reply r;
    if (call(xch, "its_mmio", &a, &r)) return -1;
    if (read) *read = r.has_value ? (uint64_t)r.value : 0;
    free(r.frame);
    return 0;
}

int xc_its_mmio_read(xc_interface *xch, enum xc_its_frame frame, unsigned int index, uint64_t offset,
                     unsigned int size, uint64_t *value)
{
    return its_mmio(xch, frame, index, offset, size, NULL, value);
}

int xc_its_mmio_write(xc_interface *xch, enum xc_its_frame frame, unsigned int index, uint64_t offset,
                      unsigned int size, uint64_t value)
{
    return its_mmio(xch, frame, index, offset, size, &value, NULL);
}

int xc_lpi_wait(xc_interface *xch, int timeout_ms, unsigned int *vcpu, uint32_t *intid)
{
    int rc = wait_event(xch, "xc_lpi_wait", &xch->lpis, timeout_ms);
    if (rc == 1) {
        uint64_t key = queue_pop(&xch->lpis);
        *vcpu = (unsigned int)(key >> 32);
        *intid = (uint32_t)key;
    }
    return rc;
}

int xc_its_end(xc_interface *xch, unsigned int vcpu, uint32_t intid)
{
    struct args a = {0};
    a_uint(&a, "vcpu", vcpu);
    a_uint(&a, "intid", intid);
    return simple(xch, "its_end", &a);
}
