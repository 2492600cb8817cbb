/*
 * xenemu-example: the C client at work.
 *
 *   xenemu-example SOCKET TOKEN map [PAGES]
 *       query_caps, then map PAGES of its own GFNs at BFN 0x10000 + gfn in one batch and unmap them
 *       in another; prints each batch's statuses.
 *   xenemu-example SOCKET TOKEN emulate GUEST PAGES
 *       as an emulator: create an IOREQ server for GUEST, map its first PAGES frames at
 *       BFN 0x20000 + gfn, print "READY", then handle pushed invalidates (buffered and
 *       synchronous) by unmapping each BFN until all PAGES are gone; prints "INVALIDATE bfn".
 *
 * Exit status 0 when every op succeeded.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xenemu.h"

#define MAX_PAGES 4096

static struct pv_iommu_op ops[MAX_PAGES];

static int failures(unsigned int n)
{
    int bad = 0;
    for (unsigned int i = 0; i < n; i++)
        bad += ops[i].status != 0;
    return bad;
}

static int do_map(xc_interface *xch, unsigned int pages)
{
    memset(ops, 0, sizeof(ops));
    ops[0].subop_id = IOMMUOP_query_caps;
    int rc = xc_iommu_op(xch, ops, 1);
    if (rc || ops[0].status) return fprintf(stderr, "query_caps: %d/%d\n", rc, ops[0].status), 1;
    printf("query_caps flags=%#x map_cap=%d order=%d\n", ops[0].flags, ops[0].flags & IOMMU_QUERY_map_cap,
           ops[0].flags >> IOMMU_page_order_shift);
    if (!(ops[0].flags & IOMMU_QUERY_map_cap)) return 1;

    memset(ops, 0, sizeof(ops));
    for (unsigned int i = 0; i < pages; i++) {
        ops[i].subop_id = IOMMUOP_map_page;
        ops[i].flags = IOMMU_OP_readable | IOMMU_OP_writeable;
        ops[i].u.map_page.bfn = 0x10000 + i;
        ops[i].u.map_page.gfn = i;
    }
    rc = xc_iommu_op(xch, ops, pages);
    printf("map_page x%u: rc=%d failed=%d\n", pages, rc, failures(pages));
    if (rc || failures(pages)) return 1;

    memset(ops, 0, sizeof(ops));
    for (unsigned int i = 0; i < pages; i++) {
        ops[i].subop_id = IOMMUOP_unmap_page;
        ops[i].u.unmap_page.bfn = 0x10000 + i;
    }
    rc = xc_iommu_op(xch, ops, pages);
    printf("unmap_page x%u: rc=%d failed=%d\n", pages, rc, failures(pages));
    return rc || failures(pages);
}

static int unmap_one(xc_interface *xch, ioservid_t server, uint64_t bfn)
{
    struct pv_iommu_op op = {.subop_id = IOMMUOP_unmap_foreign_page};
    op.u.unmap_foreign_page.bfn = bfn;
    op.u.unmap_foreign_page.ioserver = server;
    int rc = xc_iommu_op(xch, &op, 1);
    printf("INVALIDATE %#llx unmap=%d\n", (unsigned long long)bfn, rc ? rc : op.status);
    return rc || op.status;
}

static int do_emulate(xc_interface *xch, domid_t guest, unsigned int pages)
{
    ioservid_t server;
    int rc = xc_ioreq_server_create(xch, guest, &server);
    if (rc) return fprintf(stderr, "create_ioreq_server: %d %s\n", rc, xc_last_error(xch)), 1;
    memset(ops, 0, sizeof(ops));
    for (unsigned int i = 0; i < pages; i++) {
        ops[i].subop_id = IOMMUOP_map_foreign_page;
        ops[i].flags = IOMMU_OP_readable | IOMMU_OP_writeable;
        ops[i].u.map_foreign_page.bfn = 0x20000 + i;
        ops[i].u.map_foreign_page.gfn = i;
        ops[i].u.map_foreign_page.domid = guest;
        ops[i].u.map_foreign_page.ioserver = server;
    }
    rc = xc_iommu_op(xch, ops, pages);
    if (rc || failures(pages)) return fprintf(stderr, "map_foreign_page: %d\n", rc), 1;
    printf("READY ioserver=%u pages=%u\n", server, pages);
    fflush(stdout);

    static buffered_iopage_t page;
    ioreq_t sync[64];
    uint32_t sync_ids[64];
    unsigned int gone = 0, bad = 0;
    while (gone < pages) {
        ioservid_t which;
        rc = xc_ioreq_wait(xch, 30000, &which);
        if (rc <= 0) return fprintf(stderr, "no invalidate within 30 s (%d)\n", rc), 1;
        unsigned int nr_sync;
        rc = xc_ioreq_fetch(xch, server, &page, sync, sync_ids, 64, &nr_sync);
        if (rc) return fprintf(stderr, "ioreq_fetch: %d\n", rc), 1;
        uint32_t rp = page.read_pointer;
        while (rp != page.write_pointer) {
            buf_ioreq_t *slot = &page.buf_ioreq[rp % IOREQ_BUFFER_SLOT_NUM];
            uint64_t bfn = slot->data;
            rp++;
            if (slot->size == BUF_IOREQ_SIZE_8) {
                bfn |= (uint64_t)page.buf_ioreq[rp % IOREQ_BUFFER_SLOT_NUM].data << 32;
                rp++;
            }
            if (slot->type == IOREQ_TYPE_INVALIDATE) {
                bad += unmap_one(xch, server, bfn);
                gone++;
            }
        }
        if (rp != page.read_pointer && (rc = xc_ioreq_ack(xch, server, rp)))
            return fprintf(stderr, "ioreq_ack: %d\n", rc), 1;
        for (unsigned int i = 0; i < nr_sync; i++) {
            if (sync[i].type == IOREQ_TYPE_INVALIDATE) {
                bad += unmap_one(xch, server, sync[i].data);
                gone++;
            }
            if ((rc = xc_ioreq_complete(xch, server, sync_ids[i])))
                return fprintf(stderr, "ioreq_complete: %d\n", rc), 1;
        }
    }
    rc = xc_ioreq_server_destroy(xch, server);
    printf("DONE invalidated=%u failed=%u destroy=%d\n", gone, bad, rc);
    return bad || rc;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKET TOKEN map [PAGES] | emulate GUEST PAGES\n", argv[0]);
        return 2;
    }
    xc_interface *xch = xc_interface_open(argv[1], argv[2]);
    if (!xch) {
        perror("xc_interface_open");
        return 1;
    }
    printf("connected as d%d\n", xc_domid(xch));
    int status;
    if (strcmp(argv[3], "map") == 0) {
        unsigned int pages = argc > 4 ? (unsigned int)strtoul(argv[4], NULL, 0) : 64;
        status = do_map(xch, pages > MAX_PAGES ? MAX_PAGES : pages);
    } else if (strcmp(argv[3], "emulate") == 0 && argc > 5) {
        unsigned int pages = (unsigned int)strtoul(argv[5], NULL, 0);
        status = do_emulate(xch, (domid_t)strtoul(argv[4], NULL, 0), pages > MAX_PAGES ? MAX_PAGES : pages);
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[3]);
        status = 2;
    }
    xc_interface_close(xch);
    return status;
}
