/*
 * Errno values returned (negated) by xenemu's hypercalls: Xen's, which are Linux's.
 * Loaded into cffi like the other ABI headers.
 */
#ifndef XENEMU_ABI_XEN_ERRNO_H
#define XENEMU_ABI_XEN_ERRNO_H

/* XENEMU_CDEF_BEGIN */
#define XEN_EPERM       1
#define XEN_ENOENT      2
#define XEN_ESRCH       3
#define XEN_EIO         5
#define XEN_ENXIO       6
#define XEN_E2BIG       7
#define XEN_ENOMEM      12
#define XEN_EACCES      13
#define XEN_EBUSY       16
#define XEN_EEXIST      17
#define XEN_ENODEV      19
#define XEN_EINVAL      22
#define XEN_ENOSPC      28
#define XEN_EOPNOTSUPP  95
#define XEN_EDQUOT      122
#define XEN_EMFILE      24
#define XEN_ETIMEDOUT   110
/* Wire-protocol errors (PROTOCOL.md), never returned by a hypercall itself. */
#define XEN_EPROTO      71
#define XEN_EBADMSG     74
#define XEN_EMSGSIZE    90
#define XEN_EPROTONOSUPPORT 93
/* XENEMU_CDEF_END */

#endif /* XENEMU_ABI_XEN_ERRNO_H */
