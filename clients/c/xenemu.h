/*
 * libxenemu: a C client for xenemu's hypercall socket, shaped like libxc.
 *
 *   #include <xenemu/xenemu.h>          // cc prog.c $(pkg-config --cflags --libs xenemu)
 *
 *   xc_interface *xch = xc_interface_open("/run/xenemu/hypercall.sock", token);
 *   if (!xch) { perror(xc_get_last_error(NULL)->message); ... }
 *   struct pv_iommu_op ops[2] = { ... };
 *   if (xc_iommu_op(xch, ops, 2) < 0)      // -1 and errno for the call; ops[i].status each
 *       fprintf(stderr, "%s\n", xc_get_last_error(xch)->message);
 *   xc_interface_close(xch);
 *
 * Errors are libxc's: a function returns -1 (or NULL) and sets errno, and
 * xc_get_last_error() holds the detail (the request, the errno's name, the daemon's message).
 * The library never prints, never raises SIGPIPE (a daemon that went away is -1 with EPIPE or
 * ECONNRESET), and keeps its socket close-on-exec. A handle is for one thread at a time; open
 * one per thread. State lives in the daemon only while it runs: after a daemon restart, domains,
 * tokens and mappings are gone and a new handle needs a new token.
 *
 * It speaks PROTOCOL.md (length-prefixed msgpack frames) with its own minimal msgpack codec and
 * uses the layouts of the ABI headers unchanged.
 */
#ifndef XENEMU_CLIENT_H
#define XENEMU_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "pv_iommu.h"
#include "ioreq.h"
#include "grant_table.h"
#include "gic_its.h"

