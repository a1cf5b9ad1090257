/* The device address space, cuMemAlloc memory, and the copies that reach
 * it: device memory is PROT_NONE at the addresses handed out, its bytes live
 * in a shadow mapping that only these functions touch. */
#include "fakecuda.h"

#include <sys/uio.h>

static uintptr_t arena_base(int dev) { return G.va_base + (uintptr_t)dev * G.arena_size; }

static void *map_region(size_t size) {
    /* size + GRAN, then aligned up to GRAN; the slack stays reserved. */
    void *p = mmap(NULL, size + GRAN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return NULL;
    return (void *)round_up((uintptr_t)p, GRAN);
}

int new_arena_fd(int dev) {
    char name[64];
    snprintf(name, sizeof name, "fakecuda-arena-dev%d", dev);
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0) return -1;
    if (ftruncate(fd, (off_t)G.arena_size) < 0 ||
        mmap((void *)(G.shadow_base + (uintptr_t)dev * G.arena_size), G.arena_size, PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reserves the device address range and its shadow (first cuInit):
 *   [va_base, +ndev*arena_size)  cuMemAlloc arenas, one per device
 *   [vmm_base, +vmm_size)         cuMemAddressReserve space
 * Both PROT_NONE and MAP_NORESERVE: they cost no memory until used. */
CUresult setup_va(void) {
    if (G.va_ready) return CUDA_SUCCESS;
    G.arena_size = round_up(2 * G.mem, GRAN);
    G.vmm_size = round_up(4 * (size_t)G.ndev * G.mem, GRAN);
    if (G.vmm_size < ((size_t)1 << 30)) G.vmm_size = (size_t)1 << 30;
    size_t total = (size_t)G.ndev * G.arena_size + G.vmm_size;
    void *va = map_region(total);
    void *sh = map_region(total);
    if (!va || !sh) {
        warn("cannot reserve %zu MiB of address space for the device range", total >> 20);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    G.va_base = (uintptr_t)va;
    G.shadow_base = (uintptr_t)sh;
    G.vmm_base = G.va_base + (uintptr_t)G.ndev * G.arena_size;
    for (int d = 0; d < G.ndev; d++) {
        G.arena_fd[d] = new_arena_fd(d);
        if (G.arena_fd[d] < 0) {
            warn("cannot create the memory of device %d: %s", d, strerror(errno));
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    G.va_ready = 1;
    return CUDA_SUCCESS;
}

static int in_arena(CUdeviceptr p, int *dev) {
    if (!G.va_ready || p < G.va_base || p >= G.vmm_base) return 0;
    *dev = (int)((p - G.va_base) / G.arena_size);
    return 1;
}

static int in_vmm(CUdeviceptr p) {
    return G.va_ready && p >= G.vmm_base && p < G.vmm_base + G.vmm_size;
}

static alloc_t *find_alloc(CUdeviceptr p) {
    for (size_t i = 0; i < G.allocs.n; i++) {
        alloc_t *a = G.allocs.v[i];
        if (p >= a->ptr && p < a->ptr + a->size) return a;
    }
    return NULL;
}

map_t *find_map(CUdeviceptr p) {
    for (size_t i = 0; i < G.maps.n; i++) {
        map_t *m = G.maps.v[i];
        if (p >= m->va && p < m->va + m->size) return m;
    }
    return NULL;
}

/* Is [p, p+n) device memory that device `dev` may access with `need`
 * (0: exists, 1: read, 3: read and write)? CUDA_SUCCESS; or
 * CUDA_ERROR_INVALID_VALUE: not inside one allocation / not all mapped;
 * CUDA_ERROR_ILLEGAL_ADDRESS: mapped without that access for `dev`. */
CUresult dev_range(CUdeviceptr p, size_t n, int dev, int need) {
    if (n == 0 || p + n < p) return CUDA_ERROR_INVALID_VALUE;
    int d;
    if (in_arena(p, &d)) {
        alloc_t *a = find_alloc(p);
        return (a && p + n <= a->ptr + a->size) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    }
    if (!in_vmm(p)) return CUDA_ERROR_INVALID_VALUE;
    CUresult r = CUDA_SUCCESS;
    for (CUdeviceptr at = p; at < p + n;) {
        map_t *m = find_map(at);
        if (!m) return CUDA_ERROR_INVALID_VALUE;
        if ((m->access[dev] & need) != need) r = CUDA_ERROR_ILLEGAL_ADDRESS;
        at = m->va + m->size;
    }
    return r;
}

/* ------------------------------------------------------------------------ */
/* Safe host copies                                                          */
/* ------------------------------------------------------------------------ */

static atomic_int g_no_vm_readv;

/* Copies n bytes within this process; returns 0, or -1 when either side is
 * not (fully) mapped with the needed access. process_vm_readv() on our own
 * pid reports EFAULT instead of raising SIGSEGV. Where the kernel refuses it
 * (seccomp), falls back to memcpy and says so once. */
int safe_copy(void *dst, const void *src, size_t n) {
    char *d = dst;
    const char *s = src;
    while (n > 0 && !atomic_load(&g_no_vm_readv)) {
        struct iovec l = {d, n}, r = {(void *)s, n};
        ssize_t k = process_vm_readv(getpid(), &l, 1, &r, 1, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == ENOSYS || errno == EPERM) {
                if (!atomic_exchange(&g_no_vm_readv, 1))
                    warn("process_vm_readv unavailable (%s): copies use memcpy and may crash on bad pointers",
                         strerror(errno));
                break;
            }
            return -1;
        }
        if (k == 0) return -1;
        d += k;
        s += k;
        n -= (size_t)k;
    }
    if (n > 0) memcpy(d, s, n);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* cuMemAlloc memory                                                         */
/* ------------------------------------------------------------------------ */

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) {
    ENTER(cuMemAlloc);
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    if (size == 0) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    int d = c->dev;
    size_t span = round_up(size, G.page);
    if (span < size || G.used[d] + span > G.mem) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    /* First fit in the device's arena, page-aligned (>= 512 bytes). */
    uintptr_t lo = arena_base(d), hi = lo + G.arena_size, cand = lo;
    for (int moved = 1; moved;) {
        moved = 0;
        for (size_t i = 0; i < G.allocs.n; i++) {
            alloc_t *a = G.allocs.v[i];
            if (a->dev == d && a->ptr < cand + span && cand < a->ptr + a->span) {
                cand = a->ptr + a->span;
                moved = 1;
            }
        }
    }
    alloc_t *a = NULL;
    if (cand + span > hi || !(a = malloc(sizeof *a)) || vec_push(&G.allocs, a)) {
        free(a);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    a->ptr = cand;
    a->size = size;
    a->span = span;
    a->dev = d;
    a->ctx = c;
    G.used[d] += span;
    live_add(L_ALLOC, 1);
    log_event("alloc", size, d);
    *dptr = cand;
out:
    unlock();
    return r;
}

/* Gives the pages back. A copy still queued for it will find it gone. */
void alloc_release(alloc_t *a) {
    vec_remove(&G.allocs, a);
    fallocate(G.arena_fd[a->dev], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              (off_t)(a->ptr - arena_base(a->dev)), (off_t)a->span);
    G.used[a->dev] -= a->span;
    live_add(L_ALLOC, -1);
    log_event("free", a->size, a->dev);
    free(a);
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    ENTER(cuMemFree);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (!r) {
        alloc_t *a = find_alloc(p);
        if (a && a->ptr == p)
            alloc_release(a);
        else
            r = CUDA_ERROR_INVALID_VALUE;
    }
    unlock();
    return r;
}

/* Synchronous, and reads what the device memory holds now: it does not wait
 * for copies still queued on any stream. */
EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    ENTER(cuMemcpyDtoH);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r || n == 0) goto out;
    if (!dst) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    if ((r = dev_range(src, n, c->dev, CU_MEM_ACCESS_FLAGS_PROT_READ))) goto out;
    if (safe_copy(dst, shadow(src), n)) r = CUDA_ERROR_INVALID_VALUE;
out:
    unlock();
    return r;
}
