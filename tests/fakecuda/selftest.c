/*
 * Self-test of the fakecuda test double (libcuda.so.1).
 *
 *   selftest LIBPATH [CASE]      CASE: one of the names in CASES below, or
 *                                "all" (default): runs every case in its own
 *                                process (fork + exec of this program), or
 *                                "list": prints the case names.
 *
 * Each case sets its environment (FAKECUDA_*) and then dlopen()s LIBPATH,
 * because the library reads its configuration when it is loaded. Set
 * SELFTEST_VALGRIND=1 under valgrind: it skips the checks that fork and the
 * deliberate copies to/from unmapped memory (which valgrind reports).
 * Exit status 0 only if every check passed.
 */
#define _GNU_SOURCE

#if defined(__PIC__) && !defined(__PIE__)
/* Built into the shared library by the `tests/fakecuda/ *.c` glob (-fPIC, not
 * an executable): this file contributes nothing there. */
typedef int fakecuda_selftest_is_not_part_of_the_library;
#else

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
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
    NOT_READY = 600, ILLEGAL_ADDRESS = 700, ALREADY_REGISTERED = 712, NOT_REGISTERED = 713,
    LAUNCH_FAILED = 719, NOT_PERMITTED = 800, NOT_SUPPORTED = 801, UNKNOWN = 999,
};
#define MiB ((size_t)1 << 20)
#define GRAN (2 * MiB)

/* ---- the API, resolved with dlsym ---- */
static CUresult (*cuInit)(unsigned);
static CUresult (*cuDriverGetVersion)(int *);
static CUresult (*cuDeviceGetCount)(int *);
static CUresult (*cuDeviceGet)(CUdevice *, int);
static CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice);
static CUresult (*cuDeviceGetName)(char *, int, CUdevice);
static CUresult (*cuDeviceTotalMem_v2)(size_t *, CUdevice);
static CUresult (*cuDeviceGetUuid)(CUuuid *, CUdevice);
static CUresult (*cuDeviceGetUuid_v2)(CUuuid *, CUdevice);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
static CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
static CUresult (*cuDevicePrimaryCtxRelease_v2)(CUdevice);
static CUresult (*cuDevicePrimaryCtxGetState)(CUdevice, unsigned *, int *);
static CUresult (*cuCtxPushCurrent_v2)(CUcontext);
static CUresult (*cuCtxPopCurrent_v2)(CUcontext *);
static CUresult (*cuCtxGetCurrent)(CUcontext *);
static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuCtxGetDevice)(CUdevice *);
static CUresult (*cuCtxSynchronize)(void);
static CUresult (*cuMemAlloc_v2)(CUdeviceptr *, size_t);
static CUresult (*cuMemFree_v2)(CUdeviceptr);
static CUresult (*cuMemGetInfo_v2)(size_t *, size_t *);
static CUresult (*cuMemHostRegister)(void *, size_t, unsigned);
static CUresult (*cuMemHostRegister_v2)(void *, size_t, unsigned);
static CUresult (*cuMemHostUnregister)(void *);
static CUresult (*cuMemHostAlloc)(void **, size_t, unsigned);
static CUresult (*cuMemAllocHost_v2)(void **, size_t);
static CUresult (*cuMemFreeHost)(void *);
static CUresult (*cuStreamCreate)(CUstream *, unsigned);
static CUresult (*cuStreamDestroy)(CUstream);
static CUresult (*cuStreamDestroy_v2)(CUstream);
static CUresult (*cuStreamSynchronize)(CUstream);
static CUresult (*cuStreamQuery)(CUstream);
static CUresult (*cuStreamWaitEvent)(CUstream, CUevent, unsigned);
static CUresult (*cuEventCreate)(CUevent *, unsigned);
static CUresult (*cuEventDestroy)(CUevent);
static CUresult (*cuEventDestroy_v2)(CUevent);
static CUresult (*cuEventRecord)(CUevent, CUstream);
static CUresult (*cuEventSynchronize)(CUevent);
static CUresult (*cuEventQuery)(CUevent);
static CUresult (*cuMemcpyHtoDAsync_v2)(CUdeviceptr, const void *, size_t, CUstream);
static CUresult (*cuMemcpyHtoD_v2)(CUdeviceptr, const void *, size_t);
static CUresult (*cuMemcpyDtoH_v2)(void *, CUdeviceptr, size_t);
static CUresult (*cuMemcpyDtoHAsync_v2)(void *, CUdeviceptr, size_t, CUstream);
static CUresult (*cuGetErrorName)(CUresult, const char **);
static CUresult (*cuGetErrorString)(CUresult, const char **);
static CUresult (*cuMemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                               unsigned long long);
static CUresult (*cuMemRelease)(CUmemGenericAllocationHandle);
static CUresult (*cuMemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
static CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
static CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
static CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
static CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
static CUresult (*cuMemGetAccess)(unsigned long long *, const CUmemLocation *, CUdeviceptr);
static CUresult (*cuMemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, int);
static CUresult (*cuMemExportToShareableHandle)(void *, CUmemGenericAllocationHandle, int, unsigned long long);
static CUresult (*cuMemImportFromShareableHandle)(CUmemGenericAllocationHandle *, void *, int);
static CUresult (*cuMemRetainAllocationHandle)(CUmemGenericAllocationHandle *, void *);
static CUresult (*cuMemGetAllocationPropertiesFromHandle)(CUmemAllocationProp *, CUmemGenericAllocationHandle);
static CUresult (*cuPointerGetAttribute)(void *, int, CUdeviceptr);

static void *lib;
static const char *lib_path;

static void load(void) {
    lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "cannot load %s: %s\n", lib_path, dlerror());
        exit(2);
    }
#define LOAD(f)                                                 \
    do {                                                        \
        *(void **)&f = dlsym(lib, #f);                          \
        if (!f) {                                               \
            fprintf(stderr, "missing symbol %s\n", #f);         \
            exit(2);                                            \
        }                                                       \
    } while (0)
    LOAD(cuInit); LOAD(cuDriverGetVersion); LOAD(cuDeviceGetCount); LOAD(cuDeviceGet);
    LOAD(cuDeviceGetAttribute); LOAD(cuDeviceGetName); LOAD(cuDeviceTotalMem_v2); LOAD(cuDeviceGetUuid);
    LOAD(cuDeviceGetUuid_v2); LOAD(cuDevicePrimaryCtxRetain); LOAD(cuDevicePrimaryCtxRelease);
    LOAD(cuDevicePrimaryCtxRelease_v2); LOAD(cuDevicePrimaryCtxGetState); LOAD(cuCtxPushCurrent_v2);
    LOAD(cuCtxPopCurrent_v2); LOAD(cuCtxGetCurrent); LOAD(cuCtxSetCurrent); LOAD(cuCtxGetDevice);
    LOAD(cuCtxSynchronize); LOAD(cuMemAlloc_v2); LOAD(cuMemFree_v2); LOAD(cuMemGetInfo_v2);
    LOAD(cuMemHostRegister); LOAD(cuMemHostRegister_v2); LOAD(cuMemHostUnregister); LOAD(cuMemHostAlloc);
    LOAD(cuMemAllocHost_v2); LOAD(cuMemFreeHost); LOAD(cuStreamCreate); LOAD(cuStreamDestroy);
    LOAD(cuStreamDestroy_v2); LOAD(cuStreamSynchronize); LOAD(cuStreamQuery); LOAD(cuStreamWaitEvent);
    LOAD(cuEventCreate); LOAD(cuEventDestroy); LOAD(cuEventDestroy_v2); LOAD(cuEventRecord);
    LOAD(cuEventSynchronize); LOAD(cuEventQuery); LOAD(cuMemcpyHtoDAsync_v2); LOAD(cuMemcpyHtoD_v2);
    LOAD(cuMemcpyDtoH_v2); LOAD(cuMemcpyDtoHAsync_v2); LOAD(cuGetErrorName); LOAD(cuGetErrorString);
    LOAD(cuMemCreate); LOAD(cuMemRelease); LOAD(cuMemAddressReserve); LOAD(cuMemAddressFree); LOAD(cuMemMap);
    LOAD(cuMemUnmap); LOAD(cuMemSetAccess); LOAD(cuMemGetAccess); LOAD(cuMemGetAllocationGranularity);
    LOAD(cuMemExportToShareableHandle); LOAD(cuMemImportFromShareableHandle);
    LOAD(cuMemRetainAllocationHandle); LOAD(cuMemGetAllocationPropertiesFromHandle);
    LOAD(cuPointerGetAttribute);
#undef LOAD
}

/* ---- checks ---- */
static const char *g_case = "?";
static int g_pass, g_fail;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s [%s] ", ok ? "ok  " : "FAIL", g_case);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
    if (ok)
        g_pass++;
    else
        g_fail++;
}

