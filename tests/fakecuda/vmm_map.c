/* Virtual memory management, the address side: reservations
 * (cuMemAddressReserve), mappings of physical allocations into them, and
 * per-device access to what is mapped. */
#include "fakecuda.h"

/* Access of the shadow: the union of what the devices were granted. Copies
 * check the per-device flags in the table; this only backs that up. */
static void map_protect(map_t *m) {
    int prot = PROT_NONE;
    for (int d = 0; d < G.ndev; d++) {
        if (m->access[d] & 2) prot |= PROT_READ | PROT_WRITE;
        if (m->access[d] & 1) prot |= PROT_READ;
    }
    mprotect(shadow(m->va), m->size, prot);
}

static void map_drop_record(map_t *m) {
    mmap(shadow(m->va), m->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    vec_remove(&G.maps, m);
    m->ph->maps--;
    phys_maybe_free(m->ph);
    free(m);
}

/* Splits the mapping record containing `at` so that a record starts at `at`. */
static int map_split_at(CUdeviceptr at) {
    map_t *m = find_map(at);
    if (!m || m->va == at) return 0;
    map_t *t = malloc(sizeof *t);
    if (!t || vec_push(&G.maps, t)) {
        free(t);
        return -1;
    }
    *t = *m;
    size_t head = (size_t)(at - m->va);
    t->va = at;
    t->size = m->size - head;
    t->off = m->off + head;
    m->size = head;
    m->ph->maps++;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Physical allocations and their sharing                                    */
/* ------------------------------------------------------------------------ */

EXPORT CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t align, CUdeviceptr addr,
                                    unsigned long long flags) {
    ENTER(cuMemAddressReserve);
    if (!ptr || flags || size == 0 || size % GRAN) return CUDA_ERROR_INVALID_VALUE;
    if (align & (align - 1)) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (align < GRAN) align = GRAN;
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    uintptr_t lo = G.vmm_base, hi = G.vmm_base + G.vmm_size;
    /* The hint is used when it is aligned and free, as a hint. */
    uintptr_t cand = (addr && addr % align == 0 && addr >= lo) ? addr : round_up(lo, align);
    for (int pass = 0; pass < 2; pass++) {
        for (int moved = 1; moved && cand + size <= hi;) {
            moved = 0;
            for (size_t i = 0; i < G.resvs.n; i++) {
                resv_t *x = G.resvs.v[i];
                if (x->va < cand + size && cand < x->va + x->size) {
                    cand = round_up(x->va + x->size, align);
                    moved = 1;
                }
            }
        }
        if (cand + size <= hi && cand + size > cand) break;
        cand = round_up(lo, align); /* the hint's neighbourhood was full */
    }
    resv_t *x = NULL;
    if (cand + size > hi || cand + size <= cand || !(x = malloc(sizeof *x)) || vec_push(&G.resvs, x)) {
        free(x);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    x->va = cand;
    x->size = size;
    *ptr = cand;
out:
    unlock();
    return r;
}

/* The whole reservation, with nothing mapped in it any more. */
EXPORT CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    ENTER(cuMemAddressFree);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    r = CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < G.resvs.n; i++) {
        resv_t *x = G.resvs.v[i];
        if (x->va != ptr || x->size != size) continue;
        for (size_t j = 0; j < G.maps.n; j++) {
            map_t *m = G.maps.v[j];
            if (m->va >= ptr && m->va < ptr + size) goto out; /* still mapped */
        }
        vec_del(&G.resvs, i);
        free(x);
        r = CUDA_SUCCESS;
        break;
    }
out:
    unlock();
    return r;
}

static resv_t *find_resv(CUdeviceptr p, size_t n) {
    for (size_t i = 0; i < G.resvs.n; i++) {
        resv_t *x = G.resvs.v[i];
        if (p >= x->va && p + n <= x->va + x->size && p + n > p) return x;
    }
    return NULL;
}

