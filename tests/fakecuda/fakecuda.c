/*
 * fakecuda: a stand-in for the CUDA driver library (libcuda.so.1), for CI.
 *
 * It implements the part of the driver API that ray-zerocopy's upload code
 * uses, on host memory, so that tests can drive every branch and fault of
 * that code on machines with no GPU and no CUDA toolkit. It is a TEST DOUBLE:
 * nothing measured with it says anything about a GPU. See README.md.
 *
 * Design in one paragraph: device memory is a PROT_NONE range of the process
 * address space (so a host dereference of a device pointer faults, as on a
 * GPU); the bytes live in a "shadow" mapping of the same size at another
 * address (shadow(p) = shadow_base + (p - va_base)). cuMemAlloc memory is
 * backed by one memfd per device, VMM memory (cuMemCreate) by one memfd per
 * allocation so that an exported fd really shares it with another process.
 * Asynchronous work is queued per stream and executed by one worker thread.
 * Every API call takes one global mutex. All copies that touch host memory
 * go through process_vm_readv() on this very process, which reports EFAULT
 * instead of crashing when an address is not mapped.
 *
 * Types and constant values are declared here (no CUDA headers); they match
 * cuda.h and cudarc 0.19's bindings (see the static assertions below).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------------ */
/* Driver API types and constants (values as in cuda.h)                      */
/* ------------------------------------------------------------------------ */

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct fc_ctx *CUcontext;
typedef struct fc_stream *CUstream;
typedef struct fc_event *CUevent;

typedef struct {
    int type;      /* CUmemLocationType */
    int id;        /* union { int id; struct { uchar, uchar } localized; } */
} CUmemLocation;

typedef struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
} CUmemAllocFlags;

typedef struct {
    int type;                    /* CUmemAllocationType */
    int requestedHandleTypes;    /* CUmemAllocationHandleType (bit set) */
    CUmemLocation location;
    void *win32HandleMetaData;
    CUmemAllocFlags allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int flags;                   /* CUmemAccess_flags */
} CUmemAccessDesc;

typedef struct {
    char bytes[16];
} CUuuid;

/* Layouts as in cudarc's driver/sys/mod.rs (cuda-13040 and earlier). */
_Static_assert(sizeof(CUmemLocation) == 8, "CUmemLocation layout");
_Static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp size");
_Static_assert(offsetof(CUmemAllocationProp, location) == 8, "prop.location");
_Static_assert(offsetof(CUmemAllocationProp, win32HandleMetaData) == 16, "prop.win32");
_Static_assert(offsetof(CUmemAllocationProp, allocFlags) == 24, "prop.allocFlags");
_Static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc layout");
_Static_assert(sizeof(CUuuid) == 16, "CUuuid layout");

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEINITIALIZED = 4,
    CUDA_ERROR_STUB_LIBRARY = 34,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_CONTEXT_ALREADY_CURRENT = 202,
    CUDA_ERROR_MAP_FAILED = 205,
    CUDA_ERROR_UNMAP_FAILED = 206,
    CUDA_ERROR_ALREADY_MAPPED = 208,
    CUDA_ERROR_NOT_MAPPED = 211,
    CUDA_ERROR_ECC_UNCORRECTABLE = 214,
    CUDA_ERROR_PEER_ACCESS_UNSUPPORTED = 217,
    CUDA_ERROR_INVALID_SOURCE = 300,
    CUDA_ERROR_OPERATING_SYSTEM = 304,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_TIMEOUT = 702,
    CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704,
    CUDA_ERROR_PEER_ACCESS_NOT_ENABLED = 705,
    CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE = 708,
    CUDA_ERROR_CONTEXT_IS_DESTROYED = 709,
    CUDA_ERROR_ASSERT = 710,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_ILLEGAL_INSTRUCTION = 715,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_PERMITTED = 800,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_SYSTEM_NOT_READY = 802,
    CUDA_ERROR_SYSTEM_DRIVER_MISMATCH = 803,
    CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE = 804,
    CUDA_ERROR_TIMEOUT = 909,
    CUDA_ERROR_UNKNOWN = 999,
};

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

enum {
    CU_POINTER_ATTRIBUTE_CONTEXT = 1,
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2,
    CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3,
    CU_POINTER_ATTRIBUTE_HOST_POINTER = 4,
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9,
    CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11,
    CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12,
};
enum { CU_MEMORYTYPE_HOST = 1, CU_MEMORYTYPE_DEVICE = 2 };

#define CU_MEMHOSTREGISTER_PORTABLE 0x01u
#define CU_MEMHOSTREGISTER_DEVICEMAP 0x02u
#define CU_MEMHOSTREGISTER_IOMEMORY 0x04u
#define CU_MEMHOSTREGISTER_READ_ONLY 0x08u
#define CU_MEMHOSTALLOC_PORTABLE 0x01u
#define CU_MEMHOSTALLOC_DEVICEMAP 0x02u
#define CU_MEMHOSTALLOC_WRITECOMBINED 0x04u

enum { CU_MEM_HANDLE_TYPE_NONE = 0, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1 };
enum { CU_MEM_ALLOCATION_TYPE_PINNED = 1 };
enum { CU_MEM_LOCATION_TYPE_DEVICE = 1 };
enum { CU_MEM_ACCESS_FLAGS_PROT_NONE = 0, CU_MEM_ACCESS_FLAGS_PROT_READ = 1,
       CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3 };
enum { CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1 };
enum { CU_STREAM_DEFAULT = 0, CU_STREAM_NON_BLOCKING = 1 };
#define CU_STREAM_LEGACY ((CUstream)0x1)
#define CU_STREAM_PER_THREAD ((CUstream)0x2)
enum { CU_EVENT_DEFAULT = 0, CU_EVENT_BLOCKING_SYNC = 1, CU_EVENT_DISABLE_TIMING = 2,
       CU_EVENT_INTERPROCESS = 4 };

/* ------------------------------------------------------------------------ */
/* Error names and texts                                                     */
/* ------------------------------------------------------------------------ */

/* Only codes that exist in every CUresult enum of CUDA 12.x and 13.x: the
 * Rust side reads the returned value as a Rust enum, where any other value
 * would be undefined behaviour. */
