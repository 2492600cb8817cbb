/*
 * IOREQ layouts (Xen's public/hvm/ioreq.h): what xenemu sends to emulators.
 *
 * A buffered ring is one 4 KiB page: two 32-bit pointers, then 511 8-byte slots.  A 64-bit
 * value takes two consecutive slots, low half first.  Synchronous requests are ioreq_t.
 */
#ifndef XENEMU_ABI_IOREQ_H
#define XENEMU_ABI_IOREQ_H

#include <stdint.h>

/* XENEMU_CDEF_BEGIN */
#define IOREQ_READ      1
#define IOREQ_WRITE     0

#define STATE_IOREQ_NONE        0
#define STATE_IOREQ_READY       1
#define STATE_IOREQ_INPROCESS   2
#define STATE_IORESP_READY      3

#define IOREQ_TYPE_PIO          0
#define IOREQ_TYPE_COPY         1
#define IOREQ_TYPE_PCI_CONFIG   2
#define IOREQ_TYPE_TIMEOFFSET   7
#define IOREQ_TYPE_INVALIDATE   8

#define IOREQ_BUFFER_SLOT_NUM   511

/* buf_ioreq size field: 0 => 1 byte, 1 => 2, 2 => 4, 3 => 8 (two slots). */
#define BUF_IOREQ_SIZE_4        2
#define BUF_IOREQ_SIZE_8        3

struct ioreq {
    uint64_t addr;
    uint64_t data;
    uint32_t count;
    uint32_t size;
    uint32_t vp_eport;
    uint16_t _pad0;
    uint8_t state:4;
    uint8_t data_is_ptr:1;
    uint8_t dir:1;
    uint8_t df:1;
    uint8_t _pad1:1;
    uint8_t type;
};
typedef struct ioreq ioreq_t;

struct buf_ioreq {
    uint8_t  type;
    uint8_t  pad:1;
    uint8_t  dir:1;
    uint8_t  size:2;
    uint32_t addr:20;
    uint32_t data;
};
typedef struct buf_ioreq buf_ioreq_t;

struct buffered_iopage {
    uint32_t read_pointer;
    uint32_t write_pointer;
    buf_ioreq_t buf_ioreq[511];
};
typedef struct buffered_iopage buffered_iopage_t;
/* XENEMU_CDEF_END */

#endif /* XENEMU_ABI_IOREQ_H */
