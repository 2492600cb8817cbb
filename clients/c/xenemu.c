/*
 * libxenemu: framing, a minimal msgpack codec (maps, str, bin, ints, arrays, nil, bool), and
 * the requests of PROTOCOL.md that an emulator or a PV-IOMMU guest needs.
 */
#define _POSIX_C_SOURCE 200809L

#include "xenemu.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FRAME (4u * 1024u * 1024u)
#define EVENT_QUEUE 64

struct xc_interface_core {
    int fd;
    int domid;
    uint32_t next_id;
    ioservid_t events[EVENT_QUEUE];
    unsigned int nr_events;
    char error[256];
};

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
    else { w_u8(w, 0xd9); w_u8(w, (uint8_t)n); }
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

static void w_bin(struct wbuf *w, const void *p, size_t n)
{
    if (n <= 0xff) { w_u8(w, 0xc4); w_be(w, n, 1); }
    else if (n <= 0xffff) { w_u8(w, 0xc5); w_be(w, n, 2); }
    else { w_u8(w, 0xc6); w_be(w, n, 4); }
    w_bytes(w, p, n);
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

/* -- replies --------------------------------------------------------------------------------- */
struct reply {
    int is_event;
    int has_id;
    int64_t id, ret, domid, ioserver;
    const uint8_t *buf, *page;
    size_t buf_len, page_len;
    struct rbuf sync;
    int has_sync;
    uint8_t *frame;
};

static int parse_reply(xc_interface *xch, uint8_t *frame, size_t len, struct reply *out)
{
    struct rbuf r = {frame, frame + len};
    uint32_t n;
    memset(out, 0, sizeof(*out));
    out->frame = frame;
    if (r_container(&r, 1, &n)) return -EBADMSG;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *k, *v;
        size_t klen, vlen;
        if (r_blob(&r, &k, &klen)) return -EBADMSG;
        if (key_is(k, klen, "event")) { out->is_event = 1; if (r_skip(&r, 0)) return -EBADMSG; }
        else if (key_is(k, klen, "id")) {
            if (r.p < r.end && *r.p == 0xc0) r.p++;
            else if (r_int(&r, &out->id) == 0) out->has_id = 1;
            else return -EBADMSG;
        }
        else if (key_is(k, klen, "ret")) { if (r_int(&r, &out->ret)) return -EBADMSG; }
        else if (key_is(k, klen, "domid")) { if (r_int(&r, &out->domid)) return -EBADMSG; }
        else if (key_is(k, klen, "ioserver")) { if (r_int(&r, &out->ioserver)) return -EBADMSG; }
        else if (key_is(k, klen, "buf")) { if (r_blob(&r, &out->buf, &out->buf_len)) return -EBADMSG; }
        else if (key_is(k, klen, "page")) { if (r_blob(&r, &out->page, &out->page_len)) return -EBADMSG; }
        else if (key_is(k, klen, "message")) {
            if (r_blob(&r, &v, &vlen)) return -EBADMSG;
            if (vlen >= sizeof(xch->error)) vlen = sizeof(xch->error) - 1;
            memcpy(xch->error, v, vlen);
            xch->error[vlen] = 0;
        }
        else if (key_is(k, klen, "sync")) {
            out->sync = r;
            out->has_sync = 1;
            if (r_skip(&r, 0)) return -EBADMSG;
        }
        else if (r_skip(&r, 0)) return -EBADMSG;
    }
    return 0;
}

/* -- transport ------------------------------------------------------------------------------- */
static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t done = write(fd, p, n);
        if (done < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += done;
        n -= (size_t)done;
    }
    return 0;
}

static int read_all(int fd, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t done = read(fd, p, n);
        if (done == 0) return -ECONNRESET;
        if (done < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += done;
        n -= (size_t)done;
    }
    return 0;
}

static int read_frame(xc_interface *xch, struct reply *out)
{
    uint8_t hdr[4];
    int rc = read_all(xch->fd, hdr, 4);
    if (rc) return rc;
    uint32_t len = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
    if (len > MAX_FRAME) return -EMSGSIZE;
    uint8_t *frame = malloc(len ? len : 1);
    if (!frame) return -ENOMEM;
    rc = read_all(xch->fd, frame, len);
    if (!rc) rc = parse_reply(xch, frame, len, out);
    if (rc) free(frame);
    return rc;
}

static void queue_event(xc_interface *xch, const struct reply *ev)
{
    if (xch->nr_events < EVENT_QUEUE)
        xch->events[xch->nr_events++] = (ioservid_t)ev->ioserver;
}

/* Send {"id", "op", "args": {...}} (args already encoded as a map body with nargs pairs) and
 * wait for its reply; events read meanwhile are queued. */
static int call(xc_interface *xch, const char *op, struct wbuf *args, uint32_t nargs, struct reply *out)
{
    struct wbuf w = {0};
    uint32_t id = ++xch->next_id;
    w_map(&w, 3);
    w_str(&w, "id");
    w_uint(&w, id);
    w_str(&w, "op");
    w_str(&w, op);
    w_str(&w, "args");
    w_map(&w, nargs);
    if (args) w_bytes(&w, args->data, args->len);
    if (w.failed || w.len > MAX_FRAME) { free(w.data); return -ENOMEM; }
    uint8_t hdr[4] = {(uint8_t)(w.len >> 24), (uint8_t)(w.len >> 16), (uint8_t)(w.len >> 8), (uint8_t)w.len};
    int rc = write_all(xch->fd, hdr, 4);
    if (!rc) rc = write_all(xch->fd, w.data, w.len);
    free(w.data);
    if (rc) return rc;
    for (;;) {
        rc = read_frame(xch, out);
        if (rc) return rc;
        if (out->is_event && !out->has_id) {
            queue_event(xch, out);
            free(out->frame);
            continue;
        }
        if (!out->has_id || out->id == id) break;
        free(out->frame);
    }
    if (out->ret < 0) {
        rc = (int)out->ret;
        free(out->frame);
        return rc;
    }
    return 0;
}

