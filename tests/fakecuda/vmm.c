/* Virtual memory management, the physical side: allocations (cuMemCreate),
 * each a memfd so that an exported fd really shares it with any process
 * that imports it, and lives while any process maps it or holds a handle. */
#include "fakecuda.h"

#include <sys/stat.h>

phys_t *find_handle(CUmemGenericAllocationHandle h) {
    for (size_t i = 0; i < G.phys.n; i++) {
        phys_t *p = G.phys.v[i];
        if (p->handle == h && p->refs > 0) return p;
    }
    return NULL;
}

/* Physical memory lives while a handle or a mapping refers to it. */
void phys_maybe_free(phys_t *p) {
    if (p->refs > 0 || p->maps > 0) return;
    vec_remove(&G.phys, p);
    if (p->accounted) G.used[p->dev] -= p->size;
    close(p->fd);
    free(p);
}

static void handle_unref(phys_t *p) {
    if (--p->refs == 0) {
        live_add(L_HANDLE, -1);
        log_event("release", p->size, p->dev);
        phys_maybe_free(p);
    }
}

static phys_t *phys_new(int dev, int physdev, size_t size, int fd, unsigned types, int accounted) {
    phys_t *p = calloc(1, sizeof *p);
    if (!p || vec_push(&G.phys, p)) {
        free(p);
        return NULL;
    }
    p->handle = 0xfc00000000000000ull | ++G.next_id;
    p->dev = dev;
    p->physdev = physdev;
    p->size = size;
    p->fd = fd;
    p->types = types;
    p->accounted = accounted;
    p->refs = 1;
    live_add(L_HANDLE, 1);
    return p;
}

CUresult check_location(const CUmemLocation *l) {
    if (!l || l->type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
    return check_dev(l->id);
}

EXPORT CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop, int option) {
    ENTER(cuMemGetAllocationGranularity);
    if (!g || !prop) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        return CUDA_ERROR_INVALID_VALUE;
    if (G.no_vmm) return CUDA_ERROR_NOT_SUPPORTED;
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED) return CUDA_ERROR_INVALID_VALUE;
    CUresult r = check_location(&prop->location);
    if (r) return r;
    *g = GRAN;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
                            unsigned long long flags) {
    ENTER(cuMemCreate);
    if (!h || !prop || flags) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (G.no_vmm) return CUDA_ERROR_NOT_SUPPORTED;
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED) return CUDA_ERROR_INVALID_VALUE;
    CUresult r = check_location(&prop->location);
    if (r) return r;
    /* Only POSIX file descriptors (or nothing) can be asked for here. */
    if ((unsigned)prop->requestedHandleTypes & ~(unsigned)CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return CUDA_ERROR_NOT_SUPPORTED;
    if (size == 0 || size % GRAN) return CUDA_ERROR_INVALID_VALUE;
    int d = prop->location.id;
    lock();
    struct fc_ctx *c;
    if ((r = need_ctx(&c))) goto out;
    if (G.used[d] + size > G.mem || G.used[d] + size < size) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    /* Shared memory, named so that an importer knows what it got. */
    char name[80];
    unsigned types = (unsigned)prop->requestedHandleTypes;
    snprintf(name, sizeof name, "fakecuda-vmm:dev=%d:types=%u", G.phys_of[d], types);
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
        if (fd >= 0) close(fd);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    phys_t *p = phys_new(d, G.phys_of[d], size, fd, types, 1);
    if (!p) {
        close(fd);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    G.used[d] += size;
    log_event("create", size, d);
    *h = p->handle;
out:
    unlock();
    return r;
}

EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
    ENTER(cuMemRelease);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (!r) {
        phys_t *p = find_handle(h);
        if (p)
            handle_unref(p); /* mapped memory lives on until unmapped */
        else
            r = CUDA_ERROR_INVALID_VALUE;
    }
    unlock();
    return r;
}

EXPORT CUresult cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, int type,
                                             unsigned long long flags) {
    ENTER(cuMemExportToShareableHandle);
    if (!out || flags) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_NOT_SUPPORTED;
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    phys_t *p = find_handle(h);
    if (!p || !(p->types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)) {
        r = CUDA_ERROR_INVALID_VALUE; /* unknown, or not created exportable */
        goto out;
    }
    int fd = fcntl(p->fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    *(int *)out = fd;
    log_event("export", p->size, p->dev);
out:
    unlock();
    return r;
}

EXPORT CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *h, void *os_handle, int type) {
    ENTER(cuMemImportFromShareableHandle);
    if (!h) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_NOT_SUPPORTED;
    int fd = (int)(intptr_t)os_handle;
    char path[64], target[256];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t k = fd < 0 ? -1 : readlink(path, target, sizeof target - 1);
    if (k <= 0) return CUDA_ERROR_INVALID_VALUE;
    target[k] = 0;
    int physdev;
    unsigned types;
    struct stat st;
    if (sscanf(target, "/memfd:fakecuda-vmm:dev=%d:types=%u", &physdev, &types) != 2 || fstat(fd, &st) < 0 ||
        st.st_size <= 0)
        return CUDA_ERROR_INVALID_VALUE; /* not memory exported by this library */
    int d = -1;
    for (int i = 0; i < G.ndev; i++)
        if (G.phys_of[i] == physdev) d = i;
    if (d < 0) return CUDA_ERROR_INVALID_DEVICE; /* its device is not visible here */
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    /* The caller keeps its fd (closing it is its business): we keep a dup. */
    int mine = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    phys_t *p = mine < 0 ? NULL : phys_new(d, physdev, (size_t)st.st_size, mine, types, 0);
    if (!p) {
        if (mine >= 0) close(mine);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    log_event("import", p->size, d);
    *h = p->handle;
out:
    unlock();
    return r;
}
