/*
 * xenemu-example: the C library at work, one mode per hypercall family.
 *
 *   xenemu-example SOCKET TOKEN map [PAGES]
 *       A guest with a device (so it has an IOMMU context): query_caps, then map PAGES of its
 *       own GFNs at BFN 0x10000 + gfn in one batch and unmap them in another.
 *   xenemu-example SOCKET TOKEN emulate GUEST PAGES
 *       An emulator: TOKEN is a device-model domain's (`create --type pv --target GUEST`) with
 *       a device of its own assigned (its IOMMU context), and GUEST has at least PAGES frames.
 *       It creates an IOREQ server for GUEST, maps GUEST's first PAGES frames at BFN
 *       0x20000 + gfn, prints "READY", then handles the invalidates that GUEST's balloon-out
 *       pushes (buffered and synchronous) by unmapping each BFN until all PAGES are gone.
 *   xenemu-example SOCKET TOKEN grant BACKEND_TOKEN PAGES
 *       A frontend (TOKEN) grants PAGES of its GFNs to a backend (BACKEND_TOKEN, a domain with a
 *       device); the backend maps them at BFN 0x30000 + i with GNTMAP_request_bfn_map, unmaps
 *       them, and the frontend ends access.
 *   xenemu-example SOCKET TOKEN its BDF EVENTS ITS_BASE
 *       A guest whose device BDF is MSI-capable (assigned with its_devid, EVENTS events, behind
 *       pITS 0, as its first ITS device: virtual DeviceID 0), one vCPU, and its vITS at
 *       guest-physical ITS_BASE (its_info / domain_info): brings the vITS up as Linux does,
 *       maps each event to an LPI, makes the device raise each one by DMA to GITS_TRANSLATER,
 *       and takes each LPI ("LPI vcpu=0 intid=N"), ending it.
 *
 * Exit status 0 when every op succeeded, 1 otherwise (the library's detail on stderr).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* libxc's way: the call said -1 and set errno; the handle holds the detail. */
static int report(xc_interface *xch, const char *what)
{
    const xc_error *e = xc_get_last_error(xch);
    fprintf(stderr, "%s: %s (errno %d, %s)\n", what, e->message, e->errnum, xc_error_code_to_desc(e->code));
    return 1;
}

static int do_map(xc_interface *xch, unsigned int pages)
{
    memset(ops, 0, sizeof(ops));
    ops[0].subop_id = IOMMUOP_query_caps;
    if (xc_iommu_op(xch, ops, 1) < 0) return report(xch, "query_caps");
    if (ops[0].status) return fprintf(stderr, "query_caps: status %d\n", ops[0].status), 1;
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
    int rc = xc_iommu_op(xch, ops, pages);
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
    printf("INVALIDATE %#llx unmap=%d\n", (unsigned long long)bfn, rc ? -errno : op.status);
    return rc || op.status;
}

static int do_emulate(xc_interface *xch, domid_t guest, unsigned int pages)
{
    ioservid_t server;
    if (xc_ioreq_server_create(xch, guest, &server) < 0) return report(xch, "create_ioreq_server");
    memset(ops, 0, sizeof(ops));
    for (unsigned int i = 0; i < pages; i++) {
        ops[i].subop_id = IOMMUOP_map_foreign_page;
        ops[i].flags = IOMMU_OP_readable | IOMMU_OP_writeable;
        ops[i].u.map_foreign_page.bfn = 0x20000 + i;
        ops[i].u.map_foreign_page.gfn = i;
        ops[i].u.map_foreign_page.domid = guest;
        ops[i].u.map_foreign_page.ioserver = server;
    }
    if (xc_iommu_op(xch, ops, pages) < 0) return report(xch, "map_foreign_page");
    if (failures(pages)) return fprintf(stderr, "map_foreign_page: %d ops failed\n", failures(pages)), 1;
    printf("READY ioserver=%u pages=%u\n", server, pages);
    fflush(stdout);

    static buffered_iopage_t page;
    ioreq_t sync[64];
    uint32_t sync_ids[64];
    unsigned int gone = 0, bad = 0;
    while (gone < pages) {
        ioservid_t which;
        int rc = xc_ioreq_wait(xch, 30000, &which);
        if (rc < 0) return report(xch, "xc_ioreq_wait");
        if (rc == 0) return fprintf(stderr, "no invalidate within 30 s\n"), 1;
        unsigned int nr_sync;
        if (xc_ioreq_fetch(xch, server, &page, sync, sync_ids, 64, &nr_sync) < 0) return report(xch, "ioreq_fetch");
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
        if (rp != page.read_pointer && xc_ioreq_ack(xch, server, rp) < 0) return report(xch, "ioreq_ack");
        for (unsigned int i = 0; i < nr_sync; i++) {
            if (sync[i].type == IOREQ_TYPE_INVALIDATE) {
                bad += unmap_one(xch, server, sync[i].data);
                gone++;
            }
            if (xc_ioreq_complete(xch, server, sync_ids[i]) < 0) return report(xch, "ioreq_complete");
        }
    }
    int rc = xc_ioreq_server_destroy(xch, server);
    printf("DONE invalidated=%u failed=%u destroy=%d\n", gone, bad, rc);
    return bad || rc;
}