static const struct {
    CUresult code;
    const char *name;
    const char *text;
} ERRORS[] = {
#define E(n, t) {n, #n, t}
    E(CUDA_SUCCESS, "no error"),
    E(CUDA_ERROR_INVALID_VALUE, "invalid argument"),
    E(CUDA_ERROR_OUT_OF_MEMORY, "out of memory"),
    E(CUDA_ERROR_NOT_INITIALIZED, "initialization error"),
    E(CUDA_ERROR_DEINITIALIZED, "driver shutting down"),
    E(CUDA_ERROR_STUB_LIBRARY, "CUDA driver is a stub library"),
    E(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected"),
    E(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal"),
    E(CUDA_ERROR_INVALID_IMAGE, "device kernel image is invalid"),
    E(CUDA_ERROR_INVALID_CONTEXT, "invalid device context"),
    E(CUDA_ERROR_CONTEXT_ALREADY_CURRENT, "context already current"),
    E(CUDA_ERROR_MAP_FAILED, "mapping of buffer object failed"),
    E(CUDA_ERROR_UNMAP_FAILED, "unmapping of buffer object failed"),
    E(CUDA_ERROR_ALREADY_MAPPED, "resource already mapped"),
    E(CUDA_ERROR_NOT_MAPPED, "resource not mapped"),
    E(CUDA_ERROR_ECC_UNCORRECTABLE, "uncorrectable ECC error encountered"),
    E(CUDA_ERROR_PEER_ACCESS_UNSUPPORTED, "peer access is not supported between these two devices"),
    E(CUDA_ERROR_INVALID_SOURCE, "device kernel image is invalid"),
    E(CUDA_ERROR_OPERATING_SYSTEM, "OS call failed or operation not supported on this OS"),
    E(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle"),
    E(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state"),
    E(CUDA_ERROR_NOT_FOUND, "named symbol not found"),
    E(CUDA_ERROR_NOT_READY, "device not ready"),
    E(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered"),
    E(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "too many resources requested for launch"),
    E(CUDA_ERROR_LAUNCH_TIMEOUT, "the launch timed out and was terminated"),
    E(CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, "peer access is already enabled"),
    E(CUDA_ERROR_PEER_ACCESS_NOT_ENABLED, "peer access has not been enabled"),
    E(CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE, "cannot set while device is active in this process"),
    E(CUDA_ERROR_CONTEXT_IS_DESTROYED, "context is destroyed"),
    E(CUDA_ERROR_ASSERT, "device-side assert triggered"),
    E(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "part or all of the requested memory range is already mapped"),
    E(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, "pointer does not correspond to a registered memory region"),
    E(CUDA_ERROR_ILLEGAL_INSTRUCTION, "an illegal instruction was encountered"),
    E(CUDA_ERROR_MISALIGNED_ADDRESS, "misaligned address"),
    E(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure"),
    E(CUDA_ERROR_NOT_PERMITTED, "operation not permitted"),
    E(CUDA_ERROR_NOT_SUPPORTED, "operation not supported"),
    E(CUDA_ERROR_SYSTEM_NOT_READY, "system not yet initialized"),
    E(CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, "system has unsupported display driver / cuda driver combination"),
    E(CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE, "forward compatibility was attempted on non supported HW"),
    E(CUDA_ERROR_TIMEOUT, "wait operation timed out"),
    E(CUDA_ERROR_UNKNOWN, "unknown error"),
#undef E
};
#define NERRORS (sizeof ERRORS / sizeof ERRORS[0])

static int error_index(CUresult code) {
    for (size_t i = 0; i < NERRORS; i++)
        if (ERRORS[i].code == code) return (int)i;
    return -1;
}

/* ------------------------------------------------------------------------ */
/* The exported functions and their default injected fault (FAKECUDA_FAIL)  */
/* ------------------------------------------------------------------------ */

/* Base names (without the _v2 suffix: cuMemAlloc and cuMemAlloc_v2 are one
 * function with one call counter) and the error an injected failure gives
 * when FAKECUDA_FAIL names none: out of memory for calls that allocate or
 * pin, not supported for VMM allocation and sharing, unknown otherwise. */
#define FC_FUNCS(X)                                                  \
    X(cuInit, CUDA_ERROR_UNKNOWN)                                    \
    X(cuDriverGetVersion, CUDA_ERROR_UNKNOWN)                        \
    X(cuDeviceGetCount, CUDA_ERROR_UNKNOWN)                          \
    X(cuDeviceGet, CUDA_ERROR_INVALID_DEVICE)                        \
    X(cuDeviceGetAttribute, CUDA_ERROR_UNKNOWN)                      \
    X(cuDeviceGetName, CUDA_ERROR_UNKNOWN)                           \
    X(cuDeviceTotalMem, CUDA_ERROR_UNKNOWN)                          \
    X(cuDeviceGetUuid, CUDA_ERROR_UNKNOWN)                           \
    X(cuDevicePrimaryCtxRetain, CUDA_ERROR_UNKNOWN)                  \
    X(cuDevicePrimaryCtxRelease, CUDA_ERROR_UNKNOWN)                 \
    X(cuDevicePrimaryCtxGetState, CUDA_ERROR_UNKNOWN)                \
    X(cuCtxPushCurrent, CUDA_ERROR_UNKNOWN)                          \
    X(cuCtxPopCurrent, CUDA_ERROR_UNKNOWN)                           \
    X(cuCtxGetCurrent, CUDA_ERROR_UNKNOWN)                           \
    X(cuCtxSetCurrent, CUDA_ERROR_UNKNOWN)                           \
    X(cuCtxGetDevice, CUDA_ERROR_UNKNOWN)                            \
    X(cuCtxSynchronize, CUDA_ERROR_UNKNOWN)                          \
    X(cuMemAlloc, CUDA_ERROR_OUT_OF_MEMORY)                          \
    X(cuMemFree, CUDA_ERROR_UNKNOWN)                                 \
    X(cuMemGetInfo, CUDA_ERROR_UNKNOWN)                              \
    X(cuMemHostRegister, CUDA_ERROR_OUT_OF_MEMORY)                   \
    X(cuMemHostUnregister, CUDA_ERROR_UNKNOWN)                       \
    X(cuMemHostAlloc, CUDA_ERROR_OUT_OF_MEMORY)                      \
    X(cuMemAllocHost, CUDA_ERROR_OUT_OF_MEMORY)                      \
    X(cuMemFreeHost, CUDA_ERROR_UNKNOWN)                             \
    X(cuStreamCreate, CUDA_ERROR_UNKNOWN)                            \
    X(cuStreamDestroy, CUDA_ERROR_UNKNOWN)                           \
    X(cuStreamSynchronize, CUDA_ERROR_UNKNOWN)                       \
    X(cuStreamQuery, CUDA_ERROR_UNKNOWN)                             \
    X(cuStreamWaitEvent, CUDA_ERROR_UNKNOWN)                         \
    X(cuEventCreate, CUDA_ERROR_UNKNOWN)                             \
    X(cuEventDestroy, CUDA_ERROR_UNKNOWN)                            \
    X(cuEventRecord, CUDA_ERROR_UNKNOWN)                             \
    X(cuEventSynchronize, CUDA_ERROR_UNKNOWN)                        \
    X(cuEventQuery, CUDA_ERROR_UNKNOWN)                              \
    X(cuMemcpyHtoDAsync, CUDA_ERROR_UNKNOWN)                         \
    X(cuMemcpyHtoD, CUDA_ERROR_UNKNOWN)                              \
    X(cuMemcpyDtoH, CUDA_ERROR_UNKNOWN)                              \
    X(cuMemcpyDtoHAsync, CUDA_ERROR_UNKNOWN)                         \
    X(cuGetErrorName, CUDA_ERROR_INVALID_VALUE)                      \
    X(cuGetErrorString, CUDA_ERROR_INVALID_VALUE)                    \
    X(cuMemCreate, CUDA_ERROR_NOT_SUPPORTED)                         \
    X(cuMemRelease, CUDA_ERROR_UNKNOWN)                              \
    X(cuMemAddressReserve, CUDA_ERROR_OUT_OF_MEMORY)                 \
    X(cuMemAddressFree, CUDA_ERROR_UNKNOWN)                          \
    X(cuMemMap, CUDA_ERROR_UNKNOWN)                                  \
    X(cuMemUnmap, CUDA_ERROR_UNKNOWN)                                \
    X(cuMemSetAccess, CUDA_ERROR_UNKNOWN)                            \
    X(cuMemGetAccess, CUDA_ERROR_UNKNOWN)                            \
    X(cuMemGetAllocationGranularity, CUDA_ERROR_UNKNOWN)             \
    X(cuMemExportToShareableHandle, CUDA_ERROR_NOT_SUPPORTED)        \
    X(cuMemImportFromShareableHandle, CUDA_ERROR_NOT_SUPPORTED)      \
    X(cuMemRetainAllocationHandle, CUDA_ERROR_UNKNOWN)               \
    X(cuMemGetAllocationPropertiesFromHandle, CUDA_ERROR_UNKNOWN)    \
    X(cuPointerGetAttribute, CUDA_ERROR_UNKNOWN)

enum {
#define X(name, err) FN_##name,
    FC_FUNCS(X)
#undef X
    FN_COUNT
};

static const struct {
    const char *name;
    CUresult fault;
} FUNCS[FN_COUNT] = {
#define X(name, err) {#name, err},
    FC_FUNCS(X)
#undef X
};

/* Parsed FAKECUDA_FAIL entries. */
#define MAX_RULES 64
static struct {
    int fn;
    unsigned long nth; /* 0: every call */
    CUresult err;
} g_rules[MAX_RULES];
static int g_nrules;
static atomic_ulong g_calls[FN_COUNT];

/* Called first thing in every exported function: counts the call and says
 * whether FAKECUDA_FAIL makes this one fail. */
static CUresult fault_check(int fn) {
    unsigned long k = atomic_fetch_add(&g_calls[fn], 1) + 1;
    for (int i = 0; i < g_nrules; i++)
        if (g_rules[i].fn == fn && (g_rules[i].nth == 0 || g_rules[i].nth == k))
            return g_rules[i].err;
    return CUDA_SUCCESS;
}

#define ENTER(name)                                   \
    do {                                              \
        CUresult fault_ = fault_check(FN_##name);     \
        if (fault_ != CUDA_SUCCESS) return fault_;    \
    } while (0)

#define NEED_INIT()                                                        \
    do {                                                                   \
        if (!atomic_load(&G.initialized)) return CUDA_ERROR_NOT_INITIALIZED; \
    } while (0)

/* ------------------------------------------------------------------------ */
/* State                                                                     */
/* ------------------------------------------------------------------------ */

#define MAXDEV 16
#define GRAN ((size_t)2 << 20) /* VMM granularity (minimum and recommended) */
#define CTX_MAGIC 0xfc0c7a11u

/* A growable array of pointers; order is not kept on removal. */
typedef struct {
    void **v;
    size_t n, cap;
} vec_t;

static int vec_push(vec_t *a, void *p) {
    if (a->n == a->cap) {
        size_t c = a->cap ? 2 * a->cap : 16;
        void **nv = realloc(a->v, c * sizeof *nv);
        if (!nv) return -1;
        a->v = nv;
        a->cap = c;
    }
    a->v[a->n++] = p;
    return 0;
}

static void vec_del(vec_t *a, size_t i) { a->v[i] = a->v[--a->n]; }

static void vec_remove(vec_t *a, void *p) {
    for (size_t i = 0; i < a->n; i++)
        if (a->v[i] == p) {
            vec_del(a, i);
            return;
        }
}

enum { OP_HTOD, OP_DTOH, OP_RECORD, OP_WAIT };

struct fc_event;

typedef struct op {
    struct op *next;
    int kind;
    uint64_t seq;        /* position in its stream */
    CUdeviceptr dptr;    /* copies: device side */
    void *host;          /* copies: host side as given by the caller */
    size_t n;
    void *staged;        /* HtoD from pageable memory: the bytes, taken at issue */
    uint64_t region;     /* host side in pinned/registered memory: that region's id */
    struct fc_event *ev; /* record / wait */
    uint64_t evid;
} op_t;

struct fc_ctx;

struct fc_stream {
    struct fc_ctx *ctx;
    unsigned flags;
    int is_null;    /* the context's NULL stream (never handed out) */
    int live;       /* the handle is valid (not destroyed) */
    int refs;       /* handle + events recorded on it + threads waiting on it */
    int busy;       /* its head op is being executed */
    op_t *head, *tail;
    uint64_t issued, completed;
    CUresult sticky; /* first asynchronous error, returned by the next sync */
};

struct fc_event {
    struct fc_ctx *ctx;
    unsigned flags;
    int live;
    int refs;                  /* handle + queued ops naming it + waiters */
    uint64_t rec_id, done_id;  /* complete when done_id >= rec_id */
    struct fc_stream *rec_stream;
};

struct fc_ctx {
    unsigned magic;
    int dev;
    int refs; /* primary context retain count; 0: not active */
    struct fc_stream null_stream;
};

typedef struct {
    CUdeviceptr ptr;
    size_t size, span;  /* requested, placed (page multiple) */
    int dev;
    struct fc_ctx *ctx;
} alloc_t;

typedef struct {
    uint64_t id;
    uintptr_t start, end; /* page-rounded extent */
    void *p;              /* as given (registration) or returned (pinned) */
    size_t size;
    unsigned flags;
    int pinned;           /* 1: cuMemHostAlloc'd, 0: registered */
    struct fc_ctx *ctx;
} region_t;

typedef struct {
    CUmemGenericAllocationHandle handle;
    int dev, physdev;
    size_t size;
    int fd;
    unsigned types;
    int accounted; /* counted against this process's device memory */
    int refs;      /* handle references (create/import/retain minus release) */
    int maps;      /* mapping records using it */
    int logged;    /* a create/import line awaits its release line */
} phys_t;

typedef struct {
    CUdeviceptr va;
    size_t size;
} resv_t;

typedef struct {
    CUdeviceptr va;
    size_t size;
    phys_t *ph;
    size_t off;
    uint64_t map_id; /* one cuMemMap call; records split by cuMemSetAccess share it */
    unsigned char access[MAXDEV];
} map_t;

/* What the exit line counts as leaked. */
enum { L_ALLOC, L_HANDLE, L_REG, L_PINNED, L_MAP, L_COUNT };
static atomic_long g_live[L_COUNT];

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* the worker waits here for work */
    pthread_cond_t done_cv; /* synchronizing threads wait here */
    atomic_int initialized;

    /* configuration, read when the library is loaded */
    int nphys;             /* FAKECUDA_DEVICES */
    int ndev;              /* visible (CUDA_VISIBLE_DEVICES) */
    int phys_of[MAXDEV];   /* ordinal -> physical index */
    size_t mem;            /* bytes per device */
    unsigned long delay_us;
    int no_ro_register, no_vmm;
    int log_fd;
    size_t page;

    /* address layout (set up by cuInit) */
    int va_ready;
    uintptr_t va_base, shadow_base;
    size_t arena_size; /* per device, for cuMemAlloc */
    uintptr_t vmm_base;
    size_t vmm_size;
    int arena_fd[MAXDEV];
    size_t used[MAXDEV];

    vec_t allocs, regions, phys, resvs, maps, streams, events;
    uint64_t next_id;
    size_t rr; /* worker round robin */
    int worker_running;
} G = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .work_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
    .log_fd = -1,
};

static struct fc_ctx g_ctx[MAXDEV];

/* Per-thread stack of current contexts. */
#define CTX_STACK 64
static __thread struct fc_ctx *tls_stack[CTX_STACK];
static __thread int tls_depth;

static void lock(void) { pthread_mutex_lock(&G.mu); }
static void unlock(void) { pthread_mutex_unlock(&G.mu); }

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (write(2, "fakecuda: ", 10) < 0 || write(2, buf, (size_t)n) < 0) {
    }
}

/* ------------------------------------------------------------------------ */
/* Log (FAKECUDA_LOG)                                                        */
/* ------------------------------------------------------------------------ */

/* One write(2) per line on an O_APPEND descriptor: lines from several
 * processes do not interleave. */
static void log_event(const char *op, unsigned long long bytes, int dev) {
    if (G.log_fd < 0) return;
    char buf[200];
    int n = snprintf(buf, sizeof buf, "{\"pid\": %d, \"op\": \"%s\", \"bytes\": %llu, \"dev\": %d}\n",
                     (int)getpid(), op, bytes, dev);
    if (n > 0 && write(G.log_fd, buf, (size_t)n) < 0) {
    }
}

static void live_add(int kind, long d) { atomic_fetch_add(&g_live[kind], d); }

static pid_t g_exit_logged;

__attribute__((destructor)) static void fc_fini(void) {
    /* Runs at exit() (from any thread; the library pins itself, so never at
     * dlclose). Takes no lock: another thread may hold it forever. */
    if (G.log_fd < 0 || g_exit_logged == getpid()) return;
    g_exit_logged = getpid();
    long l[L_COUNT], total = 0;
    for (int i = 0; i < L_COUNT; i++) total += (l[i] = atomic_load(&g_live[i]));
    char buf[300];
    int n = snprintf(buf, sizeof buf,
                     "{\"op\": \"exit\", \"pid\": %d, \"leaks\": %ld, \"allocs\": %ld, \"handles\": %ld, "
                     "\"registrations\": %ld, \"pinned\": %ld, \"mappings\": %ld}\n",
                     (int)getpid(), total, l[L_ALLOC], l[L_HANDLE], l[L_REG], l[L_PINNED], l[L_MAP]);
    if (n > 0 && write(G.log_fd, buf, (size_t)n) < 0) {
    }
}

/* ------------------------------------------------------------------------ */
/* Safe host copies                                                          */
/* ------------------------------------------------------------------------ */

static atomic_int g_no_vm_readv;

/* Copies n bytes within this process; returns 0, or -1 when either side is
 * not (fully) mapped with the needed access. process_vm_readv() on our own
 * pid reports EFAULT instead of raising SIGSEGV. Where the kernel refuses it
 * (seccomp), falls back to memcpy and says so once. */
static int safe_copy(void *dst, const void *src, size_t n) {
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
/* Context helpers                                                           */
/* ------------------------------------------------------------------------ */

static struct fc_ctx *cur_ctx(void) { return tls_depth ? tls_stack[tls_depth - 1] : NULL; }

/* Under the lock: the calling thread's current context, if it is usable. */
static CUresult need_ctx(struct fc_ctx **out) {
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

static CUresult check_dev(CUdevice d) {
    return (d >= 0 && d < G.ndev) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

/* ------------------------------------------------------------------------ */
/* Device address space                                                      */
/* ------------------------------------------------------------------------ */

static void *shadow(CUdeviceptr p) { return (void *)(G.shadow_base + (uintptr_t)(p - G.va_base)); }

static uintptr_t arena_base(int dev) { return G.va_base + (uintptr_t)dev * G.arena_size; }

static void *map_region(size_t size) {
    /* size + GRAN, then aligned up to GRAN; the slack stays reserved. */
    void *p = mmap(NULL, size + GRAN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return NULL;
    return (void *)round_up((uintptr_t)p, GRAN);
}

static int new_arena_fd(int dev) {
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
static CUresult setup_va(void) {
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

static map_t *find_map(CUdeviceptr p) {
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
static CUresult dev_range(CUdeviceptr p, size_t n, int dev, int need) {
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
/* Host regions: registrations and pinned allocations                        */
/* ------------------------------------------------------------------------ */

static region_t *find_region_covering(uintptr_t p, size_t n) {
    for (size_t i = 0; i < G.regions.n; i++) {
        region_t *r = G.regions.v[i];
        if (p >= r->start && p + n <= r->end) return r;
    }
    return NULL;
}

static region_t *find_region_id(uint64_t id) {
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

static void region_drop(region_t *r) {
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

/* ------------------------------------------------------------------------ */
/* Streams, events and the worker                                            */
/* ------------------------------------------------------------------------ */

static void stream_maybe_free(struct fc_stream *s);

static void event_unref(struct fc_event *e) {
    if (--e->refs > 0 || e->live) return;
    vec_remove(&G.events, e);
    if (e->rec_stream) {
        e->rec_stream->refs--;
        stream_maybe_free(e->rec_stream);
    }
    free(e);
}

static void stream_maybe_free(struct fc_stream *s) {
    if (s->is_null || s->live || s->refs > 0 || s->head || s->busy) return;
    vec_remove(&G.streams, s);
    free(s);
}

static void op_free(op_t *op) {
    free(op->staged);
    if (op->ev) event_unref(op->ev);
    free(op);
}

static void *worker_main(void *arg);

/* The worker is started on first use (and again in a forked child). */
static CUresult ensure_worker(void) {
    if (G.worker_running) return CUDA_SUCCESS;
    pthread_t t;
    pthread_attr_t at;
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    /* The worker takes no signals: they belong to the application. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(&t, &at, worker_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&at);
    if (e) {
        warn("cannot start the worker thread: %s", strerror(e));
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    G.worker_running = 1;
    return CUDA_SUCCESS;
}

/* Appends an op to a stream; the caller made sure the worker runs. */
static void enqueue(struct fc_stream *s, op_t *op) {
    op->seq = ++s->issued;
    op->next = NULL;
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    pthread_cond_signal(&G.work_cv);
}

static int op_ready(const op_t *op) { return op->kind != OP_WAIT || op->ev->done_id >= op->evid; }

static struct fc_stream *pick_runnable(void) {
    size_t n = G.streams.n;
    for (size_t k = 0; k < n; k++) {
        struct fc_stream *s = G.streams.v[(G.rr + k) % n];
        if (s->head && !s->busy && op_ready(s->head)) {
            G.rr = (G.rr + k + 1) % n;
            return s;
        }
    }
    return NULL;
}

static void set_sticky(struct fc_stream *s, CUresult r) {
    if (s->sticky == CUDA_SUCCESS) s->sticky = r;
}

/* Executes one op with the lock held. The tables are checked again now:
 * the device range must still be mapped with access, and a pinned or
 * registered host side must still be pinned/registered. A failure is
 * recorded on the stream (as a GPU fault would) and the copy is skipped. */
static void execute(struct fc_stream *s, op_t *op) {
    int dev = s->ctx->dev;
    switch (op->kind) {
    case OP_HTOD: {
        if (dev_range(op->dptr, op->n, dev, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)) {
            set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
            break;
        }
        const void *src = op->staged;
        if (!src) {
            region_t *r = find_region_id(op->region);
            if (!r || (uintptr_t)op->host < r->start || (uintptr_t)op->host + op->n > r->end) {
                set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
                break;
            }
            src = op->host;
        }
        if (safe_copy(shadow(op->dptr), src, op->n)) set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
        break;
    }
    case OP_DTOH: {
        if (dev_range(op->dptr, op->n, dev, CU_MEM_ACCESS_FLAGS_PROT_READ)) {
            set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
            break;
        }
        if (op->region) {
            region_t *r = find_region_id(op->region);
            if (!r || (r->flags & CU_MEMHOSTREGISTER_READ_ONLY) || (uintptr_t)op->host < r->start ||
                (uintptr_t)op->host + op->n > r->end) {
                set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
                break;
            }
        }
        if (safe_copy(op->host, shadow(op->dptr), op->n)) set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
        break;
    }
    case OP_RECORD:
        if (op->ev->done_id < op->evid) op->ev->done_id = op->evid;
        break;
    case OP_WAIT:
        break;
    }
}

static void sleep_us(unsigned long us) {
    struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    lock();
    for (;;) {
        struct fc_stream *s = pick_runnable();
        if (!s) {
            pthread_cond_wait(&G.work_cv, &G.mu);
            continue;
        }
        op_t *op = s->head;
        s->busy = 1;
        if ((op->kind == OP_HTOD || op->kind == OP_DTOH) && G.delay_us) {
            /* The transfer time: others may issue and query meanwhile. */
            unlock();
            sleep_us(G.delay_us);
            lock();
        }
        execute(s, op);
        s->head = op->next;
        if (!s->head) s->tail = NULL;
        s->completed = op->seq;
        s->busy = 0;
        s->refs++; /* op_free may drop the last other reference to s */
        op_free(op);
        s->refs--;
        stream_maybe_free(s);
        pthread_cond_broadcast(&G.done_cv);
    }
    return NULL;
}

/* Under the lock: resolves a stream handle. NULL (and CU_STREAM_LEGACY /
 * CU_STREAM_PER_THREAD) is the current context's own NULL stream. */
static CUresult stream_get(CUstream h, struct fc_stream **out) {
    if (h == NULL || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        struct fc_ctx *c;
        CUresult r = need_ctx(&c);
        if (r) return r;
        *out = &c->null_stream;
        return CUDA_SUCCESS;
    }
    for (size_t i = 0; i < G.streams.n; i++) {
        struct fc_stream *s = G.streams.v[i];
        if (s == h && s->live && !s->is_null) {
            *out = s;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_HANDLE;
}

static struct fc_event *event_get(CUevent h) {
    for (size_t i = 0; i < G.events.n; i++) {
        struct fc_event *e = G.events.v[i];
        if (e == h && e->live) return e;
    }
    return NULL;
}

/* Waits (lock held, released while waiting) until the stream has no work
 * left; returns and clears its sticky error. */
static CUresult stream_drain(struct fc_stream *s) {
    s->refs++;
    while (s->head) pthread_cond_wait(&G.done_cv, &G.mu);
    s->refs--;
    CUresult r = s->sticky;
    s->sticky = CUDA_SUCCESS;
    stream_maybe_free(s);
    return r;
}

static void stream_kill(struct fc_stream *s) {
    s->live = 0;
    s->refs--;
    stream_maybe_free(s);
}

static void event_kill(struct fc_event *e) {
    e->live = 0;
    event_unref(e);
}

/* ------------------------------------------------------------------------ */
/* VMM helpers                                                               */
/* ------------------------------------------------------------------------ */

static phys_t *find_handle(CUmemGenericAllocationHandle h) {
    for (size_t i = 0; i < G.phys.n; i++) {
        phys_t *p = G.phys.v[i];
        if (p->handle == h && p->refs > 0) return p;
    }
    return NULL;
}

/* Physical memory lives while a handle or a mapping refers to it. */
static void phys_maybe_free(phys_t *p) {
    if (p->refs > 0 || p->maps > 0) return;
    vec_remove(&G.phys, p);
    if (p->accounted) G.used[p->dev] -= p->size;
    close(p->fd);
    free(p);
}

static void handle_unref(phys_t *p) {
    if (--p->refs == 0) {
        live_add(L_HANDLE, -1);
        if (p->logged) log_event("release", p->size, p->dev);
        p->logged = 0;
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
    p->logged = 1;
    live_add(L_HANDLE, 1);
    return p;
}

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
/* Library load, fork                                                        */
/* ------------------------------------------------------------------------ */

static long env_long(const char *name, long def, long lo, long hi) {
    const char *s = getenv(name);
    if (!s || !*s) return def;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) {
        warn("ignoring %s=%s (expected an integer in %ld..%ld); using %ld", name, s, lo, hi, def);
        return def;
    }
    return v;
}

static void parse_fail(const char *spec) {
    char *copy = strdup(spec);
    if (!copy) return;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ' || *tok == '\t') tok++;
        size_t tl = strlen(tok);
        while (tl && (tok[tl - 1] == ' ' || tok[tl - 1] == '\t')) tok[--tl] = 0;
        if (!*tok) continue;
        char entry[128];
        snprintf(entry, sizeof entry, "%s", tok);
        char *eq = strchr(tok, '='), *at;
        if (eq) *eq++ = 0;
        at = strchr(tok, '@');
        if (at) *at++ = 0;
        size_t sl = strlen(tok);
        if (sl > 3 && strcmp(tok + sl - 3, "_v2") == 0) tok[sl - 3] = 0;
        int fn = -1;
        for (int i = 0; i < FN_COUNT; i++)
            if (strcmp(FUNCS[i].name, tok) == 0) fn = i;
        if (fn < 0) {
            warn("FAKECUDA_FAIL: ignoring '%s': unknown driver function '%s'", entry, tok);
            continue;
        }
        unsigned long nth = 0;
        if (at) {
            char *end;
            errno = 0;
            nth = strtoul(at, &end, 10);
            if (errno || *end || nth == 0 || *at == '-' || *at == 0) {
                warn("FAKECUDA_FAIL: ignoring '%s': '@%s' is not a call number (1, 2, ...)", entry, at);
                continue;
            }
        }
        CUresult err = FUNCS[fn].fault;
        if (eq) {
            int k = -1;
            for (size_t i = 0; i < NERRORS; i++)
                if (strcmp(ERRORS[i].name, eq) == 0) k = (int)i;
            if (k <= 0) { /* unknown, or CUDA_SUCCESS */
                warn("FAKECUDA_FAIL: ignoring '%s': '%s' is not a CUDA error name this library knows", entry,
                     eq);
                continue;
            }
            err = ERRORS[k].code;
        }
        if (g_nrules == MAX_RULES) {
            warn("FAKECUDA_FAIL: ignoring '%s': more than %d entries", entry, MAX_RULES);
            continue;
        }
        g_rules[g_nrules].fn = fn;
        g_rules[g_nrules].nth = nth;
        g_rules[g_nrules].err = err;
        g_nrules++;
    }
    free(copy);
}

static void parse_visible(void) {
    const char *s = getenv("CUDA_VISIBLE_DEVICES");
    G.ndev = G.nphys;
    for (int i = 0; i < G.nphys; i++) G.phys_of[i] = i;
    if (!s) return;
    /* As the real driver: the listed ordinals, up to the first bad entry. */
    G.ndev = 0;
    const char *p = s;
    while (*p && G.ndev < MAXDEV) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v >= G.nphys) break;
        int dup = 0;
        for (int i = 0; i < G.ndev; i++) dup |= G.phys_of[i] == v;
        if (dup) break;
        G.phys_of[G.ndev++] = (int)v;
        while (*end == ' ') end++;
        if (*end != ',') break;
        p = end + 1;
    }
}

static void fork_prepare(void) { lock(); }
static void fork_parent(void) { unlock(); }

/* A forked child starts with no resources of its own: it has no worker, its
 * tables are empty, and it gets fresh memory for cuMemAlloc (the parent's
 * memfd is shared and must not be written by the child). Contexts (retain
 * counts, this thread's current stack) and cuInit carry over. */
static void fork_child(void) {
    pthread_mutex_init(&G.mu, NULL);
    pthread_cond_init(&G.work_cv, NULL);
    pthread_cond_init(&G.done_cv, NULL);
    G.worker_running = 0;
    for (size_t i = 0; i < G.streams.n; i++) {
        struct fc_stream *s = G.streams.v[i];
        while (s->head) {
            op_t *op = s->head;
            s->head = op->next;
            free(op->staged);
            free(op);
        }
        s->tail = NULL;
        s->busy = 0;
        s->sticky = 0;
        s->refs = 0;
        if (!s->is_null) free(s);
    }
    G.streams.n = 0;
    for (size_t i = 0; i < G.events.n; i++) free(G.events.v[i]);
    G.events.n = 0;
    for (int d = 0; d < G.ndev; d++) vec_push(&G.streams, &g_ctx[d].null_stream);
    for (size_t i = 0; i < G.allocs.n; i++) free(G.allocs.v[i]);
    G.allocs.n = 0;
    for (size_t i = 0; i < G.regions.n; i++) free(G.regions.v[i]);
    G.regions.n = 0;
    for (size_t i = 0; i < G.maps.n; i++) free(G.maps.v[i]);
    G.maps.n = 0;
    for (size_t i = 0; i < G.resvs.n; i++) free(G.resvs.v[i]);
    G.resvs.n = 0;
    for (size_t i = 0; i < G.phys.n; i++) {
        phys_t *p = G.phys.v[i];
        close(p->fd);
        free(p);
    }
    G.phys.n = 0;
    if (G.va_ready) {
        mmap((void *)(G.shadow_base + (G.vmm_base - G.va_base)), G.vmm_size, PROT_NONE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        for (int d = 0; d < G.ndev; d++) {
            close(G.arena_fd[d]);
            G.arena_fd[d] = new_arena_fd(d);
        }
    }
    for (int d = 0; d < G.ndev; d++) G.used[d] = 0;
    for (int i = 0; i < L_COUNT; i++) atomic_store(&g_live[i], 0);
    for (int i = 0; i < FN_COUNT; i++) atomic_store(&g_calls[i], 0);
}

__attribute__((constructor)) static void fc_load(void) {
    /* Pin this library: the worker thread runs its code, and dlclose (which
     * cudarc's presence check does) must not run the exit destructor. */
    Dl_info info;
    if (dladdr((void *)fc_load, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);

    G.page = (size_t)sysconf(_SC_PAGESIZE);
    G.nphys = (int)env_long("FAKECUDA_DEVICES", 1, 0, MAXDEV);
    G.mem = (size_t)env_long("FAKECUDA_MEM_MB", 4096, 1, 1 << 20) << 20;
    G.delay_us = (unsigned long)env_long("FAKECUDA_COPY_DELAY_US", 0, 0, 60L * 1000 * 1000);
    G.no_ro_register = env_long("FAKECUDA_NO_READONLY_REGISTER", 0, 0, 1) == 1;
    G.no_vmm = env_long("FAKECUDA_NO_VMM", 0, 0, 1) == 1;
    parse_visible();
    const char *fail = getenv("FAKECUDA_FAIL");
    if (fail) parse_fail(fail);
    const char *log = getenv("FAKECUDA_LOG");
    if (log && *log) {
        G.log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (G.log_fd < 0) warn("cannot open FAKECUDA_LOG=%s: %s", log, strerror(errno));
    }
    for (int d = 0; d < G.ndev; d++) {
        g_ctx[d].magic = CTX_MAGIC;
        g_ctx[d].dev = d;
        g_ctx[d].null_stream.ctx = &g_ctx[d];
        g_ctx[d].null_stream.is_null = 1;
        g_ctx[d].null_stream.live = 1;
        vec_push(&G.streams, &g_ctx[d].null_stream);
    }
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* ------------------------------------------------------------------------ */
/* Initialisation, version, errors                                           */
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

EXPORT CUresult cuDriverGetVersion(int *v) {
    ENTER(cuDriverGetVersion);
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorName(CUresult e, const char **s) {
    ENTER(cuGetErrorName);
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    int i = error_index(e);
    *s = i < 0 ? NULL : ERRORS[i].name;
    return i < 0 ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char **s) {
    ENTER(cuGetErrorString);
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    int i = error_index(e);
    *s = i < 0 ? NULL : ERRORS[i].text;
    return i < 0 ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Devices                                                                   */
/* ------------------------------------------------------------------------ */

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

EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    ENTER(cuDeviceGetName);
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (check_dev(d)) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "FakeCUDA test double %d (not a GPU)", G.phys_of[d]);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    ENTER(cuDeviceTotalMem);
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (check_dev(d)) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = G.mem;
    return CUDA_SUCCESS;
}

/* The same 16 bytes for a physical device in every process: "FAKECUDA",
 * then zeros, then the physical index (CUDA_VISIBLE_DEVICES may renumber). */
EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) {
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
EXPORT CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) __attribute__((alias("cuDeviceGetUuid_v2")));

/* ------------------------------------------------------------------------ */
/* Contexts                                                                  */
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
        if (a->ctx != c) continue;
        vec_del(&G.allocs, i);
        fallocate(G.arena_fd[a->dev], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(a->ptr - arena_base(a->dev)), (off_t)a->span);
        G.used[a->dev] -= a->span;
        live_add(L_ALLOC, -1);
        log_event("free", a->size, a->dev);
        free(a);
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
EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice d) __attribute__((alias("cuDevicePrimaryCtxRelease_v2")));

EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned *flags, int *active) {
    ENTER(cuDevicePrimaryCtxGetState);
    if (!flags || !active) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    if (check_dev(d)) return CUDA_ERROR_INVALID_DEVICE;
    lock();
    *flags = 0;
    *active = g_ctx[d].refs > 0;
    unlock();
    return CUDA_SUCCESS;
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

EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx) {
    ENTER(cuCtxGetCurrent);
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    *pctx = cur_ctx();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
    ENTER(cuCtxSetCurrent);
    NEED_INIT();
    if (!ctx) { /* NULL: pops the top, if any */
        if (tls_depth) tls_depth--;
        return CUDA_SUCCESS;
    }
    struct fc_ctx *c = ctx_from_handle(ctx);
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    lock();
    CUresult r = c->refs > 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
    unlock();
    if (r) return r;
    if (tls_depth)
        tls_stack[tls_depth - 1] = c;
    else
        tls_stack[tls_depth++] = c;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice *d) {
    ENTER(cuCtxGetDevice);
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (!r) *d = c->dev;
    unlock();
    return r;
}

/* Waits for every stream of the current context; returns (and clears) the
 * first sticky error among them. */
EXPORT CUresult cuCtxSynchronize(void) {
    ENTER(cuCtxSynchronize);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) {
        unlock();
        return r;
    }
    for (;;) {
        int pending = 0;
        for (size_t i = 0; i < G.streams.n; i++) {
            struct fc_stream *s = G.streams.v[i];
            if (s->ctx == c && s->head) pending = 1;
        }
        if (!pending) break;
        pthread_cond_wait(&G.done_cv, &G.mu);
    }
    for (size_t i = 0; i < G.streams.n; i++) {
        struct fc_stream *s = G.streams.v[i];
        if (s->ctx == c && s->sticky) {
            if (!r) r = s->sticky;
            s->sticky = CUDA_SUCCESS;
        }
    }
    unlock();
    return r;
}

/* ------------------------------------------------------------------------ */
/* Device memory (cuMemAlloc)                                                */
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

EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    ENTER(cuMemFree);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    r = CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < G.allocs.n; i++) {
        alloc_t *a = G.allocs.v[i];
        if (a->ptr != p) continue;
        vec_del(&G.allocs, i);
        /* Give the pages back. A copy still queued for it will find it gone. */
        fallocate(G.arena_fd[a->dev], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(a->ptr - arena_base(a->dev)), (off_t)a->span);
        G.used[a->dev] -= a->span;
        live_add(L_ALLOC, -1);
        log_event("free", a->size, a->dev);
        free(a);
        r = CUDA_SUCCESS;
        break;
    }
out:
    unlock();
    return r;
}

EXPORT CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    ENTER(cuMemGetInfo);
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (!r) {
        *free_bytes = G.mem - G.used[c->dev];
        *total = G.mem;
    }
    unlock();
    return r;
}

EXPORT CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p) {
    ENTER(cuPointerGetAttribute);
    if (!data) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    CUresult r = CUDA_SUCCESS;
    alloc_t *a = NULL;
    map_t *m = NULL;
    region_t *h = NULL;
    int dummy;
    if (in_arena(p, &dummy))
        a = find_alloc(p);
    else if (in_vmm(p))
        m = find_map(p);
    else
        h = find_region_covering((uintptr_t)p, 1);
    if (!a && !m && !h) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    CUdeviceptr start = 0;
    size_t size = 0;
    if (a) {
        start = a->ptr;
        size = a->size;
    } else if (m) { /* the extent of the cuMemMap call */
        start = m->va;
        for (size_t i = 0; i < G.maps.n; i++) {
            map_t *x = G.maps.v[i];
            if (x->map_id != m->map_id) continue;
            if (x->va < start) start = x->va;
            size += x->size;
        }
    } else {
        start = (uintptr_t)h->p;
        size = h->size;
    }
    switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
        if (m) r = CUDA_ERROR_NOT_SUPPORTED;
        else *(CUcontext *)data = a ? a->ctx : h->ctx;
        break;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *(unsigned *)data = h ? CU_MEMORYTYPE_HOST : CU_MEMORYTYPE_DEVICE;
        break;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
        *(CUdeviceptr *)data = p;
        break;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
        if (h) *(void **)data = (void *)(uintptr_t)p;
        else r = CUDA_ERROR_INVALID_VALUE;
        break;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        *(int *)data = a ? a->dev : m ? m->ph->dev : h->ctx->dev;
        break;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
        *(CUdeviceptr *)data = start;
        break;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
        *(size_t *)data = size;
        break;
    default:
        r = CUDA_ERROR_NOT_SUPPORTED;
    }
out:
    unlock();
    return r;
}

/* ------------------------------------------------------------------------ */
/* Host memory: registration and pinned allocations                          */
/* ------------------------------------------------------------------------ */

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
EXPORT CUresult cuMemHostRegister(void *p, size_t size, unsigned flags)
    __attribute__((alias("cuMemHostRegister_v2")));

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

static CUresult host_alloc(void **pp, size_t size, unsigned flags) {
    if (!pp || size == 0 || (flags & ~0x7u)) return CUDA_ERROR_INVALID_VALUE;
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

EXPORT CUresult cuMemHostAlloc(void **pp, size_t size, unsigned flags) {
    ENTER(cuMemHostAlloc);
    return host_alloc(pp, size, flags);
}

EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t size) {
    ENTER(cuMemAllocHost);
    return host_alloc(pp, size, 0);
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

/* ------------------------------------------------------------------------ */
/* Streams and events                                                        */
/* ------------------------------------------------------------------------ */

EXPORT CUresult cuStreamCreate(CUstream *ph, unsigned flags) {
    ENTER(cuStreamCreate);
    if (!ph || (flags & ~1u)) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    struct fc_stream *s = calloc(1, sizeof *s);
    if (!s || vec_push(&G.streams, s)) {
        free(s);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    s->ctx = c;
    s->flags = flags;
    s->live = 1;
    s->refs = 1;
    *ph = s;
out:
    unlock();
    return r;
}

/* Pending work still completes. */
EXPORT CUresult cuStreamDestroy_v2(CUstream h) {
    ENTER(cuStreamDestroy);
    NEED_INIT();
    if (!h || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) return CUDA_ERROR_INVALID_HANDLE;
    lock();
    struct fc_stream *s;
    CUresult r = stream_get(h, &s);
    if (!r) stream_kill(s);
    unlock();
    return r;
}
EXPORT CUresult cuStreamDestroy(CUstream h) __attribute__((alias("cuStreamDestroy_v2")));

EXPORT CUresult cuStreamSynchronize(CUstream h) {
    ENTER(cuStreamSynchronize);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    CUresult r = stream_get(h, &s);
    if (!r) r = stream_drain(s);
    unlock();
    return r;
}

EXPORT CUresult cuStreamQuery(CUstream h) {
    ENTER(cuStreamQuery);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    CUresult r = stream_get(h, &s);
    if (!r) {
        if (s->head) {
            r = CUDA_ERROR_NOT_READY;
        } else {
            r = s->sticky;
            s->sticky = CUDA_SUCCESS;
        }
    }
    unlock();
    return r;
}

EXPORT CUresult cuStreamWaitEvent(CUstream h, CUevent ev, unsigned flags) {
    ENTER(cuStreamWaitEvent);
    NEED_INIT();
    if (flags & ~1u) return CUDA_ERROR_INVALID_VALUE;
    lock();
    struct fc_stream *s;
    struct fc_event *e;
    CUresult r = stream_get(h, &s);
    if (r) goto out;
    if (!(e = event_get(ev))) {
        r = CUDA_ERROR_INVALID_HANDLE;
        goto out;
    }
    if (e->rec_id == 0) goto out; /* never recorded: nothing to wait for */
    if ((r = ensure_worker())) goto out;
    op_t *op = calloc(1, sizeof *op);
    if (!op) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    op->kind = OP_WAIT;
    op->ev = e;
    op->evid = e->rec_id;
    e->refs++;
    enqueue(s, op);
out:
    unlock();
    return r;
}

EXPORT CUresult cuEventCreate(CUevent *ph, unsigned flags) {
    ENTER(cuEventCreate);
    if (!ph || (flags & ~7u)) return CUDA_ERROR_INVALID_VALUE;
    if ((flags & CU_EVENT_INTERPROCESS) && !(flags & CU_EVENT_DISABLE_TIMING)) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    struct fc_event *e = calloc(1, sizeof *e);
    if (!e || vec_push(&G.events, e)) {
        free(e);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    e->ctx = c;
    e->flags = flags;
    e->live = 1;
    e->refs = 1;
    *ph = e;
out:
    unlock();
    return r;
}

EXPORT CUresult cuEventDestroy_v2(CUevent ev) {
    ENTER(cuEventDestroy);
    NEED_INIT();
    lock();
    struct fc_event *e = event_get(ev);
    if (e) event_kill(e);
    unlock();
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
EXPORT CUresult cuEventDestroy(CUevent ev) __attribute__((alias("cuEventDestroy_v2")));

EXPORT CUresult cuEventRecord(CUevent ev, CUstream h) {
    ENTER(cuEventRecord);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    struct fc_event *e = event_get(ev);
    CUresult r = e ? stream_get(h, &s) : CUDA_ERROR_INVALID_HANDLE;
    if (r) goto out;
    if (s->ctx != e->ctx) { /* the event and the stream must share a context */
        r = CUDA_ERROR_INVALID_HANDLE;
        goto out;
    }
    if ((r = ensure_worker())) goto out;
    op_t *op = calloc(1, sizeof *op);
    if (!op) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    op->kind = OP_RECORD;
    op->ev = e;
    op->evid = e->rec_id = ++G.next_id;
    e->refs++;
    if (e->rec_stream != s) {
        if (e->rec_stream) {
            e->rec_stream->refs--;
            stream_maybe_free(e->rec_stream);
        }
        e->rec_stream = s;
        s->refs++;
    }
    enqueue(s, op);
out:
    unlock();
    return r;
}

EXPORT CUresult cuEventQuery(CUevent ev) {
    ENTER(cuEventQuery);
    NEED_INIT();
    lock();
    struct fc_event *e = event_get(ev);
    CUresult r = !e ? CUDA_ERROR_INVALID_HANDLE : e->done_id < e->rec_id ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
    unlock();
    return r;
}

/* Waits for the last record; returns (and clears) the sticky error of the
 * stream it was recorded on. */
EXPORT CUresult cuEventSynchronize(CUevent ev) {
    ENTER(cuEventSynchronize);
    NEED_INIT();
    lock();
    struct fc_event *e = event_get(ev);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (e) {
        uint64_t target = e->rec_id;
        e->refs++;
        while (e->done_id < target) pthread_cond_wait(&G.done_cv, &G.mu);
        r = CUDA_SUCCESS;
        if (e->rec_stream) {
            r = e->rec_stream->sticky;
            e->rec_stream->sticky = CUDA_SUCCESS;
        }
        event_unref(e);
    }
    unlock();
    return r;
}

/* ------------------------------------------------------------------------ */
/* Copies                                                                    */
/* ------------------------------------------------------------------------ */

/* Synchronous: done when it returns. Does not wait for any stream. */
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    ENTER(cuMemcpyHtoD);
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r || n == 0) goto out;
    if (!src) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    if ((r = dev_range(dst, n, c->dev, CU_MEM_ACCESS_FLAGS_PROT_READWRITE))) goto out;
    if (safe_copy(shadow(dst), src, n)) r = CUDA_ERROR_INVALID_VALUE;
out:
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

/* Common checks of the asynchronous copies: context, stream (of the current
 * context), a device range that exists now (access is checked when the copy
 * runs, where a GPU would fault). */
static CUresult async_prologue(CUstream h, CUdeviceptr dptr, size_t n, struct fc_stream **s) {
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) return r;
    if ((r = stream_get(h, s))) return r;
    if ((*s)->ctx != c) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    if ((r = dev_range(dptr, n, c->dev, 0))) return r;
    return ensure_worker();
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream h) {
    ENTER(cuMemcpyHtoDAsync);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    CUresult r = async_prologue(h, dst, n, &s);
    if (r || n == 0) goto out;
    if (!src) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    op_t *op = calloc(1, sizeof *op);
    if (!op) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    op->kind = OP_HTOD;
    op->dptr = dst;
    op->host = (void *)src;
    op->n = n;
    region_t *x = find_region_covering((uintptr_t)src, n);
    if (x) {
        op->region = x->id; /* read when the copy runs */
    } else {
        /* Pageable: staged now, so the caller may reuse its buffer. */
        if (!(op->staged = malloc(n))) {
            r = CUDA_ERROR_OUT_OF_MEMORY;
        } else if (safe_copy(op->staged, src, n)) {
            r = CUDA_ERROR_INVALID_VALUE;
        }
    }
    if (r)
        op_free(op);
    else
        enqueue(s, op);
out:
    unlock();
    return r;
}

EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream h) {
    ENTER(cuMemcpyDtoHAsync);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    CUresult r = async_prologue(h, src, n, &s);
    if (r || n == 0) goto out;
    if (!dst) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    op_t *op = calloc(1, sizeof *op);
    if (!op) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    op->kind = OP_DTOH;
    op->dptr = src;
    op->host = dst;
    op->n = n;
    region_t *x = find_region_covering((uintptr_t)dst, n);
    if (x) op->region = x->id;
    enqueue(s, op);
    if (!x) {
        /* Into pageable memory the real driver returns only once the copy
         * is done (after the work queued before it on the stream). */
        uint64_t seq = op->seq;
        s->refs++;
        while (s->completed < seq) pthread_cond_wait(&G.done_cv, &G.mu);
        s->refs--;
        stream_maybe_free(s);
    }
out:
    unlock();
    return r;
}

/* ------------------------------------------------------------------------ */
/* Virtual memory management                                                 */
/* ------------------------------------------------------------------------ */

static CUresult check_location(const CUmemLocation *l) {
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

EXPORT CUresult cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop, CUmemGenericAllocationHandle h) {
    ENTER(cuMemGetAllocationPropertiesFromHandle);
    if (!prop) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    phys_t *p = find_handle(h);
    if (p) {
        memset(prop, 0, sizeof *prop);
        prop->type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop->requestedHandleTypes = (int)p->types;
        prop->location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop->location.id = p->dev;
    }
    unlock();
    return p ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

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

EXPORT CUresult cuMemGetAccess(unsigned long long *flags, const CUmemLocation *loc, CUdeviceptr ptr) {
    ENTER(cuMemGetAccess);
    if (!flags || !loc) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    CUresult r = check_location(loc);
    if (r) return r;
    lock();
    struct fc_ctx *c;
    if (!(r = need_ctx(&c))) {
        map_t *m = find_map(ptr);
        if (m)
            *flags = m->access[loc->id];
        else
            r = CUDA_ERROR_INVALID_VALUE;
    }
    unlock();
    return r;
}

EXPORT CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr) {
    ENTER(cuMemRetainAllocationHandle);
    if (!h) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (!r) {
        map_t *m = find_map((CUdeviceptr)(uintptr_t)addr);
        if (!m) {
            r = CUDA_ERROR_INVALID_VALUE;
        } else {
            /* The same handle (revived if it had been released). */
            if (m->ph->refs++ == 0) live_add(L_HANDLE, 1);
            *h = m->ph->handle;
        }
    }
    unlock();
    return r;
}