static const char *ename(CUresult r) {
    static char buf[8][48];
    static int k;
    const char *s = NULL;
    if (cuGetErrorName && cuGetErrorName(r, &s) == OK && s) return s;
    char *b = buf[k++ % 8];
    snprintf(b, 48, "error %d", r);
    return b;
}

#define RC(call, want)                                                                          \
    do {                                                                                        \
        CUresult got_ = (call), want_ = (want);                                                 \
        check(got_ == want_, "%s -> %s%s%s", #call, ename(got_), got_ == want_ ? "" : ", wanted ", \
              got_ == want_ ? "" : ename(want_));                                               \
    } while (0)

/* Under valgrind: no fork()ed checks, and no deliberate copies to or from
 * unmapped memory (the library survives them; valgrind reports them). */
static int under_valgrind(void) { return getenv("SELFTEST_VALGRIND") != NULL; }
static int no_fork(void) { return under_valgrind(); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int all_eq(const void *p, size_t n, unsigned char v) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != v) return 0;
    return 1;
}

static void *pages(size_t n, int prot) {
    void *p = mmap(NULL, n * 4096, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

static CUcontext ctx0;

static void init_and_push(int dev) {
    RC(cuInit(0), OK);
    RC(cuDevicePrimaryCtxRetain(&ctx0, dev), OK);
    RC(cuCtxPushCurrent_v2(ctx0), OK);
}

/* Forks; the child runs fn and exits with its status. Returns the raw wait status. */
static int in_child(void (*fn)(void *), void *arg) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        fn(arg);
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return st;
}

static void touch(void *arg) {
    volatile char c = *(volatile char *)arg;
    (void)c;
}

static void expect_segv(CUdeviceptr p, const char *what) {
    if (no_fork()) return;
    int st = in_child(touch, (void *)(uintptr_t)p);
    check(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "host dereference of %s dies of SIGSEGV (status 0x%x)",
          what, st);
}

/* ======================================================================== */

static void *other_thread_ctx(void *arg) {
    CUcontext c = (CUcontext)1;
    cuCtxGetCurrent(&c);
    *(CUcontext *)arg = c;
    return NULL;
}

static void case_basic(void) {
    setenv("FAKECUDA_DEVICES", "2", 1);
    const size_t want_total = under_valgrind() ? 256 * MiB : 4096 * MiB;
    load();
    int n = -1, v = 0;
    CUdeviceptr p;
    RC(cuDriverGetVersion(&v), OK);
    check(v == 13000, "driver version %d", v);
    RC(cuDeviceGetCount(&n), NOT_INITIALIZED);
    RC(cuMemAlloc_v2(&p, 16), NOT_INITIALIZED);
    RC(cuInit(1), INVALID_VALUE);
    RC(cuInit(0), OK);
    RC(cuInit(0), OK);
    RC(cuDeviceGetCount(&n), OK);
    check(n == 2, "FAKECUDA_DEVICES=2 gives %d devices", n);
    RC(cuDeviceGetCount(NULL), INVALID_VALUE);
    CUdevice d;
    RC(cuDeviceGet(&d, 1), OK);
    RC(cuDeviceGet(&d, 2), INVALID_DEVICE);
    RC(cuDeviceGet(&d, -1), INVALID_DEVICE);
    RC(cuDeviceGet(NULL, 0), INVALID_VALUE);
    int a;
    RC(cuDeviceGetAttribute(&a, 102, 0), OK);
    check(a == 1, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = %d", a);
    RC(cuDeviceGetAttribute(&a, 103, 0), OK);
    check(a == 1, "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = %d", a);
    RC(cuDeviceGetAttribute(&a, 113, 0), OK);
    check(a == 1, "READ_ONLY_HOST_REGISTER_SUPPORTED = %d", a);
    RC(cuDeviceGetAttribute(&a, 75, 0), OK);
    check(a == 9, "COMPUTE_CAPABILITY_MAJOR = %d", a);
    RC(cuDeviceGetAttribute(&a, 41, 0), OK);
    check(a == 1, "UNIFIED_ADDRESSING = %d", a);
    int b0, b1;
    cuDeviceGetAttribute(&b0, 33, 0);
    cuDeviceGetAttribute(&b1, 33, 1);
    check(b0 != b1, "PCI bus ids differ (%d, %d)", b0, b1);
    RC(cuDeviceGetAttribute(&a, 75, 5), INVALID_DEVICE);
    RC(cuDeviceGetAttribute(&a, 0, 0), INVALID_VALUE);
    RC(cuDeviceGetAttribute(NULL, 75, 0), INVALID_VALUE);
    char name[64];
    RC(cuDeviceGetName(name, sizeof name, 0), OK);
    check(strstr(name, "FakeCUDA") != NULL, "name '%s'", name);
    RC(cuDeviceGetName(NULL, 10, 0), INVALID_VALUE);
    size_t tm = 0;
    RC(cuDeviceTotalMem_v2(&tm, 0), OK);
    check(tm == want_total, "total memory %zu MiB (default 4096)", tm >> 20);
    CUuuid u0, u1, u0b;
    RC(cuDeviceGetUuid_v2(&u0, 0), OK);
    RC(cuDeviceGetUuid_v2(&u1, 1), OK);
    RC(cuDeviceGetUuid(&u0b, 0), OK);
    check(memcmp(u0.bytes, "FAKECUDA", 8) == 0 && u0.bytes[15] == 0 && u1.bytes[15] == 1,
          "UUIDs are fixed per device index");
    check(memcmp(&u0, &u0b, 16) == 0 && memcmp(&u0, &u1, 16) != 0, "cuDeviceGetUuid == _v2, devices differ");
    RC(cuDeviceGetUuid_v2(NULL, 0), INVALID_VALUE);

    /* contexts */
    CUcontext c = (CUcontext)1, c0, c0b, c1;
    RC(cuCtxGetCurrent(&c), OK);
    check(c == NULL, "no current context at start");
    RC(cuMemAlloc_v2(&p, 16), INVALID_CONTEXT);
    CUstream s;
    RC(cuStreamCreate(&s, 0), INVALID_CONTEXT);
    size_t fr, to;
    RC(cuMemGetInfo_v2(&fr, &to), INVALID_CONTEXT);
    RC(cuCtxGetDevice(&d), INVALID_CONTEXT);
    RC(cuCtxSynchronize(), INVALID_CONTEXT);
    RC(cuStreamSynchronize(NULL), INVALID_CONTEXT);
    RC(cuDevicePrimaryCtxRelease_v2(0), INVALID_CONTEXT);
    RC(cuDevicePrimaryCtxRetain(NULL, 0), INVALID_VALUE);
    RC(cuDevicePrimaryCtxRetain(&c0, 7), INVALID_DEVICE);
    unsigned fl;
    int active = 1;
    RC(cuDevicePrimaryCtxGetState(0, &fl, &active), OK);
    check(active == 0, "primary context inactive before retain");
    RC(cuDevicePrimaryCtxRetain(&c0, 0), OK);
    RC(cuDevicePrimaryCtxRetain(&c0b, 0), OK);
    check(c0 == c0b, "retain returns the same primary context");
    RC(cuDevicePrimaryCtxGetState(0, &fl, &active), OK);
    check(active == 1, "primary context active after retain");
    RC(cuDevicePrimaryCtxRetain(&c1, 1), OK);
    RC(cuCtxPushCurrent_v2(NULL), INVALID_VALUE);
    RC(cuCtxPushCurrent_v2((CUcontext)&n), INVALID_CONTEXT);
    RC(cuCtxPushCurrent_v2(c0), OK);
    RC(cuCtxGetCurrent(&c), OK);
    check(c == c0, "pushed context is current");
    RC(cuCtxGetDevice(&d), OK);
    check(d == 0, "cuCtxGetDevice = %d", d);
    pthread_t t;
    CUcontext seen = (CUcontext)1;
    pthread_create(&t, NULL, other_thread_ctx, &seen);
    pthread_join(t, NULL);
    check(seen == NULL, "another thread has no current context");
    RC(cuCtxPushCurrent_v2(c1), OK);
    RC(cuCtxGetDevice(&d), OK);
    check(d == 1, "after pushing device 1's context: %d", d);
    RC(cuCtxPopCurrent_v2(&c), OK);
    check(c == c1, "pop returns the top");
    RC(cuCtxGetDevice(&d), OK);
    check(d == 0, "after pop: device %d", d);
    RC(cuCtxPopCurrent_v2(NULL), OK);
    RC(cuCtxPopCurrent_v2(&c), INVALID_CONTEXT);
    RC(cuCtxSetCurrent(c1), OK);
    RC(cuCtxGetDevice(&d), OK);
    check(d == 1, "cuCtxSetCurrent: device %d", d);
    RC(cuCtxSetCurrent(c0), OK);
    RC(cuCtxGetDevice(&d), OK);
    check(d == 0, "cuCtxSetCurrent replaces the top: device %d", d);
    RC(cuCtxSetCurrent(NULL), OK);
    RC(cuCtxGetCurrent(&c), OK);
    check(c == NULL, "cuCtxSetCurrent(NULL) leaves none");

    /* the last release destroys the context and what it owns */
    RC(cuCtxPushCurrent_v2(c0), OK);
    RC(cuMemAlloc_v2(&p, 1 << 20), OK);
    RC(cuStreamCreate(&s, 1), OK);
    RC(cuDevicePrimaryCtxRelease_v2(0), OK);
    RC(cuMemAlloc_v2(&p, 16), OK); /* still one reference: works */
    RC(cuMemFree_v2(p), OK);
    RC(cuDevicePrimaryCtxRelease(0), OK); /* unversioned alias */
    RC(cuDevicePrimaryCtxGetState(0, &fl, &active), OK);
    check(active == 0, "released to zero: inactive");
    RC(cuMemAlloc_v2(&p, 16), INVALID_CONTEXT);
    RC(cuDevicePrimaryCtxRelease_v2(0), INVALID_CONTEXT);
    RC(cuDevicePrimaryCtxRetain(&c0, 0), OK);
    RC(cuMemGetInfo_v2(&fr, &to), OK);
    check(fr == to, "destroyed context's memory was freed (free %zu of %zu)", fr, to);
    RC(cuStreamSynchronize(s), INVALID_HANDLE);

    /* error strings */
    const char *str = NULL;
    RC(cuGetErrorName(OUT_OF_MEMORY, &str), OK);
    check(str && strcmp(str, "CUDA_ERROR_OUT_OF_MEMORY") == 0, "name of 2: %s", str);
    RC(cuGetErrorString(OUT_OF_MEMORY, &str), OK);
    check(str && strcmp(str, "out of memory") == 0, "text of 2: %s", str);
    RC(cuGetErrorName(ILLEGAL_ADDRESS, &str), OK);
    check(str && strcmp(str, "CUDA_ERROR_ILLEGAL_ADDRESS") == 0, "name of 700: %s", str);
    RC(cuGetErrorName(12345, &str), INVALID_VALUE);
    check(str == NULL, "unknown code: NULL name");
    RC(cuGetErrorString(OK, NULL), INVALID_VALUE);
}

static void case_visible(void) {
    setenv("FAKECUDA_DEVICES", "4", 1);
    setenv("CUDA_VISIBLE_DEVICES", "2,0", 1);
    load();
    int n = 0, bus;
    RC(cuInit(0), OK);
    RC(cuDeviceGetCount(&n), OK);
    check(n == 2, "CUDA_VISIBLE_DEVICES=2,0 of 4: %d devices", n);
    CUuuid u;
    RC(cuDeviceGetUuid_v2(&u, 0), OK);
    check(u.bytes[15] == 2, "ordinal 0 is physical device 2 (UUID)");
    RC(cuDeviceGetAttribute(&bus, 33, 1), OK);
    check(bus == 0x10, "ordinal 1 is physical device 0 (PCI bus 0x%x)", bus);
}

static void case_nodevice(void) {
    setenv("FAKECUDA_DEVICES", "0", 1);
    load();
    RC(cuInit(0), NO_DEVICE);
    int n;
    RC(cuDeviceGetCount(&n), NOT_INITIALIZED);
}

static void scribble_child(void *arg) {
    CUdeviceptr parents = *(CUdeviceptr *)arg, d;
    size_t fr, to;
    if (cuMemGetInfo_v2(&fr, &to) || fr != to) _exit(7); /* starts with nothing */
    if (cuMemFree_v2(parents) != INVALID_VALUE) _exit(8);  /* not its allocation */
    unsigned char junk[4096];
    memset(junk, 0xee, sizeof junk);
    if (cuMemAlloc_v2(&d, 1 << 20) || d != parents || cuMemcpyHtoD_v2(d, junk, sizeof junk)) _exit(9);
    _exit(0);
}

static void case_novmm(void) {
    setenv("FAKECUDA_NO_VMM", "1", 1);
    load();
    init_and_push(0);
    int a = 1;
    RC(cuDeviceGetAttribute(&a, 102, 0), OK);
    check(a == 0, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 0");
    RC(cuDeviceGetAttribute(&a, 103, 0), OK);
    check(a == 0, "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 0");
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = 1;
    prop.requestedHandleTypes = 1;
    prop.location.type = 1;
    size_t g;
    CUmemGenericAllocationHandle h;
    RC(cuMemGetAllocationGranularity(&g, &prop, 0), NOT_SUPPORTED);
    RC(cuMemCreate(&h, GRAN, &prop, 0), NOT_SUPPORTED);
}

static void case_memory(void) {
    setenv("FAKECUDA_MEM_MB", "64", 1);
    load();
    init_and_push(0);
    CUdeviceptr p1, p2, p3;
    size_t fr, to;
    RC(cuMemAlloc_v2(NULL, 16), INVALID_VALUE);
    RC(cuMemAlloc_v2(&p1, 0), INVALID_VALUE);
    RC(cuMemAlloc_v2(&p1, 1000), OK);
    RC(cuMemAlloc_v2(&p2, 10 * MiB), OK);
    check(p1 % 512 == 0 && p2 % 512 == 0, "pointers are 512-byte aligned (%#llx, %#llx)", p1, p2);
    check(p1 + 1000 <= p2 || p2 + 10 * MiB <= p1, "allocations do not overlap");
    RC(cuMemGetInfo_v2(&fr, &to), OK);
    check(to == 64 * MiB && fr == to - 4096 - 10 * MiB, "mem info: free %zu of %zu", fr, to);
    RC(cuMemGetInfo_v2(NULL, &to), INVALID_VALUE);
    RC(cuMemAlloc_v2(&p3, 60 * MiB), OUT_OF_MEMORY);
    RC(cuMemFree_v2(p2), OK);
    RC(cuMemAlloc_v2(&p3, 60 * MiB), OK);
    RC(cuMemAlloc_v2(&p2, 4 * MiB), OUT_OF_MEMORY);
    RC(cuMemFree_v2(p3), OK);
    RC(cuMemFree_v2(p1 + 512), INVALID_VALUE);
    RC(cuMemFree_v2(0), INVALID_VALUE);
    RC(cuMemFree_v2(p1), OK);
    RC(cuMemFree_v2(p1), INVALID_VALUE);
    RC(cuMemGetInfo_v2(&fr, &to), OK);
    check(fr == to, "all freed: free %zu of %zu", fr, to);

    /* synchronous copies */
    size_t n = 1 << 20;
    unsigned char *h = malloc(n), *back = malloc(n);
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 7);
    CUdeviceptr d;
    RC(cuMemAlloc_v2(&d, n), OK);
    RC(cuMemcpyHtoD_v2(d, h, n), OK);
    memset(back, 0, n);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(memcmp(h, back, n) == 0, "HtoD then DtoH gives the bytes back");
    RC(cuMemcpyDtoH_v2(back, d + 4096, 100), OK);
    check(memcmp(back, h + 4096, 100) == 0, "DtoH at an offset");
    RC(cuMemcpyHtoD_v2(d + n - 10, h, 11), INVALID_VALUE);
    RC(cuMemcpyDtoH_v2(back, d + n, 1), INVALID_VALUE);
    RC(cuMemcpyHtoD_v2((CUdeviceptr)(uintptr_t)back, h, 10), INVALID_VALUE);
    RC(cuMemcpyDtoH_v2(NULL, d, 10), INVALID_VALUE);
    RC(cuMemcpyHtoD_v2(d, NULL, 10), INVALID_VALUE);
    if (!under_valgrind()) {
        void *gone = pages(1, PROT_READ | PROT_WRITE);
        munmap(gone, 4096);
        RC(cuMemcpyDtoH_v2(gone, d, 100), INVALID_VALUE);
        RC(cuMemcpyHtoD_v2(d, gone, 100), INVALID_VALUE);
    }
    RC(cuMemcpyHtoD_v2(d, h, 0), OK);

    /* pointer attributes */
    int ord = -1;
    CUdeviceptr start = 0;
    size_t size = 0;
    unsigned mt = 0;
    RC(cuPointerGetAttribute(&ord, 9, d + 100), OK);
    RC(cuPointerGetAttribute(&start, 11, d + 100), OK);
    RC(cuPointerGetAttribute(&size, 12, d + 100), OK);
    RC(cuPointerGetAttribute(&mt, 2, d + 100), OK);
    check(ord == 0 && start == d && size == n && mt == 2, "pointer attributes: dev %d, range %#llx+%zu, type %u",
          ord, start, size, mt);
    RC(cuPointerGetAttribute(&ord, 9, (CUdeviceptr)(uintptr_t)h), INVALID_VALUE);
    RC(cuPointerGetAttribute(NULL, 9, d), INVALID_VALUE);

    expect_segv(d, "a cuMemAlloc pointer");
    if (!no_fork()) {
        /* the child's allocations land at the parent's addresses; writing
         * them must not change the parent's device memory */
        int st = in_child(scribble_child, &d);
        check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "forked child allocated and wrote (0x%x)", st);
        RC(cuMemcpyDtoH_v2(back, d, n), OK);
        check(memcmp(h, back, n) == 0, "the parent's device memory is untouched by the child");
    }
    RC(cuMemFree_v2(d), OK);
    free(h);
    free(back);
}

static void case_register(void) {
    load();
    init_and_push(0);
    int a = 0;
    RC(cuDeviceGetAttribute(&a, 113, 0), OK);
    check(a == 1, "READ_ONLY_HOST_REGISTER_SUPPORTED = 1 by default");
    char *buf = pages(16, PROT_READ | PROT_WRITE);
    RC(cuMemHostRegister_v2(buf, 4 * 4096, 0), OK);
    RC(cuMemHostRegister_v2(buf + 2 * 4096, 4 * 4096, 0), ALREADY_REGISTERED);
    RC(cuMemHostRegister_v2(buf + 3 * 4096 + 100, 10, 0), ALREADY_REGISTERED);
    RC(cuMemHostRegister_v2(buf + 4 * 4096 + 100, 10, 0), OK);
    RC(cuMemHostRegister_v2(buf + 4 * 4096 + 200, 10, 0), ALREADY_REGISTERED); /* same page */
    RC(cuMemHostUnregister(buf + 4 * 4096 + 200), NOT_REGISTERED);
    RC(cuMemHostUnregister(buf + 4 * 4096 + 100), OK);
    RC(cuMemHostUnregister(buf + 1), NOT_REGISTERED);
    unsigned mt = 0;
    RC(cuPointerGetAttribute(&mt, 2, (CUdeviceptr)(uintptr_t)(buf + 10)), OK);
    check(mt == 1, "registered memory is host memory (type %u)", mt);
    RC(cuMemHostUnregister(buf), OK);
    RC(cuMemHostUnregister(buf), NOT_REGISTERED);
    RC(cuMemHostRegister(buf, 4096, 1), OK); /* unversioned alias */
    RC(cuMemHostUnregister(buf), OK);
    RC(cuMemHostRegister_v2(NULL, 4096, 0), INVALID_VALUE);
    RC(cuMemHostRegister_v2(buf, 0, 0), INVALID_VALUE);
    RC(cuMemHostRegister_v2(buf, 4096, 0x100), INVALID_VALUE);

    char *hole = pages(3, PROT_READ | PROT_WRITE);
    munmap(hole + 4096, 4096);
    RC(cuMemHostRegister_v2(hole, 3 * 4096, 0), INVALID_VALUE);
    RC(cuMemHostRegister_v2(hole, 4096, 0), OK);
    RC(cuMemHostUnregister(hole), OK);

    char *ro = pages(2, PROT_READ);
    RC(cuMemHostRegister_v2(ro, 2 * 4096, 0), INVALID_VALUE);
    RC(cuMemHostRegister_v2(ro, 2 * 4096, 8), OK);
    RC(cuMemHostUnregister(ro), OK);
    char *none = pages(1, PROT_NONE);
    RC(cuMemHostRegister_v2(none, 4096, 8), INVALID_VALUE);
    CUdeviceptr d;
    RC(cuMemAlloc_v2(&d, 4096), OK);
    RC(cuMemHostRegister_v2((void *)(uintptr_t)d, 4096, 8), INVALID_VALUE);
    RC(cuMemFree_v2(d), OK);

    /* pinned host memory */
    void *hp = NULL, *hp2 = NULL;
    RC(cuMemHostAlloc(&hp, 10000, 0), OK);
    memset(hp, 0x5a, 10000);
    check(all_eq(hp, 10000, 0x5a), "pinned memory is writable host memory");
    RC(cuMemHostRegister_v2((char *)hp + 4096, 100, 0), ALREADY_REGISTERED);
    RC(cuMemFreeHost((char *)hp + 8), INVALID_VALUE);
    RC(cuMemFreeHost(hp), OK);
    RC(cuMemFreeHost(hp), INVALID_VALUE);
    RC(cuMemAllocHost_v2(&hp2, 100), OK);
    RC(cuMemFreeHost(hp2), OK);
    RC(cuMemHostAlloc(NULL, 100, 0), INVALID_VALUE);
    RC(cuMemHostAlloc(&hp, 100, 0x80), INVALID_VALUE);

    CUcontext c;
    RC(cuCtxPopCurrent_v2(&c), OK);
    RC(cuMemHostRegister_v2(buf, 4096, 0), INVALID_CONTEXT);
    RC(cuMemHostAlloc(&hp, 100, 0), INVALID_CONTEXT);
}

static void case_noreadonly(void) {
    setenv("FAKECUDA_NO_READONLY_REGISTER", "1", 1);
    load();
    init_and_push(0);
    int a = 1;
    RC(cuDeviceGetAttribute(&a, 113, 0), OK);
    check(a == 0, "READ_ONLY_HOST_REGISTER_SUPPORTED = 0");
    char *ro = pages(2, PROT_READ), *rw = pages(2, PROT_READ | PROT_WRITE);
    RC(cuMemHostRegister_v2(ro, 4096, 8), NOT_SUPPORTED);
    RC(cuMemHostRegister_v2(rw, 4096, 8), NOT_SUPPORTED);
    RC(cuMemHostRegister_v2(ro, 4096, 0), INVALID_VALUE);
    RC(cuMemHostRegister_v2(rw, 4096, 0), OK);
    RC(cuMemHostUnregister(rw), OK);
}

/* ======================================================================== */

#define DELAY_US 200000

static void case_async(void) {
    char us[32];
    snprintf(us, sizeof us, "%d", DELAY_US);
    setenv("FAKECUDA_COPY_DELAY_US", us, 1);
    setenv("FAKECUDA_DEVICES", "2", 1);
    setenv("FAKECUDA_MEM_MB", "256", 1);
    load();
    init_and_push(0);
    const size_t n = 64 * 1024;
    CUdeviceptr d;
    RC(cuMemAlloc_v2(&d, n), OK);
    unsigned char *zero = calloc(1, n), *back = malloc(n);
    RC(cuMemcpyHtoD_v2(d, zero, n), OK);
    CUstream s;
    RC(cuStreamCreate(&s, 1), OK);
    RC(cuStreamCreate(&s, 4), INVALID_VALUE);
    RC(cuStreamCreate(&s, 1), OK);

    /* registered source: late, read when the copy runs */
    unsigned char *src = pages(n / 4096, PROT_READ | PROT_WRITE);
    memset(src, 0xa1, n);
    RC(cuMemHostRegister_v2(src, n, 0), OK);
    double t0 = now();
    RC(cuMemcpyHtoDAsync_v2(d, src, n, s), OK);
    check(now() - t0 < DELAY_US * 1e-6 / 2, "async copy returns before it is done (%.3f s)", now() - t0);
    RC(cuStreamQuery(s), NOT_READY);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0), "DtoH before synchronize sees the old bytes");
    RC(cuStreamSynchronize(s), OK);
    check(now() - t0 >= DELAY_US * 1e-6 * 0.9, "synchronize waited for the copy (%.3f s)", now() - t0);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0xa1), "after synchronize: the new bytes");
    RC(cuStreamQuery(s), OK);

    /* pinned source: read when the copy runs */
    unsigned char *pin;
    RC(cuMemHostAlloc((void **)&pin, n, 0), OK);
    memset(pin, 0xb2, n);
    RC(cuMemcpyHtoDAsync_v2(d, pin, n, s), OK);
    memset(pin, 0xc3, n);
    RC(cuStreamSynchronize(s), OK);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0xc3), "pinned source changed before the copy ran: the device has the change");

    /* pageable source: staged when issued */
    unsigned char *pg = malloc(n);
    memset(pg, 0xd4, n);
    RC(cuMemcpyHtoDAsync_v2(d, pg, n, s), OK);
    memset(pg, 0xe5, n);
    RC(cuStreamSynchronize(s), OK);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0xd4), "pageable source changed after the call: the device has the original");

    /* unregistered / freed before the copy ran: sticky error, copy skipped */
    memset(src, 0x77, n);
    RC(cuMemcpyHtoDAsync_v2(d, src, n, s), OK);
    RC(cuMemHostUnregister(src), OK);
    RC(cuStreamSynchronize(s), ILLEGAL_ADDRESS);
    RC(cuStreamSynchronize(s), OK);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0xd4), "the failed copy did not write");
    RC(cuMemcpyHtoDAsync_v2(d, pin, n, s), OK);
    RC(cuMemFreeHost(pin), OK);
    RC(cuStreamSynchronize(s), ILLEGAL_ADDRESS);
    RC(cuMemcpyHtoDAsync_v2(d, pg, n, s), OK);
    CUdeviceptr d2;
    RC(cuMemAlloc_v2(&d2, n), OK);
    RC(cuMemcpyHtoDAsync_v2(d2, pg, n, s), OK);
    RC(cuMemFree_v2(d2), OK);
    RC(cuCtxSynchronize(), ILLEGAL_ADDRESS); /* device memory freed under a queued copy */
    RC(cuCtxSynchronize(), OK);

    /* events */
    unsigned char *p1, *p2, *out;
    RC(cuMemHostAlloc((void **)&p1, n, 0), OK);
    RC(cuMemHostAlloc((void **)&p2, n, 0), OK);
    RC(cuMemHostAlloc((void **)&out, n, 0), OK);
    CUevent ev, never;
    RC(cuEventCreate(&ev, 2), OK);
    RC(cuEventCreate(&never, 0), OK);
    RC(cuEventCreate(&ev, 0x10), INVALID_VALUE);
    RC(cuEventCreate(&ev, 2), OK);
    RC(cuEventSynchronize(never), OK);
    RC(cuEventQuery(never), OK);
    memset(p1, 0x11, n);
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, s), OK);
    RC(cuEventRecord(ev, s), OK);
    RC(cuEventQuery(ev), NOT_READY);
    RC(cuEventSynchronize(ev), OK);
    RC(cuEventQuery(ev), OK);

    /* cuStreamWaitEvent orders across streams */
    CUstream a, b;
    RC(cuStreamCreate(&a, 1), OK);
    RC(cuStreamCreate(&b, 1), OK);
    memset(p1, 0x99, n);
    memset(p2, 0x22, n);
    memset(out, 0, n);
    /* the worker is busy with the first copy while b's work is queued and
     * would take b's turn next, were b not waiting */
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, a), OK);
    RC(cuEventRecord(never, a), OK); /* one more op on a: b's copy would come first */
    RC(cuMemcpyHtoDAsync_v2(d, p2, n, a), OK);
    RC(cuEventRecord(ev, a), OK);
    RC(cuStreamWaitEvent(b, ev, 0), OK);
    RC(cuMemcpyDtoHAsync_v2(out, d, n, b), OK);
    RC(cuStreamQuery(b), NOT_READY);
    RC(cuStreamSynchronize(b), OK);
    check(all_eq(out, n, 0x22), "stream b waited for stream a's copy");
    RC(cuStreamWaitEvent(b, ev, 4), INVALID_VALUE);

    /* one stream runs in order */
    memset(p1, 0x33, n);
    memset(p2, 0x44, n);
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, a), OK);
    RC(cuMemcpyHtoDAsync_v2(d, p2, n, a), OK);
    RC(cuStreamSynchronize(a), OK);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0x44), "two copies on one stream: the last wins");

    /* DtoH into pageable memory returns when done (after earlier work) */
    memset(p1, 0x55, n);
    memset(back, 0, n);
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, a), OK);
    RC(cuMemcpyDtoHAsync_v2(back, d, n, a), OK);
    check(all_eq(back, n, 0x55), "DtoHAsync into pageable memory is complete on return");

    /* destroying a stream / event with pending work */
    CUstream c;
    RC(cuStreamCreate(&c, 0), OK);
    memset(p1, 0x66, n);
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, c), OK);
    RC(cuEventRecord(ev, c), OK);
    RC(cuStreamDestroy_v2(c), OK);
    RC(cuEventDestroy_v2(ev), OK);
    RC(cuStreamQuery(c), INVALID_HANDLE);
    RC(cuEventQuery(ev), INVALID_HANDLE);
    RC(cuStreamDestroy_v2(c), INVALID_HANDLE);
    RC(cuCtxSynchronize(), OK);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0x66), "work of a destroyed stream still completed");

    /* the NULL stream */
    memset(p1, 0x88, n);
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, NULL), OK);
    RC(cuStreamQuery(NULL), NOT_READY);
    RC(cuStreamSynchronize(NULL), OK);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(all_eq(back, n, 0x88), "copy on the NULL stream");

    /* issue-time errors */
    RC(cuMemcpyHtoDAsync_v2(d + 1, p1, n, a), INVALID_VALUE);
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, (CUstream)p1), INVALID_HANDLE);
    if (!under_valgrind()) {
        void *gone = pages(1, PROT_READ | PROT_WRITE);
        munmap(gone, 4096);
        RC(cuMemcpyHtoDAsync_v2(d, gone, 100, a), INVALID_VALUE);
    }
    CUcontext c1, popped;
    CUstream s1;
    CUevent e1;
    RC(cuDevicePrimaryCtxRetain(&c1, 1), OK);
    RC(cuCtxPushCurrent_v2(c1), OK);
    RC(cuStreamCreate(&s1, 1), OK);
    RC(cuEventCreate(&e1, 0), OK);
    RC(cuCtxPopCurrent_v2(&popped), OK);
    RC(cuMemcpyHtoDAsync_v2(d, p1, n, s1), INVALID_HANDLE); /* stream of another context */
    RC(cuEventRecord(e1, s), INVALID_HANDLE);
    RC(cuStreamDestroy(s1), OK); /* unversioned alias; no context needed */
    RC(cuEventDestroy(e1), OK);
    RC(cuStreamDestroy_v2(a), OK);
    RC(cuStreamDestroy_v2(b), OK);
    RC(cuStreamDestroy_v2(s), OK);
    RC(cuEventDestroy_v2(never), OK);
    RC(cuMemFreeHost(p1), OK);
    RC(cuMemFreeHost(p2), OK);
    RC(cuMemFreeHost(out), OK);
    RC(cuMemFree_v2(d), OK);
    free(zero);
    free(back);
    free(pg);
}