#define GRANT_BFN 0x30000

static int do_grant(xc_interface *front, const char *socket, const char *backend_token, unsigned int pages)
{
    xc_interface *back = xc_interface_open(socket, backend_token);
    if (!back) return report(NULL, "backend xc_interface_open");
    static gnttab_map_grant_ref_t maps[1024];
    static gnttab_unmap_grant_ref_t unmaps[1024];
    int status = 1;
    if (pages > 1024) pages = 1024;
    for (unsigned int i = 0; i < pages; i++)
        if (xc_gnttab_grant_access(front, i, (domid_t)xc_domid(back), i, 0) < 0) {
            report(front, "grant_access");
            goto out;
        }
    memset(maps, 0, sizeof(maps));
    for (unsigned int i = 0; i < pages; i++) {
        maps[i].flags = GNTMAP_device_map | GNTMAP_request_bfn_map;
        maps[i].ref = i;
        maps[i].dom = (domid_t)xc_domid(front);
        maps[i].dev_bus_addr = (uint64_t)(GRANT_BFN + i) << 12;
    }
    if (xc_gnttab_op(back, GNTTABOP_map_grant_ref, maps, pages) < 0) {
        report(back, "map_grant_ref");
        goto out;
    }
    unsigned int mapped = 0;
    for (unsigned int i = 0; i < pages; i++)
        mapped += maps[i].status == GNTST_okay;
    printf("map_grant_ref x%u: mapped=%u first_bfn=%#llx\n", pages, mapped,
           (unsigned long long)(maps[0].dev_bus_addr >> 12));
    /* Revoking a mapped grant fails, as in Xen. */
    if (pages && xc_gnttab_end_access(front, 0) == 0) {
        fprintf(stderr, "end_access of a mapped grant succeeded\n");
        goto out;
    }
    if (pages) printf("end_access while mapped: %s\n", errno == EBUSY ? "EBUSY" : strerror(errno));
    memset(unmaps, 0, sizeof(unmaps));
    for (unsigned int i = 0; i < pages; i++)
        unmaps[i].handle = maps[i].handle;
    if (xc_gnttab_op(back, GNTTABOP_unmap_grant_ref, unmaps, pages) < 0) {
        report(back, "unmap_grant_ref");
        goto out;
    }
    unsigned int unmapped = 0;
    for (unsigned int i = 0; i < pages; i++)
        unmapped += unmaps[i].status == GNTST_okay;
    unsigned int ended = 0;
    for (unsigned int i = 0; i < pages; i++)
        ended += xc_gnttab_end_access(front, i) == 0;
    printf("unmap_grant_ref x%u: unmapped=%u ended=%u\n", pages, unmapped, ended);
    status = !(mapped == pages && unmapped == pages && ended == pages);
out:
    xc_interface_close(back);
    return status;
}

/* -- the vITS, as Linux brings it up -------------------------------------------------------- */
#define PAGE 4096u
#define QUEUE_GFN 0x100u
#define QUEUE_BYTES (16u * PAGE)
#define DEVICE_TABLE_GFN 0x110u
#define COLLECTION_TABLE_GFN 0x120u
#define PROP_GFN 0x130u
#define PEND_GFN 0x140u
#define ITT_GFN 0x180u
#define ID_BITS 14u
#define LPI_BASE (LPI_INTID_BASE + 32u)