/* -- the API --------------------------------------------------------------------------------- */
xc_interface *xc_interface_open(const char *socket_path, const char *token)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof(addr.sun_path)) { errno = ENAMETOOLONG; return NULL; }
    strcpy(addr.sun_path, socket_path);
    xc_interface *xch = calloc(1, sizeof(*xch));
    if (!xch) return NULL;
    xch->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (xch->fd < 0 || connect(xch->fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int saved = errno;
        if (xch->fd >= 0) close(xch->fd);
        free(xch);
        errno = saved;
        return NULL;
    }
    struct wbuf args = {0};
    w_str(&args, "version");
    w_uint(&args, 1);
    w_str(&args, "token");
    w_str(&args, token);
    struct reply r;
    int rc = call(xch, "hello", &args, 2, &r);
    free(args.data);
    if (rc) {
        fprintf(stderr, "xc_interface_open: %s (%d)\n", xch->error, rc);
        close(xch->fd);
        free(xch);
        errno = -rc;
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
    free(xch);
    return rc ? -errno : 0;
}

int xc_domid(xc_interface *xch) { return xch->domid; }

const char *xc_last_error(xc_interface *xch) { return xch->error; }

int xc_iommu_op(xc_interface *xch, struct pv_iommu_op *ops, unsigned int count)
{
    struct wbuf args = {0};
    w_str(&args, "buf");
    w_bin(&args, ops, (size_t)count * sizeof(*ops));
    w_str(&args, "count");
    w_uint(&args, count);
    struct reply r;
    int rc = call(xch, "iommu_op", &args, 2, &r);
    free(args.data);
    if (rc) return rc;
    if (r.buf && r.buf_len == (size_t)count * sizeof(*ops))
        memcpy(ops, r.buf, r.buf_len);
    else
        rc = -EBADMSG;
    free(r.frame);
    return rc;
}

static int simple(xc_interface *xch, const char *op, struct wbuf *args, uint32_t nargs, int64_t *ioserver)
{
    struct reply r;
    int rc = call(xch, op, args, nargs, &r);
    free(args->data);
    if (rc) return rc;
    if (ioserver) *ioserver = r.ioserver;
    free(r.frame);
    return 0;
}

int xc_ioreq_server_create(xc_interface *xch, domid_t target, ioservid_t *id)
{
    struct wbuf args = {0};
    w_str(&args, "target");
    w_uint(&args, target);
    int64_t server = 0;
    int rc = simple(xch, "create_ioreq_server", &args, 1, &server);
    if (!rc) *id = (ioservid_t)server;
    return rc;
}

int xc_ioreq_server_destroy(xc_interface *xch, ioservid_t id)
{
    struct wbuf args = {0};
    w_str(&args, "ioserver");
    w_uint(&args, id);
    return simple(xch, "destroy_ioreq_server", &args, 1, NULL);
}

int xc_ioreq_ack(xc_interface *xch, ioservid_t id, uint32_t read_pointer)
{
    struct wbuf args = {0};
    w_str(&args, "ioserver");
    w_uint(&args, id);
    w_str(&args, "read_pointer");
    w_uint(&args, read_pointer);
    return simple(xch, "ioreq_ack", &args, 2, NULL);
}

int xc_ioreq_complete(xc_interface *xch, ioservid_t id, uint32_t req_id)
{
    struct wbuf args = {0};
    w_str(&args, "ioserver");
    w_uint(&args, id);
    w_str(&args, "id");
    w_uint(&args, req_id);
    return simple(xch, "ioreq_complete", &args, 2, NULL);
}

int xc_ioreq_wait(xc_interface *xch, int timeout_ms, ioservid_t *id)
{
    while (!xch->nr_events) {
        struct pollfd pfd = {.fd = xch->fd, .events = POLLIN};
        int ready = poll(&pfd, 1, timeout_ms);
        if (ready < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (ready == 0) return 0;
        struct reply r;
        int rc = read_frame(xch, &r);
        if (rc) return rc;
        if (r.is_event) queue_event(xch, &r);
        free(r.frame);
    }
    *id = xch->events[0];
    memmove(xch->events, xch->events + 1, (xch->nr_events - 1) * sizeof(xch->events[0]));
    xch->nr_events--;
    return 1;
}

int xc_ioreq_fetch(xc_interface *xch, ioservid_t id, buffered_iopage_t *page,
                   ioreq_t *sync, uint32_t *sync_ids, unsigned int max_sync, unsigned int *nr_sync)
{
    struct wbuf args = {0};
    w_str(&args, "ioserver");
    w_uint(&args, id);
    struct reply r;
    int rc = call(xch, "ioreq_fetch", &args, 1, &r);
    free(args.data);
    if (rc) return rc;
    *nr_sync = 0;
    if (!r.page || r.page_len != sizeof(*page)) { free(r.frame); return -EBADMSG; }
    memcpy(page, r.page, sizeof(*page));
    if (r.has_sync) {
        uint32_t n;
        struct rbuf s = r.sync;
        if (r_container(&s, 0, &n)) { free(r.frame); return -EBADMSG; }
        for (uint32_t i = 0; i < n; i++) {
            uint32_t pair;
            int64_t req_id;
            const uint8_t *raw;
            size_t raw_len;
            if (r_container(&s, 0, &pair) || pair != 2 || r_int(&s, &req_id) || r_blob(&s, &raw, &raw_len)
                || raw_len != sizeof(ioreq_t)) {
                free(r.frame);
                return -EBADMSG;
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
