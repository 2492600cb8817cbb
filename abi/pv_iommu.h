/*
 * PV IOMMU hypercall ABI (draft B), as served by xenemu.
 *
 * This header is the single source of truth for the layout: C clients include it,
 * and xenemu loads it into cffi.  Keep every constant a plain integer literal and
 * every declaration on the lines between the XENEMU_CDEF markers, so that cffi's
 * parser (which has no preprocessor) can read it unchanged.
 */
#ifndef XENEMU_ABI_PV_IOMMU_H
#define XENEMU_ABI_PV_IOMMU_H

#include <stdint.h>

/* XENEMU_CDEF_BEGIN */
typedef uint16_t domid_t;
typedef uint16_t ioservid_t;

/* Reserved domain ids (Xen's). */
#define DOMID_FIRST_RESERVED 0x7FF0
#define DOMID_SELF           0x7FF0
#define DOMID_IO             0x7FF1
#define DOMID_XEN            0x7FF2
#define DOMID_COW            0x7FF3
#define DOMID_INVALID        0x7FF4
#define DOMID_IDLE           0x7FFF

/* Subop ids. */
#define IOMMUOP_query_caps            1
#define IOMMUOP_map_page              2
#define IOMMUOP_unmap_page            3
#define IOMMUOP_map_foreign_page      4
#define IOMMUOP_lookup_foreign_page   5
#define IOMMUOP_unmap_foreign_page    6

/* query_caps: flags out. */
#define IOMMU_QUERY_map_cap           0x0001
#define IOMMU_QUERY_map_all_gfns      0x0002

/* map_page / map_foreign_page / lookup_foreign_page: permission flags. */
#define IOMMU_OP_readable             0x0001
#define IOMMU_OP_writeable            0x0002
/* map_page only: take no reference (non-strict hardware domain). */
#define IOMMU_MAP_OP_no_ref_cnt       0x0004
/* map_foreign_page only: balloon-out may swap the mapping to the scratch frame. */
#define IOMMUOP_swap_mfn              0x0004

/* Reserved bits: 3-9 for the map subops, 0-9 for the unmap subops. */
#define IOMMU_OP_map_reserved_mask    0x03F8
#define IOMMU_OP_unmap_reserved_mask  0x03FF

/* Page order, bits 10-15 of flags. */
#define IOMMU_page_order_shift        10
#define IOMMU_page_order_mask         0xFC00

/* Size of one op in the hypercall buffer. */
#define PV_IOMMU_OP_SIZE              32

struct pv_iommu_op {
    uint16_t subop_id;
    uint16_t flags;
    int32_t status;

    union {
        struct {
            uint64_t bfn;
            uint64_t gfn;
        } map_page;

        struct {
            uint64_t bfn;
        } unmap_page;

        struct {
            uint64_t bfn;
            uint64_t gfn;
            uint16_t domid;
            ioservid_t ioserver;
        } map_foreign_page;

        struct {
            uint64_t bfn;
            uint64_t gfn;
            uint16_t domid;
            ioservid_t ioserver;
        } lookup_foreign_page;

        struct {
            uint64_t bfn;
            ioservid_t ioserver;
        } unmap_foreign_page;
    } u;
};
/* XENEMU_CDEF_END */

#endif /* XENEMU_ABI_PV_IOMMU_H */