struct its {
    xc_interface *xch;
    uint64_t cwriter;
};

static int its_wr(struct its *its, uint64_t offset, unsigned int size, uint64_t value)
{
    return xc_its_mmio_write(its->xch, XC_ITS_FRAME_ITS, 0, offset, size, value);
}

/* Put the commands at CWRITER, move it, and poll CREADR until the ITS has taken them all. */
static int its_send(struct its *its, const struct its_cmd_block *cmds, unsigned int n)
{
    for (unsigned int i = 0; i < n; i++) {
        if (xc_guest_write(its->xch, QUEUE_GFN + its->cwriter / PAGE, (uint32_t)(its->cwriter % PAGE), &cmds[i],
                           sizeof(cmds[i])) < 0)
            return -1;
        its->cwriter = (its->cwriter + ITS_CMD_SIZE) % QUEUE_BYTES;
    }
    if (its_wr(its, GITS_CWRITER, 8, its->cwriter) < 0) return -1;
    for (int tries = 0; tries < 10000; tries++) {
        uint64_t creadr;
        if (xc_its_mmio_read(its->xch, XC_ITS_FRAME_ITS, 0, GITS_CREADR, 8, &creadr) < 0) return -1;
        if (creadr == its->cwriter) return 0;
        struct timespec pause = {0, 100000};
        nanosleep(&pause, NULL);
    }
    errno = ETIMEDOUT;
    return -1;
}

static struct its_cmd_block cmd(uint64_t id, uint64_t devid, uint64_t dw1, uint64_t dw2)
{
    struct its_cmd_block c = {{id | devid << ITS_CMD_DEVID_SHIFT, dw1, dw2, 0}};
    return c;
}

