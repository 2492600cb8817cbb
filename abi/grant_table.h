/*
 * Grant tables (Xen's public/grant_table.h, v1 entries), with draft B's change: a device map
 * may ask for a caller-chosen bus address (GNTMAP_request_bfn_map; dev_bus_addr is then IN).
 */
#ifndef XENEMU_ABI_GRANT_TABLE_H
#define XENEMU_ABI_GRANT_TABLE_H

#include <stdint.h>

/* XENEMU_CDEF_BEGIN */
typedef uint32_t grant_ref_t;
typedef uint32_t grant_handle_t;

/* A v1 grant entry, written by the granting domain. */
struct grant_entry_v1 {
    uint16_t flags;
    uint16_t domid;
    uint32_t frame;
};
typedef struct grant_entry_v1 grant_entry_v1_t;

#define GTF_invalid             0x0000
#define GTF_permit_access       0x0001
#define GTF_type_mask           0x0003
#define GTF_readonly            0x0004
#define GTF_reading             0x0008
#define GTF_writing             0x0010

#define GNTMAP_device_map       0x0001
#define GNTMAP_host_map         0x0002
#define GNTMAP_readonly         0x0004
#define GNTMAP_application_map  0x0008
#define GNTMAP_contains_pte     0x0010
#define GNTMAP_request_bfn_map  0x0040

#define GNTTABOP_map_grant_ref    0
#define GNTTABOP_unmap_grant_ref  1

struct gnttab_map_grant_ref {
    /* IN */
    uint64_t host_addr;
    uint32_t flags;
    grant_ref_t ref;
    uint16_t dom;
    /* OUT */
    int16_t status;
    grant_handle_t handle;
    /* IN/OUT: IN (a BFN << 12) with GNTMAP_request_bfn_map, else OUT */
    uint64_t dev_bus_addr;
};
typedef struct gnttab_map_grant_ref gnttab_map_grant_ref_t;

struct gnttab_unmap_grant_ref {
    /* IN */
    uint64_t host_addr;
    uint64_t dev_bus_addr;
    grant_handle_t handle;
    /* OUT */
    int16_t status;
};
typedef struct gnttab_unmap_grant_ref gnttab_unmap_grant_ref_t;

#define GNTST_okay               0
#define GNTST_general_error     -1
#define GNTST_bad_domain        -2
#define GNTST_bad_gntref        -3
#define GNTST_bad_handle        -4
#define GNTST_bad_virt_addr     -5
#define GNTST_bad_dev_addr      -6
#define GNTST_no_device_space   -7
#define GNTST_permission_denied -8
#define GNTST_bad_page          -9
#define GNTST_bad_copy_arg      -10
#define GNTST_address_too_big   -11
#define GNTST_eagain            -12
#define GNTST_no_space          -13
/* XENEMU_CDEF_END */

#endif /* XENEMU_ABI_GRANT_TABLE_H */
