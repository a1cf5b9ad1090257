/*
 * fakecuda: a stand-in for the CUDA driver library (libcuda.so.1), for CI.
 * This is its one internal header; see README.md for what it does.
 *
 * It implements the driver calls ray-zerocopy makes (through cudarc), on
 * host memory, so that tests can drive every branch and fault of that code
 * on machines with no GPU and no CUDA toolkit. It is a TEST DOUBLE: nothing
 * measured with it says anything about a GPU.
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
 * Files, by concern: state.c (configuration, the tables, fork), device.c
 * (cuInit, devices, primary contexts), faults.c (FAKECUDA_FAIL and the error
 * names), log.c (FAKECUDA_LOG), memory.c (the device address space,
 * cuMemAlloc, synchronous copies), host.c (registration, pinned memory),
 * stream.c (streams, events, the worker, asynchronous copies), vmm.c and
 * vmm_map.c (cuMem* handles, reservations and mappings).
 *
 * Types and constant values are declared here (no CUDA headers); they match
 * cuda.h and cudarc 0.19's bindings (see the static assertions below).
 */
#ifndef FAKECUDA_H
#define FAKECUDA_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

/* Only the driver functions are exported; everything declared between the
 * visibility pragmas below stays inside the library, whatever the flags. */
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
    int type; /* CUmemLocationType */
    int id;   /* union { int id; struct { uchar, uchar } localized; } */
} CUmemLocation;

typedef struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
} CUmemAllocFlags;