/* ======================================================================== */

static void case_fail(void) {
    setenv("FAKECUDA_FAIL",
           "cuMemAlloc@2, cuStreamSynchronize@1=CUDA_ERROR_LAUNCH_FAILED,cuMemHostRegister_v2=CUDA_ERROR_NOT_PERMITTED,"
           "cuMemcpyHtoDAsync_v2@2,cuMemCreate,bogus@1,cuMemFree=CUDA_ERROR_NOPE,cuMemFree_v2@x,cuMemFree@0",
           1);
    /* The library reports bad entries while it loads: catch its stderr. */
    fflush(stderr);
    FILE *tmp = tmpfile();
    int saved = dup(2);
    dup2(fileno(tmp), 2);
    load();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char msg[4096] = "";
    rewind(tmp);
    size_t k = fread(msg, 1, sizeof msg - 1, tmp);
    msg[k] = 0;
    fclose(tmp);
    check(strstr(msg, "'bogus@1'") && strstr(msg, "CUDA_ERROR_NOPE") && strstr(msg, "@x") && strstr(msg, "@0"),
          "malformed FAKECUDA_FAIL entries are reported");
    fputs(msg, stdout);
    init_and_push(0);
    CUdeviceptr p1, p2, p3;
    RC(cuMemAlloc_v2(&p1, 4096), OK);
    RC(cuMemAlloc_v2(&p2, 4096), OUT_OF_MEMORY); /* @2, default error */
    RC(cuMemAlloc_v2(&p3, 4096), OK);
    RC(cuMemFree_v2(p1), OK); /* its entries were all ignored */
    RC(cuMemFree_v2(p3), OK);
    char *buf = pages(1, PROT_READ | PROT_WRITE);
    RC(cuMemHostRegister_v2(buf, 4096, 0), NOT_PERMITTED);
    RC(cuMemHostRegister(buf, 4096, 0), NOT_PERMITTED); /* every call, both names */
    CUstream s;
    RC(cuStreamCreate(&s, 1), OK);
    CUdeviceptr d;
    RC(cuMemAlloc_v2(&d, 4096), OK);
    RC(cuMemcpyHtoDAsync_v2(d, buf, 4096, s), OK);
    RC(cuMemcpyHtoDAsync_v2(d, buf, 4096, s), UNKNOWN);
    RC(cuMemcpyHtoDAsync_v2(d, buf, 4096, s), OK);
    RC(cuStreamSynchronize(s), LAUNCH_FAILED);
    RC(cuStreamSynchronize(s), OK);
    CUmemGenericAllocationHandle h;
    CUmemAllocationProp prop = {.type = 1, .requestedHandleTypes = 1, .location = {1, 0}};
    RC(cuMemCreate(&h, GRAN, &prop, 0), NOT_SUPPORTED);
}

