/*
 * The compiled fast path of do_iommu_op: map_page and unmap_page in their common case.
 *
 * It runs ops in place until it meets one it cannot finish exactly as the Python handlers
 * would (any error, a leaf not yet materialised, no_ref_cnt, a frame whose last reference
 * would go, ...) and returns that op's index: Python then runs that one op with the full
 * semantics and calls back in.  So the fast path never decides a status other than 0 and
 * never has a rule of its own; it is a shortcut through the success path of
 * xenemu/core/iommu/subops.py, and every test runs with it on and off.
 *
 * It reads the same memory the Python core owns: page-table and p2m leaves are Python
 * arrays found through a directory of their addresses, and the frame table's counts are
 * Python arrays too.  Nothing is allocated or freed here.
 */
#include <stddef.h>
#include <stdint.h>

#include "pv_iommu.h"

/* Must match xenemu/core/iommu/fastpath.py (checked when the module is loaded). */
#define FAST_KIND_DEFAULT 1
#define FAST_KIND_MAP 2
#define FAST_KIND_MAP_NOREF 3
#define FAST_LEAF_SHIFT 9
#define FAST_PERM_W 2
#define FAST_RW 3
/* Beyond this a count is left to Python, which refuses to overflow it. */
#define FAST_COUNT_LIMIT 0x7FFFFFFFu
/* Work is counted as Python counts it (subops.py): each op costs its pages plus this; an op of
 * more pages than FAST_LARGE_PAGES is preempted page by page, so it is Python's. */
#define FAST_OP_COST 1
#define FAST_LARGE_PAGES 512

/* The host's frame table, set once: its arrays never move. */
struct fast_host {
    uintptr_t owner; /* uint16_t per frame */
    uintptr_t populated; /* uint8_t per frame */
    uintptr_t count; /* uint32_t per frame */
    uintptr_t type_count; /* uint32_t per frame */
    uint64_t nr_frames;
    uint32_t largest_order;
    int64_t mapped; /* out: change in the mappings the caller holds */
    uint32_t flush; /* out: the highest flush type the ops noted */
    int64_t work_budget; /* in: work left in this slice; the loop stops once it is spent */
    int64_t work; /* out: the work the ops it completed cost */
};

/* One call's caller: its tables (whose directories may move between calls) and limits. */
struct fast_env {
    const struct fast_host *host;
    uint64_t *table_dir; /* leaf addresses by BFN >> 9, 0 while virtual */
    uint64_t table_dir_len;
    uint64_t *p2m_dir; /* int64_t leaf addresses by GFN >> 9 (HVM only), 0 = absent */
    uint64_t p2m_dir_len;
    uint64_t nr_frames;
    uint32_t domid;
    uint32_t is_hvm;
    uint32_t can_map; /* map_cap, and not a non-strict hardware domain */
    uint32_t largest_order;
    int64_t quota_left;
    int64_t mapped;
    uint32_t flush;
};

static inline uint64_t *table_slot(const struct fast_env *env, uint64_t bfn)
{
    uint64_t index = bfn >> FAST_LEAF_SHIFT;
    if (index >= env->table_dir_len)
        return NULL;
    uint64_t *leaf = (uint64_t *)(uintptr_t)env->table_dir[index];
    return leaf ? &leaf[bfn & ((1u << FAST_LEAF_SHIFT) - 1)] : NULL;
}

/* The MFN behind one of the caller's own GFNs, or -1 when Python must decide. */
static inline int64_t own_frame(const struct fast_env *env, uint64_t gfn)
{
    int64_t mfn;
    if (env->is_hvm) {
        uint64_t index = gfn >> FAST_LEAF_SHIFT;
        if (index >= env->p2m_dir_len)
            return -1;
        const int64_t *leaf = (const int64_t *)(uintptr_t)env->p2m_dir[index];
        if (!leaf)
            return -1;
        mfn = leaf[gfn & ((1u << FAST_LEAF_SHIFT) - 1)];
        if (mfn < 0 || (uint64_t)mfn >= env->nr_frames)
            return -1;
        return mfn;
    }
    if (gfn >= env->nr_frames)
        return -1;
    if (((const uint16_t *)env->host->owner)[gfn] != env->domid || !((const uint8_t *)env->host->populated)[gfn])
        return -1;
    return (int64_t)gfn;
}

static inline unsigned kind_of(uint64_t entry)
{
    return (unsigned)(entry >> 2) & 15;
}

static inline void note_flush(struct fast_env *env, uint32_t flush)
{
    if (flush > env->flush)
        env->flush = flush;
}