EXPORT CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                         unsigned long long flags) {
    ENTER(cuMemMap);
    if (flags || size == 0 || size % GRAN || offset % GRAN || ptr % GRAN) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    phys_t *p = find_handle(h);
    if (!p || offset >= p->size || size > p->size - offset || !find_resv(ptr, size)) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    for (size_t i = 0; i < G.maps.n; i++) {
        map_t *m = G.maps.v[i];
        if (m->va < ptr + size && ptr < m->va + m->size) {
            r = CUDA_ERROR_ALREADY_MAPPED;
            goto out;
        }
    }
    map_t *m = calloc(1, sizeof *m);
    if (!m || vec_push(&G.maps, m)) {
        free(m);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    /* The memory goes into the shadow; no access until cuMemSetAccess. */
    if (mmap(shadow(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, p->fd, (off_t)offset) == MAP_FAILED) {
        vec_remove(&G.maps, m);
        free(m);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    m->va = ptr;
    m->size = size;
    m->ph = p;
    m->off = offset;
    m->map_id = ++G.next_id;
    p->maps++;
    live_add(L_MAP, 1);
    log_event("map", size, p->dev);
out:
    unlock();
    return r;
}

/* Whole mappings only (every cuMemMap'ed range the span touches must lie
 * inside it), and no holes. */
EXPORT CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    ENTER(cuMemUnmap);
    if (size == 0 || size % GRAN || ptr % GRAN || ptr + size < ptr) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    r = CUDA_ERROR_INVALID_VALUE;
    for (CUdeviceptr at = ptr; at < ptr + size;) {
        map_t *m = find_map(at);
        if (!m) goto out;
        at = m->va + m->size;
    }
    for (size_t i = 0; i < G.maps.n; i++) {
        map_t *m = G.maps.v[i];
        int touched = 0, outside = 0;
        for (size_t j = 0; j < G.maps.n; j++) {
            map_t *x = G.maps.v[j];
            if (x->map_id != m->map_id) continue;
            if (x->va < ptr + size && ptr < x->va + x->size) touched = 1;
            if (x->va < ptr || x->va + x->size > ptr + size) outside = 1;
        }
        if (touched && outside) goto out;
    }
    /* Log one line per cuMemMap'ed range, then drop its records. */
    for (;;) {
        map_t *m = NULL;
        for (size_t i = 0; i < G.maps.n && !m; i++) {
            map_t *x = G.maps.v[i];
            if (x->va >= ptr && x->va < ptr + size) m = x;
        }
        if (!m) break;
        uint64_t id = m->map_id;
        size_t bytes = 0;
        int dev = m->ph->dev;
        for (size_t i = G.maps.n; i-- > 0;) {
            map_t *x = G.maps.v[i];
            if (x->map_id == id) {
                bytes += x->size;
                map_drop_record(x); /* swaps in an element already visited */
            }
        }
        live_add(L_MAP, -1);
        log_event("unmap", bytes, dev);
    }
    r = CUDA_SUCCESS;
out:
    unlock();
    return r;
}

EXPORT CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count) {
    ENTER(cuMemSetAccess);
    if (!desc || count == 0 || size == 0 || size % GRAN || ptr % GRAN || ptr + size < ptr)
        return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    for (size_t i = 0; i < count; i++) {
        CUresult r = check_location(&desc[i].location);
        if (r) return r;
        int f = desc[i].flags;
        if (f != CU_MEM_ACCESS_FLAGS_PROT_NONE && f != CU_MEM_ACCESS_FLAGS_PROT_READ &&
            f != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            return CUDA_ERROR_INVALID_VALUE;
    }
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    r = CUDA_ERROR_INVALID_VALUE;
    for (CUdeviceptr at = ptr; at < ptr + size;) { /* all of it mapped */
        map_t *m = find_map(at);
        if (!m) goto out;
        at = m->va + m->size;
    }
    /* Part of a mapping: split its record so that access is per record. */
    if (map_split_at(ptr) || map_split_at(ptr + size)) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    for (size_t i = 0; i < G.maps.n; i++) {
        map_t *m = G.maps.v[i];
        if (m->va < ptr || m->va >= ptr + size) continue;
        for (size_t k = 0; k < count; k++) m->access[desc[k].location.id] = (unsigned char)desc[k].flags;
        map_protect(m);
    }
    r = CUDA_SUCCESS;
out:
    unlock();
    return r;
}