/* ======================================================================== */

static int send_fd(int sock, int fd) {
    char byte = 'F';
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &m, 0) == 1 ? 0 : -1;
}

static int recv_fd(int sock) {
    char byte;
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    if (recvmsg(sock, &m, 0) != 1) return -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (!c || c->cmsg_type != SCM_RIGHTS) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static void say(int sock, char c) {
    if (write(sock, &c, 1) != 1) exit(3);
}
static char hear(int sock) {
    char c = 0;
    if (read(sock, &c, 1) != 1) return 0;
    return c;
}

static CUmemAllocationProp vmm_prop(int types) {
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = 1;
    p.requestedHandleTypes = types;
    p.location.type = 1;
    p.location.id = 0;
    return p;
}

static void set_access(CUdeviceptr va, size_t size, int flags) {
    CUmemAccessDesc a = {{1, 0}, flags};
    RC(cuMemSetAccess(va, size, &a, 1), OK);
}

/* The exporting process: creates, exports, maps, writes, releases, exits. */
static void vmm_child(void *arg) {
    int sock = *(int *)arg;
    g_case = "vmm/child";
    CUmemAllocationProp prop = vmm_prop(1);
    CUmemGenericAllocationHandle h;
    RC(cuMemCreate(&h, 4 * MiB, &prop, 0), OK);
    int fd = -1;
    RC(cuMemExportToShareableHandle(&fd, h, 1, 0), OK);
    check(fd >= 0 && send_fd(sock, fd) == 0, "child sent the exported fd");
    close(fd);
    CUdeviceptr va;
    RC(cuMemAddressReserve(&va, 4 * MiB, 0, 0, 0), OK);
    RC(cuMemMap(va, 4 * MiB, 0, h, 0), OK);
    set_access(va, 4 * MiB, 3);
    check(hear(sock) == 'M', "child: parent mapped it");
    unsigned char *pat = malloc(4 * MiB);
    for (size_t i = 0; i < 4 * MiB; i++) pat[i] = (unsigned char)(i * 13 + 1);
    CUstream s;
    RC(cuStreamCreate(&s, 1), OK);
    RC(cuMemcpyHtoDAsync_v2(va, pat, 4 * MiB, s), OK);
    RC(cuStreamSynchronize(s), OK);
    RC(cuStreamDestroy_v2(s), OK);
    /* everything released before the parent reads */
    RC(cuMemRelease(h), OK);
    RC(cuMemUnmap(va, 4 * MiB), OK);
    RC(cuMemAddressFree(va, 4 * MiB), OK);
    say(sock, 'W');
    free(pat);
    _exit(g_fail ? 1 : 0);
}

static void case_vmm(void) {
    setenv("FAKECUDA_MEM_MB", "64", 1);
    load();
    init_and_push(0);
    CUmemAllocationProp prop = vmm_prop(1), plain = vmm_prop(0), bad;
    size_t g = 0;
    RC(cuMemGetAllocationGranularity(&g, &prop, 0), OK);
    check(g == GRAN, "minimum granularity %zu", g);
    RC(cuMemGetAllocationGranularity(&g, &prop, 1), OK);
    check(g == GRAN, "recommended granularity %zu", g);
    RC(cuMemGetAllocationGranularity(&g, &prop, 2), INVALID_VALUE);
    RC(cuMemGetAllocationGranularity(NULL, &prop, 0), INVALID_VALUE);
    CUmemGenericAllocationHandle h, h2, hx;
    RC(cuMemCreate(&h, MiB, &prop, 0), INVALID_VALUE);
    RC(cuMemCreate(&h, 128 * MiB, &prop, 0), OUT_OF_MEMORY);
    bad = prop;
    bad.type = 2;
    RC(cuMemCreate(&h, GRAN, &bad, 0), INVALID_VALUE);
    bad = prop;
    bad.location.id = 3;
    RC(cuMemCreate(&h, GRAN, &bad, 0), INVALID_DEVICE);
    bad = prop;
    bad.requestedHandleTypes = 8;
    RC(cuMemCreate(&h, GRAN, &bad, 0), NOT_SUPPORTED);
    RC(cuMemCreate(NULL, GRAN, &prop, 0), INVALID_VALUE);
    size_t fr0, fr, to;
    RC(cuMemGetInfo_v2(&fr0, &to), OK);
    RC(cuMemCreate(&h, 4 * MiB, &prop, 0), OK);
    RC(cuMemGetInfo_v2(&fr, &to), OK);
    check(fr0 - fr == 4 * MiB, "cuMemCreate is counted against device memory (%zu)", fr0 - fr);
    CUmemAllocationProp got;
    RC(cuMemGetAllocationPropertiesFromHandle(&got, h), OK);
    check(got.type == 1 && got.requestedHandleTypes == 1 && got.location.type == 1 && got.location.id == 0,
          "allocation properties from the handle");

    CUdeviceptr va, va2;
    RC(cuMemAddressReserve(&va, 8 * MiB, 0, 0, 0), OK);
    check(va % GRAN == 0, "reserved VA %#llx is 2 MiB aligned", va);
    RC(cuMemAddressReserve(&va2, 2 * MiB, 16 * MiB, 0, 0), OK);
    check(va2 % (16 * MiB) == 0, "alignment honoured (%#llx)", va2);
    RC(cuMemAddressReserve(&va2, MiB, 0, 0, 0), INVALID_VALUE);
    RC(cuMemMap(va, 4 * MiB, 0, h, 0), OK);
    RC(cuMemMap(va, 2 * MiB, 0, h, 0), ALREADY_MAPPED);
    RC(cuMemMap(va + 4 * MiB, 2 * MiB, 4096, h, 0), INVALID_VALUE);
    RC(cuMemMap(va + 4 * MiB, 4 * MiB, 2 * MiB, h, 0), INVALID_VALUE); /* beyond the handle */
    RC(cuMemMap(va + 6 * MiB, 4 * MiB, 0, h, 0), INVALID_VALUE);       /* runs past the reservation */
    RC(cuMemMap(va + 4 * MiB, 2 * MiB, 0, 12345, 0), INVALID_VALUE);

    unsigned char *buf = malloc(4 * MiB), *back = malloc(4 * MiB);
    memset(buf, 0x3c, 4 * MiB);
    unsigned long long fl = 99;
    CUmemLocation loc = {1, 0};
    RC(cuMemGetAccess(&fl, &loc, va), OK);
    check(fl == 0, "no access before cuMemSetAccess (%llu)", fl);
    RC(cuMemcpyHtoD_v2(va, buf, 4096), ILLEGAL_ADDRESS);
    RC(cuMemcpyDtoH_v2(back, va, 4096), ILLEGAL_ADDRESS);
    set_access(va, 4 * MiB, 3);
    RC(cuMemGetAccess(&fl, &loc, va + 100), OK);
    check(fl == 3, "read-write access (%llu)", fl);
    RC(cuMemcpyHtoD_v2(va, buf, 4 * MiB), OK);
    RC(cuMemcpyDtoH_v2(back, va, 4 * MiB), OK);
    check(memcmp(buf, back, 4 * MiB) == 0, "VMM memory holds what was copied in");
    RC(cuMemcpyHtoD_v2(va + 2 * MiB, buf, 4 * MiB), INVALID_VALUE); /* runs past the mapping */

    /* read-only: copies in fail, synchronously and asynchronously */
    set_access(va, 4 * MiB, 1);
    RC(cuMemcpyHtoD_v2(va, buf, 4096), ILLEGAL_ADDRESS);
    RC(cuMemcpyDtoH_v2(back, va, 4096), OK);
    CUstream s;
    RC(cuStreamCreate(&s, 1), OK);
    RC(cuMemcpyHtoDAsync_v2(va, buf, 4096, s), OK);
    RC(cuStreamSynchronize(s), ILLEGAL_ADDRESS);
    /* access set on half a mapping */
    set_access(va + 2 * MiB, 2 * MiB, 3);
    RC(cuMemcpyHtoD_v2(va + 2 * MiB, buf, 4096), OK);
    RC(cuMemcpyHtoD_v2(va, buf, 4096), ILLEGAL_ADDRESS);
    RC(cuMemGetAccess(&fl, &loc, va), OK);
    check(fl == 1, "first half still read-only (%llu)", fl);
    set_access(va, 4 * MiB, 3);

    int ord = -1;
    CUdeviceptr start = 0;
    size_t size = 0;
    RC(cuPointerGetAttribute(&ord, 9, va + 3 * MiB), OK);
    RC(cuPointerGetAttribute(&start, 11, va + 3 * MiB), OK);
    RC(cuPointerGetAttribute(&size, 12, va + 3 * MiB), OK);
    check(ord == 0 && start == va && size == 4 * MiB, "pointer attributes of VMM memory (%d, %#llx, %zu)", ord,
          start, size);
    RC(cuMemRetainAllocationHandle(&hx, (void *)(uintptr_t)(va + 100)), OK);
    check(hx == h, "cuMemRetainAllocationHandle gives the mapped handle");
    RC(cuMemRelease(hx), OK);
    RC(cuMemRetainAllocationHandle(&hx, (void *)(uintptr_t)(va + 5 * MiB)), INVALID_VALUE);

    int fd = -1;
    RC(cuMemCreate(&h2, 2 * MiB, &plain, 0), OK);
    RC(cuMemExportToShareableHandle(&fd, h2, 1, 0), INVALID_VALUE); /* not created exportable */
    RC(cuMemExportToShareableHandle(&fd, h, 2, 0), NOT_SUPPORTED);
    RC(cuMemExportToShareableHandle(NULL, h, 1, 0), INVALID_VALUE);
    int pipefd[2];
    if (pipe(pipefd) == 0) {
        RC(cuMemImportFromShareableHandle(&hx, (void *)(intptr_t)pipefd[0], 1), INVALID_VALUE);
        close(pipefd[0]);
        close(pipefd[1]);
    }

    expect_segv(va, "a mapped VMM address");

    /* release while mapped: the memory lives on until unmapped */
    RC(cuMemRelease(h), OK);
    RC(cuMemRelease(h), INVALID_VALUE);
    RC(cuMemcpyDtoH_v2(back, va, 4096), OK);
    check(all_eq(back, 4096, 0x3c), "released but still mapped: still readable");
    RC(cuMemUnmap(va, 2 * MiB), INVALID_VALUE); /* half of a mapping */
    RC(cuMemAddressFree(va, 8 * MiB), INVALID_VALUE); /* still mapped */
    RC(cuMemUnmap(va, 4 * MiB), OK);
    RC(cuMemcpyDtoH_v2(back, va, 4096), INVALID_VALUE);
    RC(cuMemGetInfo_v2(&fr, &to), OK);
    check(fr0 - fr == 2 * MiB, "unmapped and released: only h2's 2 MiB still counted (%zu)", fr0 - fr);
    RC(cuMemAddressFree(va, 4 * MiB), INVALID_VALUE); /* wrong size */
    RC(cuMemAddressFree(va, 8 * MiB), OK);
    RC(cuMemAddressFree(va2, 2 * MiB), OK);
    RC(cuMemRelease(h2), OK);
    RC(cuStreamDestroy_v2(s), OK);

    /* two processes share memory through an exported fd */
    if (!no_fork()) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) {
            perror("socketpair");
            exit(2);
        }
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            close(sv[0]);
            vmm_child(&sv[1]);
        }
        close(sv[1]);
        int got_fd = recv_fd(sv[0]);
        check(got_fd >= 0, "parent received an fd over SCM_RIGHTS");
        CUmemGenericAllocationHandle hi;
        RC(cuMemImportFromShareableHandle(&hi, (void *)(intptr_t)got_fd, 1), OK);
        close(got_fd);
        RC(cuMemGetAllocationPropertiesFromHandle(&got, hi), OK);
        check(got.location.id == 0 && got.requestedHandleTypes == 1, "imported handle's properties");
        RC(cuMemGetInfo_v2(&fr, &to), OK);
        check(fr == fr0, "imported memory is not counted in the importing process");
        CUdeviceptr pva;
        RC(cuMemAddressReserve(&pva, 4 * MiB, 0, 0, 0), OK);
        RC(cuMemMap(pva, 4 * MiB, 0, hi, 0), OK);
        set_access(pva, 4 * MiB, 3);
        say(sv[0], 'M');
        check(hear(sv[0]) == 'W', "child wrote and released everything");
        int st = 0;
        waitpid(pid, &st, 0);
        check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child exited cleanly (status 0x%x)", st);
        memset(back, 0, 4 * MiB);
        RC(cuMemcpyDtoH_v2(back, pva, 4 * MiB), OK);
        int same = 1;
        for (size_t i = 0; i < 4 * MiB && same; i++) same = back[i] == (unsigned char)(i * 13 + 1);
        check(same, "parent reads the bytes the child wrote (after the child exited)");
        RC(cuMemRelease(hi), OK);
        RC(cuMemUnmap(pva, 4 * MiB), OK);
        RC(cuMemAddressFree(pva, 4 * MiB), OK);
        close(sv[0]);
    }
    free(buf);
    free(back);
}