static int map_page(struct fast_env *env, struct pv_iommu_op *op)
{
    uint16_t flags = op->flags;
    if (!env->can_map || flags & (IOMMU_OP_map_reserved_mask | IOMMU_MAP_OP_no_ref_cnt) || !(flags & FAST_RW))
        return 0;
    unsigned order = flags >> IOMMU_page_order_shift;
    if (order > env->largest_order)
        return 0;
    uint64_t n = 1ull << order;
    uint64_t bfn = op->u.map_page.bfn, gfn = op->u.map_page.gfn;
    if ((bfn | gfn) & (n - 1) || (int64_t)n > env->quota_left)
        return 0;
    uint32_t *count = (uint32_t *)env->host->count, *type_count = (uint32_t *)env->host->type_count;
    for (uint64_t i = 0; i < n; i++) {
        int64_t mfn = own_frame(env, gfn + i);
        if (mfn < 0 || count[mfn] == 0 || count[mfn] >= FAST_COUNT_LIMIT || type_count[mfn] >= FAST_COUNT_LIMIT)
            return 0;
        uint64_t *slot = table_slot(env, bfn + i);
        if (!slot || (*slot && kind_of(*slot) != FAST_KIND_DEFAULT))
            return 0; /* virtual leaf, RMRR, doorbell or an existing mapping */
    }
    unsigned perms = flags & FAST_RW;
    uint64_t kind_bits = (uint64_t)FAST_KIND_MAP << 2 | perms;
    int replaced = 0;
    for (uint64_t i = 0; i < n; i++) {
        int64_t mfn = own_frame(env, gfn + i);
        uint64_t *slot = table_slot(env, bfn + i);
        replaced |= *slot != 0;
        count[mfn]++;
        if (perms & FAST_PERM_W)
            type_count[mfn]++;
        *slot = (uint64_t)mfn << 8 | kind_bits;
    }
    env->quota_left -= (int64_t)n;
    env->mapped += (int64_t)n;
    note_flush(env, replaced ? 2 : 1);
    return 1;
}

static int unmap_page(struct fast_env *env, struct pv_iommu_op *op)
{
    uint16_t flags = op->flags;
    if (flags & IOMMU_OP_unmap_reserved_mask)
        return 0;
    unsigned order = flags >> IOMMU_page_order_shift;
    if (order > env->largest_order)
        return 0;
    uint64_t n = 1ull << order;
    uint64_t bfn = op->u.unmap_page.bfn;
    if (bfn & (n - 1))
        return 0;
    uint32_t *count = (uint32_t *)env->host->count, *type_count = (uint32_t *)env->host->type_count;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t *slot = table_slot(env, bfn + i);
        if (!slot || !*slot)
            return 0;
        uint64_t entry = *slot;
        unsigned kind = kind_of(entry);
        if (kind == FAST_KIND_MAP) {
            uint64_t mfn = entry >> 8;
            /* Several pages of one op may hold one frame: leave any last reference to Python. */
            if (mfn >= env->nr_frames || count[mfn] <= n || (entry & FAST_PERM_W && type_count[mfn] < n))
                return 0;
        } else if (kind != FAST_KIND_MAP_NOREF && kind != FAST_KIND_DEFAULT) {
            return 0;
        }
    }
    int64_t removed = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t *slot = table_slot(env, bfn + i);
        uint64_t entry = *slot;
        unsigned kind = kind_of(entry);
        if (kind == FAST_KIND_MAP) {
            uint64_t mfn = entry >> 8;
            count[mfn]--;
            if (entry & FAST_PERM_W)
                type_count[mfn]--;
        }
        if (kind != FAST_KIND_DEFAULT)
            removed++;
        *slot = 0;
    }
    env->quota_left += removed;
    env->mapped -= removed;
    note_flush(env, 2);
    return 1;
}

size_t fast_iommu_run(struct fast_host *host, unsigned char *buf, size_t start, size_t stop, uintptr_t table_dir,
                      uint64_t table_dir_len, uintptr_t p2m_dir, uint64_t p2m_dir_len, uint32_t domid,
                      uint32_t is_hvm, uint32_t can_map, int64_t quota_left)
{
    struct fast_env env = {
        .host = host,
        .table_dir = (uint64_t *)table_dir,
        .table_dir_len = table_dir_len,
        .p2m_dir = (uint64_t *)p2m_dir,
        .p2m_dir_len = p2m_dir_len,
        .nr_frames = host->nr_frames,
        .domid = domid,
        .is_hvm = is_hvm,
        .can_map = can_map,
        .largest_order = host->largest_order,
        .quota_left = quota_left,
    };
    struct pv_iommu_op *ops = (struct pv_iommu_op *)buf;
    int64_t work = 0;
    size_t i;
    for (i = start; i < stop; i++) {
        struct pv_iommu_op *op = &ops[i];
        unsigned order = op->flags >> IOMMU_page_order_shift;
        uint64_t pages = order <= env.largest_order ? 1ull << order : 0;
        if (pages > FAST_LARGE_PAGES)
            break;
        int done;
        switch (op->subop_id) {
        case IOMMUOP_map_page:
            done = map_page(&env, op);
            break;
        case IOMMUOP_unmap_page:
            done = unmap_page(&env, op);
            break;
        default:
            done = 0;
        }
        if (!done)
            break;
        op->status = 0;
        work += FAST_OP_COST + (int64_t)pages;
        if (work >= host->work_budget) {
            i++;
            break;
        }
    }
    host->mapped = env.mapped;
    host->flush = env.flush;
    host->work = work;
    return i;
}
