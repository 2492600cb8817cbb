/*
 * GICv3 ITS as xenemu's virtual ITS presents it (draft C): register offsets and fields, the
 * command block and its fields, the LPI configuration byte and the E_ITS_* error numbers.
 * Every value is a plain literal so cffi can read this file as it is.
 */
#ifndef XENEMU_ABI_GIC_ITS_H
#define XENEMU_ABI_GIC_ITS_H

#include <stdint.h>

/* XENEMU_CDEF_BEGIN */
/* An ITS frame is 128 KiB: the control frame, then the translation frame. */
#define GITS_FRAME_SIZE         0x20000
#define GITS_CTLR               0x0000
#define GITS_IIDR               0x0004
#define GITS_TYPER              0x0008
#define GITS_CBASER             0x0080
#define GITS_CWRITER            0x0088
#define GITS_CREADR             0x0090
#define GITS_BASER0             0x0100
#define GITS_BASER7             0x0138
#define GITS_TRANSLATER         0x10040
/* The ID registers (32-bit, read-only), with KVM's values: PIDR4 says a 64 KiB frame, PIDR2's
 * ArchRev (bits 7:4) says GICv3, which Linux checks; the CIDRs are any GIC's. */
#define GITS_PIDR4              0xFFD0
#define GITS_PIDR0              0xFFE0
#define GITS_PIDR1              0xFFE4
#define GITS_PIDR2              0xFFE8
#define GITS_PIDR3              0xFFEC
#define GITS_CIDR0              0xFFF0
#define GITS_CIDR1              0xFFF4
#define GITS_CIDR2              0xFFF8
#define GITS_CIDR3              0xFFFC
#define GITS_PIDR4_VALUE        0x40
#define GITS_PIDR0_VALUE        0x92
#define GITS_PIDR1_VALUE        0xB4
#define GITS_PIDR2_VALUE        0x3B
#define GITS_PIDR3_VALUE        0x00
#define GITS_CIDR0_VALUE        0x0D
#define GITS_CIDR1_VALUE        0xF0
#define GITS_CIDR2_VALUE        0x05
#define GITS_CIDR3_VALUE        0xB1

#define GITS_CTLR_ENABLED       0x00000001
#define GITS_CTLR_QUIESCENT     0x80000000
#define GITS_IIDR_VALUE         0x5800043B

/* GITS_CBASER: Valid bit 63, physical address bits 51:12, Size (4 KiB pages - 1) bits 7:0. */
#define GITS_CBASER_VALID       0x8000000000000000
#define GITS_CBASER_ADDR_MASK   0x000FFFFFFFFFF000
#define GITS_CBASER_SIZE_MASK   0xFF
/* A CBASER write clears address bits 15:12: the queue is 64 KiB aligned (as KVM sanitises it). */
#define GITS_CBASER_ADDR_64K_MASK 0x000FFFFFFFFF0000
/* GITS_CWRITER / GITS_CREADR: the offset in the queue, bits 19:5. */
#define GITS_CMDQ_OFFSET_MASK   0xFFFE0
/* GITS_BASERn: Valid bit 63, Type bits 58:56, Entry_Size - 1 bits 52:48, address 47:12. */
#define GITS_BASER_VALID        0x8000000000000000
#define GITS_BASER_TYPE_SHIFT   56
#define GITS_BASER_TYPE_DEVICE  1
#define GITS_BASER_TYPE_COLLECTION 4
/* Read-only fields, whatever is written: Type, Entry_Size - 1 (7: 8-byte entries), Page_Size
 * bits 9:8 (2: 64 KiB); Indirect bit 62 is RAZ/WI. */
#define GITS_BASER_TYPE_MASK    0x0700000000000000
#define GITS_BASER_ESZ_SHIFT    48
#define GITS_BASER_ESZ_MASK     0x001F000000000000
#define GITS_BASER_ESZ_VALUE    7
#define GITS_BASER_PAGE_SIZE_SHIFT 8
#define GITS_BASER_PAGE_SIZE_MASK 0x300
#define GITS_BASER_PAGE_SIZE_64K 2
#define GITS_BASER_INDIRECT     0x4000000000000000

/* Redistributor frames: 128 KiB per vCPU (RD_base, then SGI_base). */
#define GICR_FRAME_SIZE         0x20000
#define GICR_CTLR               0x0000
#define GICR_IIDR               0x0004
#define GICR_TYPER              0x0008
#define GICR_PROPBASER          0x0070
#define GICR_PENDBASER          0x0078
#define GICR_PIDR2              0xFFE8
#define GICR_CTLR_ENABLE_LPIS   0x1
#define GICR_TYPER_PLPIS        0x1
#define GICR_TYPER_LAST         0x10
#define GICR_PENDBASER_PTZ      0x4000000000000000