/* ======================================================================== */

static char log_path[256];

struct line {
    int pid, dev;
    long long bytes, leaks;
    char op[32];
};

static int read_log(struct line *ls, int max) {
    FILE *f = fopen(log_path, "r");
    if (!f) return 0;
    char buf[512];
    int n = 0, bad = 0;
    while (fgets(buf, sizeof buf, f) && n < max) {
        struct line l = {.dev = -99, .bytes = -1, .leaks = -1};
        char *p;
        size_t len = strlen(buf);
        if (len < 2 || buf[0] != '{' || buf[len - 2] != '}' || buf[len - 1] != '\n') bad++;
        if ((p = strstr(buf, "\"pid\": "))) l.pid = atoi(p + 7);
        if ((p = strstr(buf, "\"op\": \""))) sscanf(p + 7, "%31[^\"]", l.op);
        if ((p = strstr(buf, "\"bytes\": "))) l.bytes = atoll(p + 9);
        if ((p = strstr(buf, "\"dev\": "))) l.dev = atoi(p + 7);
        if ((p = strstr(buf, "\"leaks\": "))) l.leaks = atoll(p + 9);
        ls[n++] = l;
    }
    fclose(f);
    check(bad == 0, "every log line is one JSON object on one line (%d bad)", bad);
    return n;
}