static int do_its(xc_interface *xch, const char *bdf, unsigned int events, uint64_t its_base)
{
    struct its its = {xch, 0};
    uint64_t pidr2, typer;
    if (xc_its_mmio_read(xch, XC_ITS_FRAME_ITS, 0, GITS_PIDR2, 4, &pidr2) < 0
        || xc_its_mmio_read(xch, XC_ITS_FRAME_ITS, 0, GITS_TYPER, 8, &typer) < 0)
        return report(xch, "its probe");
    if ((pidr2 & 0xf0) != 0x30 || !(typer & 1)) return fprintf(stderr, "not a GICv3 ITS\n"), 1;
    if (events == 0 || events > 32) return fprintf(stderr, "EVENTS must be 1..32\n"), 1;
    int rc = its_wr(&its, GITS_BASER0, 8,
                    GITS_BASER_VALID | (uint64_t)GITS_BASER_TYPE_DEVICE << GITS_BASER_TYPE_SHIFT
                        | DEVICE_TABLE_GFN * PAGE);
    if (!rc)
        rc = its_wr(&its, GITS_BASER0 + 8, 8,
                    GITS_BASER_VALID | (uint64_t)GITS_BASER_TYPE_COLLECTION << GITS_BASER_TYPE_SHIFT
                        | COLLECTION_TABLE_GFN * PAGE);
    if (!rc) rc = its_wr(&its, GITS_CBASER, 8, GITS_CBASER_VALID | QUEUE_GFN * PAGE | (QUEUE_BYTES / PAGE - 1));
    if (!rc) rc = its_wr(&its, GITS_CWRITER, 8, 0);
    if (!rc) rc = xc_its_mmio_write(xch, XC_ITS_FRAME_REDIST, 0, GICR_PROPBASER, 8, PROP_GFN * PAGE | (ID_BITS - 1));
    if (!rc)
        rc = xc_its_mmio_write(xch, XC_ITS_FRAME_REDIST, 0, GICR_PENDBASER, 8, PEND_GFN * PAGE | GICR_PENDBASER_PTZ);
    if (!rc) rc = xc_its_mmio_write(xch, XC_ITS_FRAME_REDIST, 0, GICR_CTLR, 4, GICR_CTLR_ENABLE_LPIS);
    if (!rc) rc = its_wr(&its, GITS_CTLR, 4, GITS_CTLR_ENABLED);
    if (rc) return report(xch, "its tables");

    /* One collection on vCPU 0; the device (virtual DeviceID 0) with an ITT of 32 events. */
    struct its_cmd_block setup[] = {
        cmd(GITS_CMD_MAPC, 0, 0, 0 | (uint64_t)0 << ITS_CMD_TARGET_SHIFT | 1ull << ITS_CMD_VALID_SHIFT),
        cmd(GITS_CMD_SYNC, 0, 0, 0),
        cmd(GITS_CMD_MAPD, 0, 4, ((uint64_t)ITT_GFN * PAGE & ITS_CMD_ITT_ADDR_MASK) | 1ull << ITS_CMD_VALID_SHIFT),
    };
    if (its_send(&its, setup, 3) < 0) return report(xch, "MAPC/MAPD");
    for (unsigned int e = 0; e < events; e++) {
        struct its_cmd_block map[] = {
            cmd(GITS_CMD_MAPTI, 0, e | (uint64_t)(LPI_BASE + e) << ITS_CMD_PINTID_SHIFT, 0),
            cmd(GITS_CMD_SYNC, 0, 0, 0),
        };
        uint8_t config = LPI_XEN_PRIORITY | LPI_PROP_RES1 | LPI_PROP_ENABLED;
        uint32_t at = LPI_BASE + e - LPI_INTID_BASE;
        if (its_send(&its, map, 2) < 0 || xc_guest_write(xch, PROP_GFN + at / PAGE, at % PAGE, &config, 1) < 0)
            return report(xch, "MAPTI");
    }
    struct its_cmd_block inv[] = {cmd(GITS_CMD_INVALL, 0, 0, 0), cmd(GITS_CMD_SYNC, 0, 0, 0)};
    if (its_send(&its, inv, 2) < 0) return report(xch, "INVALL");
    printf("ITS up: %u events mapped to LPIs %u..%u\n", events, LPI_BASE, LPI_BASE + events - 1);

    unsigned int taken = 0;
    for (unsigned int e = 0; e < events; e++) {
        uint32_t event = e;
        if (xc_device_dma(xch, bdf, its_base + GITS_TRANSLATER, &event, 4, 1, NULL) < 0)
            return report(xch, "MSI write");
        unsigned int vcpu;
        uint32_t intid;
        rc = xc_lpi_wait(xch, 10000, &vcpu, &intid);
        if (rc < 0) return report(xch, "xc_lpi_wait");
        if (rc == 0) return fprintf(stderr, "no LPI for event %u within 10 s\n", e), 1;
        printf("LPI vcpu=%u intid=%u\n", vcpu, intid);
        taken += intid == LPI_BASE + e;
        if (xc_its_end(xch, vcpu, intid) < 0) return report(xch, "its_end");
    }
    printf("DONE lpis=%u of %u\n", taken, events);
    return taken != events;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKET TOKEN map [PAGES] | emulate GUEST PAGES | grant BACKEND_TOKEN PAGES"
                        " | its BDF EVENTS ITS_BASE\n", argv[0]);
        return 2;
    }
    xc_interface *xch = xc_interface_open(argv[1], argv[2]);
    if (!xch) return report(NULL, "xc_interface_open");
    printf("connected as d%d\n", xc_domid(xch));
    int status;
    if (strcmp(argv[3], "map") == 0) {
        unsigned int pages = argc > 4 ? (unsigned int)strtoul(argv[4], NULL, 0) : 64;
        status = do_map(xch, pages > MAX_PAGES ? MAX_PAGES : pages);
    } else if (strcmp(argv[3], "emulate") == 0 && argc > 5) {
        unsigned int pages = (unsigned int)strtoul(argv[5], NULL, 0);
        status = do_emulate(xch, (domid_t)strtoul(argv[4], NULL, 0), pages > MAX_PAGES ? MAX_PAGES : pages);
    } else if (strcmp(argv[3], "grant") == 0 && argc > 5) {
        status = do_grant(xch, argv[1], argv[4], (unsigned int)strtoul(argv[5], NULL, 0));
    } else if (strcmp(argv[3], "its") == 0 && argc > 6) {
        status = do_its(xch, argv[4], (unsigned int)strtoul(argv[5], NULL, 0), strtoull(argv[6], NULL, 0));
    } else {
        fprintf(stderr, "unknown mode %s (or missing arguments)\n", argv[3]);
        status = 2;
    }
    xc_interface_close(xch);
    return status;
}
