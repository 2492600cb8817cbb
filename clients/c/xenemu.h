/*
 * libxenemu: a small C client for xenemu's hypercall socket, shaped like libxc.
 *
 *   xc_interface *xch = xc_interface_open("/run/xenemu/hypercall.sock", token);
 *   struct pv_iommu_op ops[2] = { ... };
 *   int rc = xc_iommu_op(xch, ops, 2);    // 0, or -errno for the whole call; ops[i].status each
 *   xc_interface_close(xch);
 *
 * It speaks PROTOCOL.md (length-prefixed msgpack frames) with its own minimal msgpack codec and
 * uses the layouts of the headers in ../../abi unchanged. Functions return 0 or a negative errno.
 */
#ifndef XENEMU_CLIENT_H
#define XENEMU_CLIENT_H

#include <stdint.h>

#include "pv_iommu.h"
#include "ioreq.h"

typedef struct xc_interface_core xc_interface;

xc_interface *xc_interface_open(const char *socket_path, const char *token);
int xc_interface_close(xc_interface *xch);
/* The domain this connection speaks for. */
int xc_domid(xc_interface *xch);
/* The last error message the daemon sent, or "". */
const char *xc_last_error(xc_interface *xch);

int xc_iommu_op(xc_interface *xch, struct pv_iommu_op *ops, unsigned int count);

int xc_ioreq_server_create(xc_interface *xch, domid_t target, ioservid_t *id);
int xc_ioreq_server_destroy(xc_interface *xch, ioservid_t id);
/* Wait for an "ioreq" event: 1 with *id set, 0 after timeout_ms, or a negative errno. */
int xc_ioreq_wait(xc_interface *xch, int timeout_ms, ioservid_t *id);
/* Copy the server's buffered page, and up to max_sync pending synchronous requests. */
int xc_ioreq_fetch(xc_interface *xch, ioservid_t id, buffered_iopage_t *page,
                   ioreq_t *sync, uint32_t *sync_ids, unsigned int max_sync, unsigned int *nr_sync);
int xc_ioreq_ack(xc_interface *xch, ioservid_t id, uint32_t read_pointer);
int xc_ioreq_complete(xc_interface *xch, ioservid_t id, uint32_t req_id);

#endif /* XENEMU_CLIENT_H */