static int count_op(struct line *ls, int n, int pid, const char *op, long long bytes, int dev) {
    int k = 0;
    for (int i = 0; i < n; i++)
        if (ls[i].pid == pid && strcmp(ls[i].op, op) == 0 && (bytes < 0 || ls[i].bytes == bytes) &&
            (dev == -99 || ls[i].dev == dev))
            k++;
    return k;
}

static long long exit_leaks(struct line *ls, int n, int pid) {
    for (int i = 0; i < n; i++)
        if (ls[i].pid == pid && strcmp(ls[i].op, "exit") == 0) return ls[i].leaks;
    return -1; /* no exit line */
}

static void clean_child(void *arg) {
    (void)arg;
    CUcontext c;
    if (cuDevicePrimaryCtxRetain(&c, 0) || cuCtxPushCurrent_v2(c)) _exit(4);
    CUdeviceptr p;
    void *hp;
    char *buf = pages(2, PROT_READ | PROT_WRITE);
    CUmemAllocationProp prop = vmm_prop(1);
    CUmemGenericAllocationHandle h, hi;
    CUdeviceptr va;
    int fd;
    int e = cuMemAlloc_v2(&p, 4096) | cuMemFree_v2(p) | cuMemHostRegister_v2(buf, 8192, 0) |
            cuMemHostUnregister(buf) | cuMemHostAlloc(&hp, 1000, 0) | cuMemFreeHost(hp) |
            cuMemCreate(&h, GRAN, &prop, 0) | cuMemExportToShareableHandle(&fd, h, 1, 0) |
            cuMemImportFromShareableHandle(&hi, (void *)(intptr_t)fd, 1) |
            cuMemAddressReserve(&va, GRAN, 0, 0, 0) | cuMemMap(va, GRAN, 0, hi, 0) | cuMemUnmap(va, GRAN) |
            cuMemAddressFree(va, GRAN) | cuMemRelease(hi) | cuMemRelease(h);
    close(fd);
    exit(e ? 5 : 0); /* exit(): the destructor writes the exit line */
}

