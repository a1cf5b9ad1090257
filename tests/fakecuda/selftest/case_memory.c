/* cuMemAlloc memory and its copies, host registration, pinned memory, and
 * the configurations that turn features off. */
#include "selftest.h"

static void scribble_child(void *arg) {
    CUdeviceptr parents = *(CUdeviceptr *)arg, d;
    if (can_alloc(mem_total()) != OK) _exit(7);           /* starts with nothing */
    if (cuMemFree_v2(parents) != INVALID_VALUE) _exit(8); /* not its allocation */
    unsigned char junk[4096];
    memset(junk, 0xee, sizeof junk);
    if (cuMemAlloc_v2(&d, 1 << 20) || d != parents || htod(d, junk, sizeof junk)) _exit(9);
    _exit(0);
}

static void memory_alloc(void) {
    CUdeviceptr p1, p2, p3;
    RC(cuMemAlloc_v2(NULL, 16), INVALID_VALUE);
    RC(cuMemAlloc_v2(&p1, 0), INVALID_VALUE);
    RC(cuMemAlloc_v2(&p1, 1000), OK);
    RC(cuMemAlloc_v2(&p2, 10 * MiB), OK);
    check(p1 % 512 == 0 && p2 % 512 == 0, "pointers are 512-byte aligned (%#llx, %#llx)", p1, p2);
    check(p1 + 1000 <= p2 || p2 + 10 * MiB <= p1, "allocations do not overlap");
    /* accounted in whole pages: 64 MiB less one page less 10 MiB is left */
    RC(can_alloc(64 * MiB - 4096 - 10 * MiB), OK);
    RC(can_alloc(64 * MiB - 10 * MiB), OUT_OF_MEMORY);
    RC(cuMemAlloc_v2(&p3, 60 * MiB), OUT_OF_MEMORY);
    RC(cuMemFree_v2(p2), OK);
    RC(cuMemAlloc_v2(&p3, 60 * MiB), OK);
    RC(cuMemAlloc_v2(&p2, 4 * MiB), OUT_OF_MEMORY);
    RC(cuMemFree_v2(p3), OK);
    RC(cuMemFree_v2(p1 + 512), INVALID_VALUE);
    RC(cuMemFree_v2(0), INVALID_VALUE);
    RC(cuMemFree_v2(p1), OK);
    RC(cuMemFree_v2(p1), INVALID_VALUE);
    RC(can_alloc(64 * MiB), OK); /* all freed */
}

void case_memory(void) {
    setenv("FAKECUDA_MEM_MB", "64", 1);
    load();
    init_and_push(0);
    memory_alloc();

    /* copies (synchronized) */
    size_t n = 1 << 20;
    unsigned char *h = malloc(n), *back = malloc(n);
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 7);
    CUdeviceptr d;
    RC(cuMemAlloc_v2(&d, n), OK);
    RC(htod(d, h, n), OK);
    memset(back, 0, n);
    RC(cuMemcpyDtoH_v2(back, d, n), OK);
    check(memcmp(h, back, n) == 0, "HtoD then DtoH gives the bytes back");
    RC(cuMemcpyDtoH_v2(back, d + 4096, 100), OK);
    check(memcmp(back, h + 4096, 100) == 0, "DtoH at an offset");
    RC(htod(d + n - 10, h, 11), INVALID_VALUE);
    RC(cuMemcpyDtoH_v2(back, d + n, 1), INVALID_VALUE);
    RC(htod((CUdeviceptr)(uintptr_t)back, h, 10), INVALID_VALUE);
    RC(cuMemcpyDtoH_v2(NULL, d, 10), INVALID_VALUE);
    RC(htod(d, NULL, 10), INVALID_VALUE);
    if (!under_valgrind()) {
        void *gone = pages(1, PROT_READ | PROT_WRITE);
        munmap(gone, 4096);
        RC(cuMemcpyDtoH_v2(gone, d, 100), INVALID_VALUE);
        RC(htod(d, gone, 100), INVALID_VALUE);
    }
    RC(htod(d, h, 0), OK);

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

static void register_pages(void) {
    char *buf = pages(16, PROT_READ | PROT_WRITE);
    RC(cuMemHostRegister_v2(buf, 4 * 4096, 0), OK);
    RC(cuMemHostRegister_v2(buf + 2 * 4096, 4 * 4096, 0), ALREADY_REGISTERED);
    RC(cuMemHostRegister_v2(buf + 3 * 4096 + 100, 10, 0), ALREADY_REGISTERED);
    RC(cuMemHostRegister_v2(buf + 4 * 4096 + 100, 10, 0), OK);
    RC(cuMemHostRegister_v2(buf + 4 * 4096 + 200, 10, 0), ALREADY_REGISTERED); /* same page */
    RC(cuMemHostUnregister(buf + 4 * 4096 + 200), NOT_REGISTERED);
    RC(cuMemHostUnregister(buf + 4 * 4096 + 100), OK);
    RC(cuMemHostUnregister(buf + 1), NOT_REGISTERED);
    RC(cuMemHostUnregister(buf), OK);
    RC(cuMemHostUnregister(buf), NOT_REGISTERED);
    RC(cuMemHostRegister_v2(buf, 4096, 1), OK); /* PORTABLE */
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
}

void case_register(void) {
    load();
    init_and_push(0);
    int a = 0;
    RC(cuDeviceGetAttribute(&a, 113, 0), OK);
    check(a == 1, "READ_ONLY_HOST_REGISTER_SUPPORTED = 1 by default");
    register_pages();

    /* pinned host memory */
    void *hp = NULL;
    RC(cuMemHostAlloc(&hp, 10000, 0), OK);
    memset(hp, 0x5a, 10000);
    check(all_eq(hp, 10000, 0x5a), "pinned memory is writable host memory");
    RC(cuMemHostRegister_v2((char *)hp + 4096, 100, 0), ALREADY_REGISTERED);
    RC(cuMemFreeHost((char *)hp + 8), INVALID_VALUE);
    RC(cuMemFreeHost(hp), OK);
    RC(cuMemFreeHost(hp), INVALID_VALUE);
    RC(cuMemHostAlloc(NULL, 100, 0), INVALID_VALUE);
    RC(cuMemHostAlloc(&hp, 100, 0x80), INVALID_VALUE);

    CUcontext c;
    char *buf = pages(1, PROT_READ | PROT_WRITE);
    RC(cuCtxPopCurrent_v2(&c), OK);
    RC(cuMemHostRegister_v2(buf, 4096, 0), INVALID_CONTEXT);
    RC(cuMemHostAlloc(&hp, 100, 0), INVALID_CONTEXT);
}

void case_noreadonly(void) {
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

void case_novmm(void) {
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
