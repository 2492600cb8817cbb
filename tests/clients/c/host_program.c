/*
 * A host program embedding libxenemu, built twice by tests/clients/test_c_client.py: as C
 * (linked to the shared library) and as C++ (linked to the static one), both through
 * `pkg-config --cflags --libs xenemu` against an installed copy.
 *
 *   host_program SOCKET TOKEN      then a line on stdin once the daemon has been killed
 *
 * It prints what each call returned on stdout; the library itself must print nothing (stderr
 * stays empty) and must not raise SIGPIPE when the daemon is gone.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <xenemu/xenemu.h>

#ifdef __cplusplus
#define LANG "c++"
#else
#define LANG "c"
#endif

static const char *name(int err)
{
    switch (err) {
    case EACCES: return "EACCES";
    case E2BIG: return "E2BIG";
    case EPIPE: return "EPIPE";
    case ECONNRESET: return "ECONNRESET";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case EBUSY: return "EBUSY";
    case EINVAL: return "EINVAL";
    case ENOENT: return "ENOENT";
    default: return "other";
    }
}

static struct pv_iommu_op big[70000];

int main(int argc, char **argv)
{
    if (argc < 3) return 2;
    printf("lang=%s version=%s\n", LANG, XENEMU_LIB_VERSION);

    char long_path[200];
    memset(long_path, 'x', sizeof(long_path) - 1);
    long_path[sizeof(long_path) - 1] = 0;
    xc_interface *none = xc_interface_open(long_path, argv[2]);
    printf("open long path: %s errno=%s\n", none ? "handle" : "NULL", name(errno));

    none = xc_interface_open(argv[1], "00000000000000000000000000000000");
    int err = errno;
    const xc_error *detail = xc_get_last_error(NULL);
    printf("open bad token: %s errno=%s code=%d detail=[%s]\n", none ? "handle" : "NULL", name(err), (int)detail->code,
           detail->message);

    xc_interface *xch = xc_interface_open(argv[1], argv[2]);
    if (!xch) {
        printf("open: %s\n", xc_get_last_error(NULL)->message);
        return 1;
    }
    printf("open: d%d fd=%s\n", xc_domid(xch), xc_fd(xch) >= 0 ? "ok" : "bad");

    struct pv_iommu_op op;
    memset(&op, 0, sizeof(op));
    op.subop_id = IOMMUOP_query_caps;
    int rc = xc_iommu_op(xch, &op, 1);
    printf("query_caps: rc=%d status=%d map_cap=%d\n", rc, op.status, op.flags & IOMMU_QUERY_map_cap);

    rc = xc_iommu_op(xch, big, 70000);
    err = errno;
    detail = xc_get_last_error(xch);
    printf("oversized batch: rc=%d errno=%s code=%s detail=[%s]\n", rc, name(err), xc_error_code_to_desc(detail->code),
           detail->message);
    xc_clear_last_error(xch);
    printf("cleared: code=%d detail=[%s]\n", (int)xc_get_last_error(xch)->code, xc_last_error(xch));

    rc = xc_gnttab_grant_access(xch, 5, 0, 1, 1);
    int rc_end = xc_gnttab_end_access(xch, 5);
    int rc_bad = xc_gnttab_grant_access(xch, 5000, 0, 1, 0);
    printf("grant_access: rc=%d end=%d out of range: rc=%d errno=%s\n", rc, rc_end, rc_bad, name(errno));

    uint8_t data[16] = "host program", back[16] = {0};
    rc = xc_guest_write(xch, 3, 100, data, sizeof(data));
    int rc_read = xc_guest_read(xch, 3, 100, back, sizeof(back));
    printf("guest memory: write=%d read=%d same=%d\n", rc, rc_read, memcmp(data, back, sizeof(data)) == 0);

    uint64_t gfns[3] = {10, 11, 12};
    long done = xc_domain_decrease_reservation(xch, 3, gfns);
    long again = xc_domain_decrease_reservation(xch, 3, gfns);
    err = errno;
    long back_in = xc_domain_populate_physmap(xch, 3, gfns);
    printf("balloon: out=%ld again=%ld errno=%s detail=[%s] in=%ld\n", done, again, again < 3 ? name(err) : "-",
           xc_get_last_error(xch)->message, back_in);

    printf("READY\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof(line), stdin)) return 3;

    memset(&op, 0, sizeof(op));
    op.subop_id = IOMMUOP_query_caps;
    rc = xc_iommu_op(xch, &op, 1);
    err = errno;
    printf("after the daemon died: rc=%d errno=%s detail=[%s]\n", rc, name(err), xc_get_last_error(xch)->message);
    rc = xc_iommu_op(xch, &op, 1);
    printf("again: rc=%d errno=%s\n", rc, name(errno));
    ioservid_t id;
    rc = xc_ioreq_wait(xch, 100, &id);
    printf("wait: rc=%d\n", rc);
    xc_interface_close(xch);
    printf("ALIVE\n");
    return 0;
}