static void *exit_from_thread(void *arg) {
    (void)arg;
    exit(3);
}

static void leaky_child(void *arg) {
    (void)arg;
    CUdeviceptr p;
    char *buf = pages(1, PROT_READ | PROT_WRITE);
    if (cuMemAlloc_v2(&p, 12345) || cuMemHostRegister_v2(buf, 4096, 0)) _exit(4);
    pthread_t t;
    pthread_create(&t, NULL, exit_from_thread, NULL);
    for (;;) pause();
}

static void killed_child(void *arg) {
    (void)arg;
    CUdeviceptr p;
    if (cuMemAlloc_v2(&p, 777)) _exit(4);
    raise(SIGKILL);
}

static pid_t fork_run(void (*fn)(void *), int *status) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        fn(NULL);
        _exit(0);
    }
    waitpid(pid, status, 0);
    return pid;
}

static void case_log(void) {
    snprintf(log_path, sizeof log_path, "/tmp/fakecuda-selftest-%d.log", (int)getpid());
    unlink(log_path);
    setenv("FAKECUDA_LOG", log_path, 1);
    load();
    init_and_push(0);
    /* the parent holds something: a forked child does not inherit it */
    CUdeviceptr mine;
    RC(cuMemAlloc_v2(&mine, 1 << 16), OK);
    if (no_fork()) {
        RC(cuMemFree_v2(mine), OK);
        return;
    }
    int st_clean, st_leaky, st_killed;
    pid_t clean = fork_run(clean_child, &st_clean);
    pid_t leaky = fork_run(leaky_child, &st_leaky);
    pid_t killed = fork_run(killed_child, &st_killed);
    check(WIFEXITED(st_clean) && WEXITSTATUS(st_clean) == 0, "clean child ran every call (status 0x%x)",
          st_clean);
    check(WIFEXITED(st_leaky) && WEXITSTATUS(st_leaky) == 3, "leaky child exited from another thread (0x%x)",
          st_leaky);
    check(WIFSIGNALED(st_killed) && WTERMSIG(st_killed) == SIGKILL, "killed child died of SIGKILL");
    RC(cuMemFree_v2(mine), OK);
    dlclose(lib); /* the library pins itself: no exit line, nothing unloaded */
    static struct line ls[1000];
    int n = read_log(ls, 1000);
    int me = (int)getpid();
    check(count_op(ls, n, me, "alloc", 1 << 16, 0) == 1 && count_op(ls, n, me, "free", 1 << 16, 0) == 1,
          "parent's alloc and free lines");
    const char *ops[] = {"alloc", "free", "register", "unregister", "host_alloc", "host_free", "create",
                         "export", "import", "map", "unmap", "release"};
    const long long bytes[] = {4096, 4096, 8192, 8192, 1000, 1000, GRAN, GRAN, GRAN, GRAN, GRAN, GRAN};
    const int devs[] = {0, 0, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0};
    int want_release = 2;
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        int k = count_op(ls, n, clean, ops[i], bytes[i], devs[i]);
        int want = strcmp(ops[i], "release") == 0 ? want_release : 1;
        check(k == want, "clean child: %d '%s' line(s) of %lld bytes, dev %d (want %d)", k, ops[i], bytes[i],
              devs[i], want);
    }
    check(exit_leaks(ls, n, clean) == 0, "clean child: exit line, leaks %lld", exit_leaks(ls, n, clean));
    check(count_op(ls, n, leaky, "alloc", 12345, 0) == 1, "leaky child: alloc line");
    check(exit_leaks(ls, n, leaky) == 2, "leaky child: exit line with leaks %lld (want 2)",
          exit_leaks(ls, n, leaky));
    check(count_op(ls, n, killed, "alloc", 777, 0) == 1 && exit_leaks(ls, n, killed) == -1,
          "killed child: alloc line, no exit line");
    check(exit_leaks(ls, n, me) == -1, "parent: no exit line yet (dlclose does not write one)");
    unlink(log_path);
}