typedef struct {
    int type;                 /* CUmemAllocationType */
    int requestedHandleTypes; /* CUmemAllocationHandleType (bit set) */
    CUmemLocation location;
    void *win32HandleMetaData;
    CUmemAllocFlags allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int flags; /* CUmemAccess_flags */
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

#define CU_MEMHOSTREGISTER_PORTABLE 0x01u
#define CU_MEMHOSTREGISTER_DEVICEMAP 0x02u
#define CU_MEMHOSTREGISTER_IOMEMORY 0x04u
#define CU_MEMHOSTREGISTER_READ_ONLY 0x08u
#define CU_MEMHOSTALLOC_ALL 0x07u /* PORTABLE | DEVICEMAP | WRITECOMBINED */

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
/* The exported functions and their default injected fault (FAKECUDA_FAIL)  */
/* ------------------------------------------------------------------------ */

/* Base names (without the _v2 suffix: cuMemAlloc and cuMemAlloc_v2 are one
 * function with one call counter) and the error an injected failure gives
 * when FAKECUDA_FAIL names none: out of memory for calls that allocate or
 * pin, not supported for VMM allocation and sharing, unknown otherwise.
 * Exactly the functions the project calls through cudarc: cudarc resolves
 * each symbol on its first call and panics if it is missing, so a function
 * the project starts to use must be added here and implemented. */
#define FC_FUNCS(X)                                                  \
    X(cuInit, CUDA_ERROR_UNKNOWN)                                    \
    X(cuDeviceGetCount, CUDA_ERROR_UNKNOWN)                          \
    X(cuDeviceGet, CUDA_ERROR_INVALID_DEVICE)                        \
    X(cuDeviceGetAttribute, CUDA_ERROR_UNKNOWN)                      \
    X(cuDeviceGetUuid, CUDA_ERROR_UNKNOWN)                           \
    X(cuDevicePrimaryCtxRetain, CUDA_ERROR_UNKNOWN)                  \
    X(cuDevicePrimaryCtxRelease, CUDA_ERROR_UNKNOWN)                 \
    X(cuCtxPushCurrent, CUDA_ERROR_UNKNOWN)                          \
    X(cuCtxPopCurrent, CUDA_ERROR_UNKNOWN)                           \
    X(cuMemAlloc, CUDA_ERROR_OUT_OF_MEMORY)                          \
    X(cuMemFree, CUDA_ERROR_UNKNOWN)                                 \
    X(cuMemHostRegister, CUDA_ERROR_OUT_OF_MEMORY)                   \
    X(cuMemHostUnregister, CUDA_ERROR_UNKNOWN)                       \
    X(cuMemHostAlloc, CUDA_ERROR_OUT_OF_MEMORY)                      \
    X(cuMemFreeHost, CUDA_ERROR_UNKNOWN)                             \
    X(cuStreamCreate, CUDA_ERROR_UNKNOWN)                            \
    X(cuStreamDestroy, CUDA_ERROR_UNKNOWN)                           \
    X(cuStreamSynchronize, CUDA_ERROR_UNKNOWN)                       \
    X(cuEventCreate, CUDA_ERROR_UNKNOWN)                             \
    X(cuEventDestroy, CUDA_ERROR_UNKNOWN)                            \
    X(cuEventRecord, CUDA_ERROR_UNKNOWN)                             \
    X(cuEventSynchronize, CUDA_ERROR_UNKNOWN)                        \
    X(cuMemcpyHtoDAsync, CUDA_ERROR_UNKNOWN)                         \
    X(cuMemcpyDtoH, CUDA_ERROR_UNKNOWN)                              \
    X(cuGetErrorName, CUDA_ERROR_INVALID_VALUE)                      \
    X(cuGetErrorString, CUDA_ERROR_INVALID_VALUE)                    \
    X(cuMemCreate, CUDA_ERROR_NOT_SUPPORTED)                         \
    X(cuMemRelease, CUDA_ERROR_UNKNOWN)                              \
    X(cuMemAddressReserve, CUDA_ERROR_OUT_OF_MEMORY)                 \
    X(cuMemAddressFree, CUDA_ERROR_UNKNOWN)                          \
    X(cuMemMap, CUDA_ERROR_UNKNOWN)                                  \
    X(cuMemUnmap, CUDA_ERROR_UNKNOWN)                                \
    X(cuMemSetAccess, CUDA_ERROR_UNKNOWN)                            \
    X(cuMemGetAllocationGranularity, CUDA_ERROR_UNKNOWN)             \
    X(cuMemExportToShareableHandle, CUDA_ERROR_NOT_SUPPORTED)        \
    X(cuMemImportFromShareableHandle, CUDA_ERROR_NOT_SUPPORTED)

enum {
#define X(name, err) FN_##name,
    FC_FUNCS(X)
#undef X
    FN_COUNT
};

#pragma GCC visibility push(hidden)

/* ------------------------------------------------------------------------ */
/* Faults and error names (faults.c)                                         */
/* ------------------------------------------------------------------------ */

/* Counts the call and says whether FAKECUDA_FAIL makes this one fail. */
CUresult fault_check(int fn);
/* Parses FAKECUDA_FAIL (at load); bad entries are reported and ignored. */
void faults_parse(const char *spec);
/* A forked child counts its calls from 1 again. */
void faults_reset_counts(void);

/* First thing in every exported function. */
#define ENTER(name)                                   \
    do {                                              \
        CUresult fault_ = fault_check(FN_##name);     \
        if (fault_ != CUDA_SUCCESS) return fault_;    \
    } while (0)

#define NEED_INIT()                                                          \
    do {                                                                     \
        if (!atomic_load(&G.initialized)) return CUDA_ERROR_NOT_INITIALIZED; \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Tables                                                                    */
/* ------------------------------------------------------------------------ */

#define MAXDEV 16
#define GRAN ((size_t)2 << 20) /* VMM granularity (minimum and recommended) */

/* A growable array of pointers; order is not kept on removal. */
typedef struct {
    void **v;
    size_t n, cap;
} vec_t;

int vec_push(vec_t *a, void *p);
void vec_remove(vec_t *a, void *p);
static inline void vec_del(vec_t *a, size_t i) { a->v[i] = a->v[--a->n]; }

enum { OP_HTOD, OP_RECORD };

typedef struct op {
    struct op *next;
    int kind;
    CUdeviceptr dptr;    /* copies: device side */
    const void *host;    /* copies: host side as given by the caller */
    size_t n;
    void *staged;        /* from pageable memory: the bytes, taken at issue */
    uint64_t region;     /* from pinned/registered memory: that region's id */
    struct fc_event *ev; /* record */
    uint64_t evid;
} op_t;

struct fc_stream {
    struct fc_ctx *ctx;
    int is_null;    /* the context's NULL stream (never handed out) */
    int live;       /* the handle is valid (not destroyed) */
    int refs;       /* handle + events recorded on it + threads waiting on it */
    int busy;       /* its head op is being executed */
    op_t *head, *tail;
    CUresult sticky; /* first asynchronous error, returned by the next sync */
};

struct fc_event {
    struct fc_ctx *ctx;
    int live;
    int refs;                 /* handle + queued ops naming it + waiters */
    uint64_t rec_id, done_id; /* complete when done_id >= rec_id */
    struct fc_stream *rec_stream;
};

struct fc_ctx {
    int dev;
    int refs; /* primary context retain count; 0: not active */
    struct fc_stream null_stream;
};

typedef struct {
    CUdeviceptr ptr;
    size_t size, span; /* requested, placed (page multiple) */
    int dev;
    struct fc_ctx *ctx;
} alloc_t;

typedef struct {
    uint64_t id;
    uintptr_t start, end; /* page-rounded extent */
    void *p;              /* as given (registration) or returned (pinned) */
    size_t size;
    unsigned flags;
    int pinned; /* 1: cuMemHostAlloc'd, 0: registered */
    struct fc_ctx *ctx;
} region_t;

typedef struct {
    CUmemGenericAllocationHandle handle;
    int dev, physdev;
    size_t size;
    int fd;
    unsigned types;
    int accounted; /* counted against this process's device memory */
    int refs;      /* handle references (create/import minus release) */
    int maps;      /* mapping records using it */
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

/* The process-wide state (state.c). Every field below `initialized` is
 * guarded by `mu`, except the configuration, written once at load. */
struct fc_state {
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* the worker waits here for work */
    pthread_cond_t done_cv; /* synchronizing threads wait here */
    atomic_int initialized;

    /* configuration, read when the library is loaded */
    int nphys;           /* FAKECUDA_DEVICES */
    int ndev;            /* visible (CUDA_VISIBLE_DEVICES) */
    int phys_of[MAXDEV]; /* ordinal -> physical index */
    size_t mem;          /* bytes per device */
    unsigned long delay_us;
    const char *gate;    /* FAKECUDA_COPY_GATE: copies to device d wait for "<gate>.<d>" */
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
};

extern struct fc_state G;
extern struct fc_ctx g_ctx[MAXDEV];

void lock(void);
void unlock(void);
void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static inline size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* ------------------------------------------------------------------------ */
/* Log (log.c)                                                               */
/* ------------------------------------------------------------------------ */

/* What the exit line counts as leaked. */
enum { L_ALLOC, L_HANDLE, L_REG, L_PINNED, L_MAP, L_COUNT };

void log_event(const char *op, unsigned long long bytes, int dev);
void live_add(int kind, long d);
/* A forked child holds nothing of its parent's. */
void live_reset(void);

/* ------------------------------------------------------------------------ */
/* Contexts (device.c)                                                       */
/* ------------------------------------------------------------------------ */

/* Under the lock: the calling thread's current context, if it is usable. */
CUresult need_ctx(struct fc_ctx **out);
CUresult check_dev(CUdevice d);

/* ------------------------------------------------------------------------ */
/* Device memory (memory.c)                                                  */
/* ------------------------------------------------------------------------ */

static inline void *shadow(CUdeviceptr p) { return (void *)(G.shadow_base + (uintptr_t)(p - G.va_base)); }

CUresult setup_va(void);
int new_arena_fd(int dev);
map_t *find_map(CUdeviceptr p);
CUresult dev_range(CUdeviceptr p, size_t n, int dev, int need);
void alloc_release(alloc_t *a);
int safe_copy(void *dst, const void *src, size_t n);

/* ------------------------------------------------------------------------ */
/* Host memory (host.c)                                                      */
/* ------------------------------------------------------------------------ */

region_t *find_region_covering(uintptr_t p, size_t n);
region_t *find_region_id(uint64_t id);
void region_drop(region_t *r);

/* ------------------------------------------------------------------------ */
/* Streams and events (stream.c)                                             */
/* ------------------------------------------------------------------------ */

void stream_kill(struct fc_stream *s);
void event_kill(struct fc_event *e);

/* ------------------------------------------------------------------------ */
/* Virtual memory management (vmm.c)                                         */
/* ------------------------------------------------------------------------ */

phys_t *find_handle(CUmemGenericAllocationHandle h);
void phys_maybe_free(phys_t *p);
CUresult check_location(const CUmemLocation *l);

#pragma GCC visibility pop

#endif
