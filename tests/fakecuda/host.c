/* Host memory the device reads: registrations (cuMemHostRegister) and
 * pinned allocations (cuMemHostAlloc), both "regions" of whole pages. */
#include "fakecuda.h"

region_t *find_region_covering(uintptr_t p, size_t n) {
    for (size_t i = 0; i < G.regions.n; i++) {
        region_t *r = G.regions.v[i];
        if (p >= r->start && p + n <= r->end) return r;
    }
    return NULL;
}

region_t *find_region_id(uint64_t id) {
    for (size_t i = 0; i < G.regions.n; i++) {
        region_t *r = G.regions.v[i];
        if (r->id == id) return r;
    }
    return NULL;
}

/* Is every page of [a, b) mapped, readable, and writable if need_write?
 * Read from /proc/self/maps (sorted by address). */
static int host_pages_ok(uintptr_t a, uintptr_t b, int need_write) {
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) break;
        if (cap - len < 4096) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
        }
        ssize_t k = read(fd, buf + len, cap - len - 1);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        len += (size_t)k;
    }
    close(fd);
    if (!buf) return 0;
    buf[len] = 0;
    uintptr_t at = a;
    int ok = 0;
    for (char *line = buf; line && *line && !ok;) {
        char *nl = strchr(line, '\n');
        unsigned long s, e;
        char perms[5] = "";
        if (sscanf(line, "%lx-%lx %4s", &s, &e, perms) == 3 && e > at) {
            if (s > at) break; /* a hole */
            if (perms[0] != 'r' || (need_write && perms[1] != 'w')) break;
            at = e;
            if (at >= b) ok = 1;
        }
        line = nl ? nl + 1 : NULL;
    }
    free(buf);
    return ok;
}

void region_drop(region_t *r) {
    vec_remove(&G.regions, r);
    if (r->pinned) {
        log_event("host_free", r->size, -1);
        live_add(L_PINNED, -1);
        munmap(r->p, r->end - r->start);
    } else {
        log_event("unregister", r->size, -1);
        live_add(L_REG, -1);
    }
    free(r);
}

EXPORT CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned flags) {
    ENTER(cuMemHostRegister);
    NEED_INIT();
    if (!p || size == 0 || (flags & ~0xfu)) return CUDA_ERROR_INVALID_VALUE;
    if (flags & CU_MEMHOSTREGISTER_IOMEMORY) return CUDA_ERROR_NOT_SUPPORTED;
    if ((flags & CU_MEMHOSTREGISTER_READ_ONLY) && G.no_ro_register) return CUDA_ERROR_NOT_SUPPORTED;
    uintptr_t start = (uintptr_t)p / G.page * G.page;
    uintptr_t end = round_up((uintptr_t)p + size, G.page);
    if (end < (uintptr_t)p) return CUDA_ERROR_INVALID_VALUE;
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    /* Pages are locked whole: sharing a page with a registration or a
     * pinned buffer is "already registered". */
    for (size_t i = 0; i < G.regions.n; i++) {
        region_t *x = G.regions.v[i];
        if (x->start < end && start < x->end) {
            r = CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
            goto out;
        }
    }
    /* Every page must be mapped; without READ_ONLY it is pinned for the
     * device to write, so it must be writable too. */
    if (!host_pages_ok(start, end, !(flags & CU_MEMHOSTREGISTER_READ_ONLY))) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    region_t *x = calloc(1, sizeof *x);
    if (!x || vec_push(&G.regions, x)) {
        free(x);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    x->id = ++G.next_id;
    x->start = start;
    x->end = end;
    x->p = p;
    x->size = size;
    x->flags = flags;
    x->ctx = c;
    live_add(L_REG, 1);
    log_event("register", size, -1);
out:
    unlock();
    return r;
}
EXPORT CUresult cuMemHostUnregister(void *p) {
    ENTER(cuMemHostUnregister);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    r = CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    for (size_t i = 0; i < G.regions.n; i++) {
        region_t *x = G.regions.v[i];
        if (!x->pinned && x->p == p) {
            /* A copy still queued from it will find it gone. */
            region_drop(x);
            r = CUDA_SUCCESS;
            break;
        }
    }
out:
    unlock();
    return r;
}

EXPORT CUresult cuMemHostAlloc(void **pp, size_t size, unsigned flags) {
    ENTER(cuMemHostAlloc);
    if (!pp || size == 0 || (flags & ~CU_MEMHOSTALLOC_ALL)) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    size_t span = round_up(size, G.page);
    void *m = span < size ? MAP_FAILED
                          : mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    region_t *x = NULL;
    if (m == MAP_FAILED || !(x = calloc(1, sizeof *x)) || vec_push(&G.regions, x)) {
        if (m != MAP_FAILED) munmap(m, span);
        free(x);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    x->id = ++G.next_id;
    x->start = (uintptr_t)m;
    x->end = (uintptr_t)m + span;
    x->p = m;
    x->size = size;
    x->flags = flags;
    x->pinned = 1;
    x->ctx = c;
    live_add(L_PINNED, 1);
    log_event("host_alloc", size, -1);
    *pp = m;
out:
    unlock();
    return r;
}

EXPORT CUresult cuMemFreeHost(void *p) {
    ENTER(cuMemFreeHost);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    r = CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < G.regions.n; i++) {
        region_t *x = G.regions.v[i];
        if (x->pinned && x->p == p) {
            region_drop(x); /* unmaps: a queued copy from it will find it gone */
            r = CUDA_SUCCESS;
            break;
        }
    }
out:
    unlock();
    return r;
}
