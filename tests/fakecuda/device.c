/* Initialisation, devices and primary contexts. */
#include "fakecuda.h"

enum {
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1,
    CU_DEVICE_ATTRIBUTE_WARP_SIZE = 10,
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CU_DEVICE_ATTRIBUTE_INTEGRATED = 18,
    CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY = 19,
    CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33,
    CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34,
    CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT = 40,
    CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING = 41,
    CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91,
    CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED = 99,
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102,
    CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103,
    CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED = 113,
    FC_DEVICE_ATTRIBUTE_LIMIT = 200, /* above every attribute of CUDA 13.x */
};

/* Per-thread stack of current contexts. */
#define CTX_STACK 64
static __thread struct fc_ctx *tls_stack[CTX_STACK];
static __thread int tls_depth;

static struct fc_ctx *cur_ctx(void) { return tls_depth ? tls_stack[tls_depth - 1] : NULL; }

CUresult need_ctx(struct fc_ctx **out) {
    struct fc_ctx *c = cur_ctx();
    if (!c || c->refs <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    *out = c;
    return CUDA_SUCCESS;
}

static struct fc_ctx *ctx_from_handle(CUcontext h) {
    for (int i = 0; i < G.ndev; i++)
        if (h == &g_ctx[i]) return h;
    return NULL;
}

CUresult check_dev(CUdevice d) {
    return (d >= 0 && d < G.ndev) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

/* ------------------------------------------------------------------------ */
/* Initialisation and devices                                                */
/* ------------------------------------------------------------------------ */

EXPORT CUresult cuInit(unsigned flags) {
    ENTER(cuInit);
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (G.ndev == 0) return CUDA_ERROR_NO_DEVICE;
    lock();
    CUresult r = setup_va();
    if (!r) atomic_store(&G.initialized, 1);
    unlock();
    return r;
}

EXPORT CUresult cuDeviceGetCount(int *n) {
    ENTER(cuDeviceGetCount);
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    *n = G.ndev;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    ENTER(cuDeviceGet);
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (check_dev(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    ENTER(cuDeviceGetAttribute);
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (check_dev(d)) return CUDA_ERROR_INVALID_DEVICE;
    if (attr <= 0 || attr >= FC_DEVICE_ATTRIBUTE_LIMIT) return CUDA_ERROR_INVALID_VALUE;
    int x = 0; /* every attribute not listed: 0 */
    switch (attr) {
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: x = 1024; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: x = 32; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: x = 4; break;
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: x = 1; break;
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: x = 0x10 + G.phys_of[d]; break;
    case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: x = 0; break;
    case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: x = 1; break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: x = 1; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: x = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: x = 0; break;
    case CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: x = 1; break;
    case CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED: x = 1; break;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: x = !G.no_vmm; break;
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: x = !G.no_vmm; break;
    case CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED: x = !G.no_ro_register; break;
    }
    *v = x;
    return CUDA_SUCCESS;
}

/* The same 16 bytes for a physical device in every process: "FAKECUDA",
 * then zeros, then the physical index (CUDA_VISIBLE_DEVICES may renumber).
 * cudarc built for CUDA 12.x calls this name; for 13.x it would call
 * cuDeviceGetUuid_v2, which is then to be added. */
EXPORT CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) {
    ENTER(cuDeviceGetUuid);
    if (!u) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (check_dev(d)) return CUDA_ERROR_INVALID_DEVICE;
    memset(u, 0, sizeof *u);
    memcpy(u->bytes, "FAKECUDA", 8);
    u->bytes[8] = 0x4f;
    u->bytes[15] = (char)G.phys_of[d];
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Primary contexts                                                          */
/* ------------------------------------------------------------------------ */

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice d) {
    ENTER(cuDevicePrimaryCtxRetain);
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (check_dev(d)) return CUDA_ERROR_INVALID_DEVICE;
    lock();
    g_ctx[d].refs++;
    *pctx = &g_ctx[d];
    unlock();
    return CUDA_SUCCESS;
}

/* The last release destroys the primary context, as the real driver does:
 * its cuMemAlloc memory is freed, its streams and events destroyed, its
 * registrations and pinned buffers (unless PORTABLE) undone. */
static void ctx_destroy(struct fc_ctx *c) {
    for (size_t i = G.streams.n; i-- > 0;) {
        struct fc_stream *s = G.streams.v[i];
        if (s->ctx == c && s->live && !s->is_null) stream_kill(s);
    }
    for (size_t i = G.events.n; i-- > 0;) {
        struct fc_event *e = G.events.v[i];
        if (e->ctx == c && e->live) event_kill(e);
    }
    for (size_t i = G.allocs.n; i-- > 0;) {
        alloc_t *a = G.allocs.v[i];
        if (a->ctx == c) alloc_release(a);
    }
    for (size_t i = G.regions.n; i-- > 0;) {
        region_t *r = G.regions.v[i];
        if (r->ctx == c && !(r->flags & CU_MEMHOSTREGISTER_PORTABLE)) region_drop(r);
    }
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    ENTER(cuDevicePrimaryCtxRelease);
    NEED_INIT();
    if (check_dev(d)) return CUDA_ERROR_INVALID_DEVICE;
    lock();
    CUresult r = CUDA_SUCCESS;
    if (g_ctx[d].refs <= 0)
        r = CUDA_ERROR_INVALID_CONTEXT;
    else if (--g_ctx[d].refs == 0)
        ctx_destroy(&g_ctx[d]);
    unlock();
    return r;
}

EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    ENTER(cuCtxPushCurrent);
    NEED_INIT();
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    struct fc_ctx *c = ctx_from_handle(ctx);
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    lock();
    CUresult r = c->refs > 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
    unlock();
    if (r) return r;
    if (tls_depth == CTX_STACK) return CUDA_ERROR_OUT_OF_MEMORY;
    tls_stack[tls_depth++] = c;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx) {
    ENTER(cuCtxPopCurrent);
    NEED_INIT();
    if (tls_depth == 0) return CUDA_ERROR_INVALID_CONTEXT;
    struct fc_ctx *c = tls_stack[--tls_depth];
    if (pctx) *pctx = c; /* NULL is allowed, as with the real driver */
    return CUDA_SUCCESS;
}
