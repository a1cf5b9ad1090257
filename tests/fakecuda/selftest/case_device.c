/* Devices, primary contexts and error names. */
#include "selftest.h"

#include <pthread.h>

static void basic_devices(void) {
    int n = -1, a;
    CUdeviceptr p;
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
    CUuuid u0, u1, u0b;
    RC(cuDeviceGetUuid(&u0, 0), OK);
    RC(cuDeviceGetUuid(&u1, 1), OK);
    RC(cuDeviceGetUuid(&u0b, 0), OK);
    check(memcmp(u0.bytes, "FAKECUDA", 8) == 0 && u0.bytes[15] == 0 && u1.bytes[15] == 1,
          "UUIDs are fixed per device index");
    check(memcmp(&u0, &u0b, 16) == 0 && memcmp(&u0, &u1, 16) != 0, "a device's UUID is stable, devices differ");
    RC(cuDeviceGetUuid(NULL, 0), INVALID_VALUE);
}

/* Whether the calling thread's current context is the one `s` belongs to:
 * an asynchronous copy of nothing checks exactly that. */
static int current_is_of(CUstream s) { return cuMemcpyHtoDAsync_v2(0, NULL, 0, s) == OK; }

static void *other_thread_sync(void *arg) {
    *(CUresult *)arg = cuStreamSynchronize(NULL);
    return NULL;
}

static void basic_contexts(void) {
    CUcontext c = NULL, c0, c0b, c1;
    CUdeviceptr p;
    CUstream s, s0, s1;
    RC(cuMemAlloc_v2(&p, 16), INVALID_CONTEXT); /* no current context at start */
    RC(cuStreamCreate(&s, 0), INVALID_CONTEXT);
    RC(cuStreamSynchronize(NULL), INVALID_CONTEXT);
    RC(cuDevicePrimaryCtxRelease_v2(0), INVALID_CONTEXT);
    RC(cuDevicePrimaryCtxRetain(NULL, 0), INVALID_VALUE);
    RC(cuDevicePrimaryCtxRetain(&c0, 7), INVALID_DEVICE);
    RC(cuDevicePrimaryCtxRetain(&c0, 0), OK);
    RC(cuDevicePrimaryCtxRetain(&c0b, 0), OK);
    check(c0 == c0b, "retain returns the same primary context");
    RC(cuDevicePrimaryCtxRetain(&c1, 1), OK);
    RC(cuCtxPushCurrent_v2(NULL), INVALID_VALUE);
    RC(cuCtxPushCurrent_v2((CUcontext)&c), INVALID_CONTEXT);
    RC(cuCtxPushCurrent_v2(c0), OK);
    RC(cuStreamCreate(&s0, 1), OK);
    CUresult seen = OK;
    pthread_t t;
    pthread_create(&t, NULL, other_thread_sync, &seen);
    pthread_join(t, NULL);
    check(seen == INVALID_CONTEXT, "another thread has no current context (%s)", ename(seen));
    RC(cuCtxPushCurrent_v2(c1), OK);
    RC(cuStreamCreate(&s1, 1), OK);
    check(current_is_of(s1) && !current_is_of(s0), "after pushing device 1's context, it is current");
    RC(cuCtxPopCurrent_v2(&c), OK);
    check(c == c1, "pop returns the top");
    check(current_is_of(s0) && !current_is_of(s1), "after pop: device 0's context is current");
    RC(cuCtxPopCurrent_v2(NULL), OK);
    RC(cuCtxPopCurrent_v2(&c), INVALID_CONTEXT);
    RC(cuStreamDestroy_v2(s0), OK);
    RC(cuStreamDestroy_v2(s1), OK);

    /* the last release destroys the context and what it owns */
    const size_t total = mem_total();
    RC(cuCtxPushCurrent_v2(c0), OK);
    RC(can_alloc(total), OK);
    RC(can_alloc(total + 4096), OUT_OF_MEMORY);
    RC(cuMemAlloc_v2(&p, 1 << 20), OK);
    RC(cuStreamCreate(&s, 1), OK);
    RC(cuDevicePrimaryCtxRelease_v2(0), OK);
    RC(cuMemAlloc_v2(&p, 16), OK); /* still one reference: works */
    RC(cuMemFree_v2(p), OK);
    RC(cuDevicePrimaryCtxRelease_v2(0), OK);
    RC(cuMemAlloc_v2(&p, 16), INVALID_CONTEXT); /* released to zero: inactive */
    RC(cuDevicePrimaryCtxRelease_v2(0), INVALID_CONTEXT);
    RC(cuDevicePrimaryCtxRetain(&c0, 0), OK);
    RC(can_alloc(total), OK); /* the destroyed context's memory was freed */
    RC(cuStreamSynchronize(s), INVALID_HANDLE);
}

static void basic_errors(void) {
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

void case_basic(void) {
    setenv("FAKECUDA_DEVICES", "2", 1);
    load();
    basic_devices();
    basic_contexts();
    basic_errors();
}

void case_visible(void) {
    setenv("FAKECUDA_DEVICES", "4", 1);
    setenv("CUDA_VISIBLE_DEVICES", "2,0", 1);
    load();
    int n = 0, bus;
    RC(cuInit(0), OK);
    RC(cuDeviceGetCount(&n), OK);
    check(n == 2, "CUDA_VISIBLE_DEVICES=2,0 of 4: %d devices", n);
    CUuuid u;
    RC(cuDeviceGetUuid(&u, 0), OK);
    check(u.bytes[15] == 2, "ordinal 0 is physical device 2 (UUID)");
    RC(cuDeviceGetAttribute(&bus, 33, 1), OK);
    check(bus == 0x10, "ordinal 1 is physical device 0 (PCI bus 0x%x)", bus);
}

void case_nodevice(void) {
    setenv("FAKECUDA_DEVICES", "0", 1);
    load();
    RC(cuInit(0), NO_DEVICE);
    int n;
    RC(cuDeviceGetCount(&n), NOT_INITIALIZED);
}