/* ======================================================================== */

#define NTHREADS 8
#define ROUNDS 40

static void *hammer(void *arg) {
    int id = (int)(intptr_t)arg;
    CUcontext c;
    int bad = 0;
    if (cuDevicePrimaryCtxRetain(&c, 0) || cuCtxPushCurrent_v2(c)) return (void *)1;
    const size_t n = 256 * 1024;
    CUdeviceptr d;
    CUstream s;
    CUevent e;
    unsigned char *src = pages(n / 4096, PROT_READ | PROT_WRITE), *back = malloc(n);
    bad |= cuMemAlloc_v2(&d, n) | cuStreamCreate(&s, 1) | cuEventCreate(&e, 2) |
           cuMemHostRegister_v2(src, n, 0);
    for (int r = 0; r < ROUNDS && !bad; r++) {
        unsigned char v = (unsigned char)(id * 31 + r);
        memset(src, v, n);
        bad |= cuMemcpyHtoDAsync_v2(d, src, n, s) | cuEventRecord(e, s) | cuEventSynchronize(e);
        bad |= cuMemcpyDtoH_v2(back, d, n);
        if (!all_eq(back, n, v)) bad |= 0x1000;
    }
    bad |= cuMemHostUnregister(src) | cuEventDestroy_v2(e) | cuStreamDestroy_v2(s) | cuMemFree_v2(d);
    cuCtxPopCurrent_v2(NULL);
    cuDevicePrimaryCtxRelease_v2(0);
    free(back);
    munmap(src, n);
    return (void *)(intptr_t)bad;
}

static void fork_during_work(void *arg) {
    (void)arg;
    /* inherited: cuInit and this thread's current context; not the worker */
    CUdeviceptr d;
    CUstream s;
    void *h;
    if (cuMemAlloc_v2(&d, 4096) || cuStreamCreate(&s, 1) || cuMemHostAlloc(&h, 4096, 0)) _exit(4);
    memset(h, 0x5e, 4096);
    unsigned char back[4096];
    if (cuMemcpyHtoDAsync_v2(d, h, 4096, s) || cuStreamSynchronize(s) || cuMemcpyDtoH_v2(back, d, 4096))
        _exit(5);
    _exit(all_eq(back, 4096, 0x5e) ? 0 : 6);
}

static void case_threads(void) {
    setenv("FAKECUDA_COPY_DELAY_US", "100", 1);
    load();
    init_and_push(0);
    pthread_t t[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) pthread_create(&t[i], NULL, hammer, (void *)(intptr_t)i);
    if (!no_fork()) {
        usleep(20000);
        int st = in_child(fork_during_work, NULL);
        check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "a child forked while streams are busy works (0x%x)", st);
    }
    int bad = 0;
    for (int i = 0; i < NTHREADS; i++) {
        void *r;
        pthread_join(t[i], &r);
        bad |= (int)(intptr_t)r;
    }
    check(bad == 0, "%d threads x %d rounds of register/copy/record/sync agree (0x%x)", NTHREADS, ROUNDS, bad);
    size_t fr, to;
    RC(cuMemGetInfo_v2(&fr, &to), OK);
    check(fr == to, "all device memory freed");
}

/* ======================================================================== */

static const struct {
    const char *name;
    void (*fn)(void);
} CASES[] = {
    {"basic", case_basic},   {"visible", case_visible}, {"nodevice", case_nodevice},
    {"memory", case_memory}, {"register", case_register}, {"noreadonly", case_noreadonly},
    {"novmm", case_novmm},   {"async", case_async},   {"fail", case_fail},       {"vmm", case_vmm},
    {"log", case_log},       {"threads", case_threads},
};
#define NCASES (int)(sizeof CASES / sizeof CASES[0])

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s LIBPATH [CASE|all]\n", argv[0]);
        return 2;
    }
    lib_path = argv[1];
    const char *which = argc > 2 ? argv[2] : "all";
    if (strcmp(which, "list") == 0) {
        for (int i = 0; i < NCASES; i++) printf("%s\n", CASES[i].name);
        return 0;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* every case chooses its own configuration */
    const char *vars[] = {"FAKECUDA_DEVICES", "FAKECUDA_MEM_MB", "FAKECUDA_COPY_DELAY_US",
                          "FAKECUDA_NO_READONLY_REGISTER", "FAKECUDA_NO_VMM", "FAKECUDA_FAIL",
                          "FAKECUDA_LOG", "CUDA_VISIBLE_DEVICES"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) unsetenv(vars[i]);
    if (strcmp(which, "all") == 0) {
        int failed = 0;
        for (int i = 0; i < NCASES; i++) {
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0) {
                execl("/proc/self/exe", argv[0], lib_path, CASES[i].name, (char *)NULL);
                perror("exec");
                _exit(2);
            }
            int st = 0;
            waitpid(pid, &st, 0);
            int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
            printf("=== case %-10s %s\n", CASES[i].name, ok ? "PASSED" : "FAILED");
            failed += !ok;
        }
        printf("=== %d of %d cases passed\n", NCASES - failed, NCASES);
        return failed ? 1 : 0;
    }
    for (int i = 0; i < NCASES; i++) {
        if (strcmp(which, CASES[i].name) == 0) {
            g_case = CASES[i].name;
            /* valgrind is slow with the default 8 GiB shadow mapping per
             * device; cases that need another size set their own */
            if (under_valgrind()) setenv("FAKECUDA_MEM_MB", "256", 1);
            CASES[i].fn();
            printf("--- %s: %d passed, %d failed\n", g_case, g_pass, g_fail);
            return g_fail ? 1 : 0;
        }
    }
    fprintf(stderr, "unknown case '%s'\n", which);
    return 2;
}

#endif
