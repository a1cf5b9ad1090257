/*
 * Self-test of the fakecuda test double (libcuda.so.1).
 *
 *   selftest LIBPATH [CASE]      CASE: one of the names in CASES (main.c), or
 *                                "all" (default): runs every case in its own
 *                                process (fork + exec of this program), or
 *                                "list": prints the case names.
 *
 * Each case sets its environment (FAKECUDA_*) and then dlopen()s LIBPATH,
 * because the library reads its configuration when it is loaded. Set
 * SELFTEST_VALGRIND=1 under valgrind: it skips the checks that fork and the
 * deliberate copies to/from unmapped memory (which valgrind reports).
 * Exit status 0 only if every check passed.
 *
 * Files: main.c (loading, checks, helpers, the case table), case_device.c
 * (devices, contexts, error names), case_memory.c (cuMemAlloc, host
 * registration, pinned memory), case_async.c (streams, events, late copies,
 * injected faults, threads), case_vmm.c (VMM and sharing between
 * processes), case_log.c (the resource log).
 */
#ifndef FAKECUDA_SELFTEST_H
#define FAKECUDA_SELFTEST_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* Driver API types and values (as in cuda.h). */
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    unsigned char allocFlags[8];
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;
typedef struct { char bytes[16]; } CUuuid;

enum {
    OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, NO_DEVICE = 100,
    INVALID_DEVICE = 101, INVALID_CONTEXT = 201, ALREADY_MAPPED = 208, INVALID_HANDLE = 400,
    ILLEGAL_ADDRESS = 700, ALREADY_REGISTERED = 712, NOT_REGISTERED = 713,
    LAUNCH_FAILED = 719, NOT_PERMITTED = 800, NOT_SUPPORTED = 801, UNKNOWN = 999,
};
#define MiB ((size_t)1 << 20)
#define GRAN (2 * MiB)

/* The driver API the library exports, each resolved with dlsym by load(). */
#define API(X)                                                                                   \
    X(cuInit, (unsigned))                                                                        \
    X(cuDeviceGetCount, (int *))                                                                 \
    X(cuDeviceGet, (CUdevice *, int))                                                            \
    X(cuDeviceGetAttribute, (int *, int, CUdevice))                                              \
    X(cuDeviceGetUuid, (CUuuid *, CUdevice))                                                     \
    X(cuDevicePrimaryCtxRetain, (CUcontext *, CUdevice))                                         \
    X(cuDevicePrimaryCtxRelease_v2, (CUdevice))                                                  \
    X(cuCtxPushCurrent_v2, (CUcontext))                                                          \
    X(cuCtxPopCurrent_v2, (CUcontext *))                                                         \
    X(cuMemAlloc_v2, (CUdeviceptr *, size_t))                                                    \
    X(cuMemFree_v2, (CUdeviceptr))                                                               \
    X(cuMemHostRegister_v2, (void *, size_t, unsigned))                                          \
    X(cuMemHostUnregister, (void *))                                                             \
    X(cuMemHostAlloc, (void **, size_t, unsigned))                                               \
    X(cuMemFreeHost, (void *))                                                                   \
    X(cuStreamCreate, (CUstream *, unsigned))                                                    \
    X(cuStreamDestroy_v2, (CUstream))                                                            \
    X(cuStreamSynchronize, (CUstream))                                                           \
    X(cuEventCreate, (CUevent *, unsigned))                                                      \
    X(cuEventDestroy_v2, (CUevent))                                                              \
    X(cuEventRecord, (CUevent, CUstream))                                                        \
    X(cuEventSynchronize, (CUevent))                                                             \
    X(cuMemcpyHtoDAsync_v2, (CUdeviceptr, const void *, size_t, CUstream))                       \
    X(cuMemcpyDtoH_v2, (void *, CUdeviceptr, size_t))                                            \
    X(cuGetErrorName, (CUresult, const char **))                                                 \
    X(cuGetErrorString, (CUresult, const char **))                                               \
    X(cuMemCreate, (CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,         \
                    unsigned long long))                                                         \
    X(cuMemRelease, (CUmemGenericAllocationHandle))                                              \
    X(cuMemAddressReserve, (CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long))     \
    X(cuMemAddressFree, (CUdeviceptr, size_t))                                                   \
    X(cuMemMap, (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long)) \
    X(cuMemUnmap, (CUdeviceptr, size_t))                                                         \
    X(cuMemSetAccess, (CUdeviceptr, size_t, const CUmemAccessDesc *, size_t))                    \
    X(cuMemGetAllocationGranularity, (size_t *, const CUmemAllocationProp *, int))               \
    X(cuMemExportToShareableHandle, (void *, CUmemGenericAllocationHandle, int, unsigned long long)) \
    X(cuMemImportFromShareableHandle, (CUmemGenericAllocationHandle *, void *, int))

#define X(name, args) extern CUresult(*name) args;
API(X)
#undef X

extern void *lib;
extern const char *g_case;
extern int g_fail;

/* Loads the library (after the case set its environment) and its API. */
void load(void);

void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *ename(CUresult r);

#define RC(call, want)                                                                          \
    do {                                                                                        \
        CUresult got_ = (call), want_ = (want);                                                 \
        check(got_ == want_, "%s -> %s%s%s", #call, ename(got_), got_ == want_ ? "" : ", wanted ", \
              got_ == want_ ? "" : ename(want_));                                               \
    } while (0)

/* Under valgrind: no fork()ed checks, and no deliberate copies to or from
 * unmapped memory (the library survives them; valgrind reports them). */
int under_valgrind(void);
static inline int no_fork(void) { return under_valgrind(); }

double now(void);
int all_eq(const void *p, size_t n, unsigned char v);
void *pages(size_t n, int prot);
void init_and_push(int dev);
/* Forks; the child runs fn and exits with its status. Returns the raw wait status. */
int in_child(void (*fn)(void *), void *arg);
void expect_segv(CUdeviceptr p, const char *what);

/* A synchronous host-to-device copy: on the current context's NULL stream,
 * then synchronized (the library has no cuMemcpyHtoD: the project does not
 * call it). Returns the first error. */
CUresult htod(CUdeviceptr dst, const void *src, size_t n);
/* Whether `size` bytes of device memory can be allocated now (freed again):
 * how the checks see what the device has left. */
CUresult can_alloc(size_t size);
/* FAKECUDA_MEM_MB as the library read it, in bytes. */
size_t mem_total(void);

void case_basic(void);
void case_visible(void);
void case_nodevice(void);
void case_memory(void);
void case_register(void);
void case_noreadonly(void);
void case_novmm(void);
void case_async(void);
void case_fail(void);
void case_threads(void);
void case_vmm(void);
void case_log(void);

#endif