/* Commands: 32 bytes, four little-endian doublewords; the ID is bits 7:0 of the first. */
#define ITS_CMD_SIZE            32
#define GITS_CMD_MOVI           0x01
#define GITS_CMD_INT            0x03
#define GITS_CMD_CLEAR          0x04
#define GITS_CMD_SYNC           0x05
#define GITS_CMD_MAPD           0x08
#define GITS_CMD_MAPC           0x09
#define GITS_CMD_MAPTI          0x0A
#define GITS_CMD_MAPI           0x0B
#define GITS_CMD_INV            0x0C
#define GITS_CMD_INVALL         0x0D
#define GITS_CMD_MOVALL         0x0E
#define GITS_CMD_DISCARD        0x0F

/* Field positions: doubleword, shift, and mask of the field once shifted down. */
#define ITS_CMD_ID_DW           0
#define ITS_CMD_ID_SHIFT        0
#define ITS_CMD_ID_MASK         0xFF
#define ITS_CMD_DEVID_DW        0
#define ITS_CMD_DEVID_SHIFT     32
#define ITS_CMD_DEVID_MASK      0xFFFFFFFF
#define ITS_CMD_EVENTID_DW      1
#define ITS_CMD_EVENTID_SHIFT   0
#define ITS_CMD_EVENTID_MASK    0xFFFFFFFF
#define ITS_CMD_PINTID_DW       1
#define ITS_CMD_PINTID_SHIFT    32
#define ITS_CMD_PINTID_MASK     0xFFFFFFFF
#define ITS_CMD_SIZE_DW         1
#define ITS_CMD_SIZE_SHIFT      0
#define ITS_CMD_SIZE_MASK       0x1F
#define ITS_CMD_ICID_DW         2
#define ITS_CMD_ICID_SHIFT      0
#define ITS_CMD_ICID_MASK       0xFFFF
/* ITT address bits 51:8, kept in place (the mask is of the unshifted doubleword). */
#define ITS_CMD_ITT_DW          2
#define ITS_CMD_ITT_ADDR_MASK   0x000FFFFFFFFFFF00
/* Target: with GITS_TYPER.PTA = 0, a processor number in bits 51:16. */
#define ITS_CMD_TARGET_DW       2
#define ITS_CMD_TARGET_SHIFT    16
#define ITS_CMD_TARGET_MASK     0xFFFFFFFFF
#define ITS_CMD_TARGET2_DW      3
#define ITS_CMD_VALID_DW        2
#define ITS_CMD_VALID_SHIFT     63

struct its_cmd_block {
    uint64_t raw[4];
};

/* The LPI configuration byte: priority bits 7:2, RES1 bit 1, Enable bit 0. */
#define LPI_PROP_ENABLED        0x01
#define LPI_PROP_RES1           0x02
#define LPI_PROP_PRIORITY_MASK  0xFC
#define LPI_INTID_BASE          8192
/* The priority Xen gives every physical LPI. */
#define LPI_XEN_PRIORITY        0xA0

/* Command errors (KVM's numbers), then xenemu's own names, in a range of their own. */
#define E_ITS_MOVI_UNMAPPED_INTERRUPT       0x010107
#define E_ITS_MOVI_UNMAPPED_COLLECTION      0x010109
#define E_ITS_INT_UNMAPPED_INTERRUPT        0x010307
#define E_ITS_CLEAR_UNMAPPED_INTERRUPT      0x010507
#define E_ITS_MAPD_DEVICE_OOR               0x010801
#define E_ITS_MAPD_ITTSIZE_OOR              0x010802
#define E_ITS_MAPC_PROCNUM_OOR              0x010902
#define E_ITS_MAPC_COLLECTION_OOR           0x010903
#define E_ITS_MAPTI_UNMAPPED_DEVICE         0x010A04
#define E_ITS_MAPTI_ID_OOR                  0x010A05
#define E_ITS_MAPTI_PHYSICALID_OOR          0x010A06
#define E_ITS_INV_UNMAPPED_INTERRUPT        0x010C07
#define E_ITS_INVALL_UNMAPPED_COLLECTION    0x010D09
#define E_ITS_MOVALL_PROCNUM_OOR            0x010E01
#define E_ITS_DISCARD_UNMAPPED_INTERRUPT    0x010F07
#define E_ITS_SYNC_TARGET_OOR               0x7E0501
#define E_ITS_MAPTI_ALREADY_MAPPED          0x7E0A07
#define E_ITS_UNKNOWN_COMMAND               0x7E0001
#define E_ITS_UNREADABLE                    0x7E0002
/* XENEMU_CDEF_END */

#endif /* XENEMU_ABI_GIC_ITS_H */