#ifdef __cplusplus
extern "C" {
#endif

#define XENEMU_LIB_VERSION "0.2.0"

typedef struct xc_interface_core xc_interface;

/* -- Errors, as libxc reports them ------------------------------------------------------- */
enum xc_error_code {
    XC_ERROR_NONE = 0,
    XC_INTERNAL_ERROR = 1,   /* the daemon refused, or the connection failed */
    XC_INVALID_KERNEL = 2,   /* (libxc's; unused) */
    XC_INVALID_PARAM = 3,    /* EINVAL, E2BIG, ENAMETOOLONG, ... */
    XC_OUT_OF_MEMORY = 4,    /* ENOMEM, here or in the daemon */
};

#define XC_MAX_ERROR_MSG_LEN 1024
typedef struct xc_error {
    enum xc_error_code code;
    char message[XC_MAX_ERROR_MSG_LEN];  /* "iommu_op: EINVAL: the daemon's message" */
    int errnum;                          /* the errno the failing call set (xenemu's addition) */
} xc_error;

/* The last error on this handle; with a NULL handle, this thread's last failed
 * xc_interface_open(). Never NULL; code XC_ERROR_NONE and "" when there was none. */
const xc_error *xc_get_last_error(xc_interface *xch);
void xc_clear_last_error(xc_interface *xch);
const char *xc_error_code_to_desc(int code);
/* The message of xc_get_last_error(xch) (kept from libxenemu 0.1). */
const char *xc_last_error(xc_interface *xch);

/* -- The handle ---------------------------------------------------------------------------- */
/* Connect and say hello with the domain's token: NULL and errno on failure (EACCES for a token
 * that names no live domain). */
xc_interface *xc_interface_open(const char *socket_path, const char *token);
int xc_interface_close(xc_interface *xch);
/* The domain this connection speaks for. */
int xc_domid(xc_interface *xch);
/* The socket, for poll(): readable when an event (or a reply) waits. Do not read from it. */
int xc_fd(xc_interface *xch);

/* -- PV IOMMU ------------------------------------------------------------------------------ */
/* do_iommu_op: 0 when every op ran (each op's status says how it went), or -1 and errno for
 * the call as a whole (EINVAL, E2BIG, ESRCH). */
int xc_iommu_op(xc_interface *xch, struct pv_iommu_op *ops, unsigned int count);

/* -- IOREQ servers: an emulator's ring of invalidates ------------------------------------- */
int xc_ioreq_server_create(xc_interface *xch, domid_t target, ioservid_t *id);
int xc_ioreq_server_destroy(xc_interface *xch, ioservid_t id);
/* Wait for an "ioreq" kick: 1 with *id set, 0 after timeout_ms (-1: forever), or -1 and errno. */
int xc_ioreq_wait(xc_interface *xch, int timeout_ms, ioservid_t *id);
/* Copy the server's buffered page, and up to max_sync pending synchronous requests. */
int xc_ioreq_fetch(xc_interface *xch, ioservid_t id, buffered_iopage_t *page,
                   ioreq_t *sync, uint32_t *sync_ids, unsigned int max_sync, unsigned int *nr_sync);
int xc_ioreq_ack(xc_interface *xch, ioservid_t id, uint32_t read_pointer);
int xc_ioreq_complete(xc_interface *xch, ioservid_t id, uint32_t req_id);

/* -- Ballooning (XENMEM_decrease_reservation, XENMEM_populate_physmap) -------------------- */
/* Give back (or take) the nr GFNs listed: the number done, which is nr unless the call stopped
 * early (then errno says why, and xc_get_last_error() too), or -1 and errno for the call.
 * Frames an emulator maps are announced to it first (IOREQ_TYPE_INVALIDATE); the call waits for
 * the synchronous ones. A PV guest's populate_physmap writes its new frames into gfns. */
long xc_domain_decrease_reservation(xc_interface *xch, unsigned long nr, const uint64_t *gfns);
long xc_domain_populate_physmap(xc_interface *xch, unsigned long nr, uint64_t *gfns);

/* -- Grant tables -------------------------------------------------------------------------- */
/* Entry ref of this domain's table lets domid map its gfn (read-only if readonly). */
int xc_gnttab_grant_access(xc_interface *xch, grant_ref_t ref, domid_t domid, uint64_t gfn, int readonly);
/* Revoke entry ref: -1 and EBUSY while it is mapped. */
int xc_gnttab_end_access(xc_interface *xch, grant_ref_t ref);
/* HYPERVISOR_grant_table_op: cmd GNTTABOP_map_grant_ref (uops: gnttab_map_grant_ref_t[count])
 * or GNTTABOP_unmap_grant_ref (gnttab_unmap_grant_ref_t[count]). 0 when every op ran (each
 * has its status, GNTST_*), or -1 and errno. */
int xc_gnttab_op(xc_interface *xch, unsigned int cmd, void *uops, unsigned int count);

/* -- Guest memory and devices -------------------------------------------------------------- */
/* The domain's CPU writes/reads len bytes at offset of its page gfn (within one page). */
int xc_guest_write(xc_interface *xch, uint64_t gfn, uint32_t offset, const void *data, size_t len);
int xc_guest_read(xc_interface *xch, uint64_t gfn, uint32_t offset, void *data, size_t len);
/* A DMA of len bytes (at most 1 MiB) at bus address addr by the domain's device bdf: a write
 * of data if write, else a read into data. A DMA the IOMMU refuses is -1 with EFAULT, the
 * faulting BFN in *fault_bfn (if not NULL) and the reason in xc_get_last_error(). */
int xc_device_dma(xc_interface *xch, const char *bdf, uint64_t addr, void *data, size_t len, int write,
                  uint64_t *fault_bfn);

/* -- The virtual GICv3 ITS ----------------------------------------------------------------- */
enum xc_its_frame { XC_ITS_FRAME_ITS = 0, XC_ITS_FRAME_REDIST = 1 };
/* A trapped access to the vITS of pITS index (XC_ITS_FRAME_ITS) or to the redistributor of
 * vCPU index (XC_ITS_FRAME_REDIST), at offset inside the frame, size 1, 2, 4 or 8 bytes. */
int xc_its_mmio_read(xc_interface *xch, enum xc_its_frame frame, unsigned int index, uint64_t offset,
                     unsigned int size, uint64_t *value);
int xc_its_mmio_write(xc_interface *xch, enum xc_its_frame frame, unsigned int index, uint64_t offset,
                      unsigned int size, uint64_t value);
/* Wait for an LPI: 1 with *vcpu and *intid set, 0 after timeout_ms (-1: forever), or -1. It is
 * not delivered again until xc_its_end(). */
int xc_lpi_wait(xc_interface *xch, int timeout_ms, unsigned int *vcpu, uint32_t *intid);
int xc_its_end(xc_interface *xch, unsigned int vcpu, uint32_t intid);

#ifdef __cplusplus
}
#endif

#endif /* XENEMU_CLIENT_H */
