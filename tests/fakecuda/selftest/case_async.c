/* Streams, events and late copies; injected faults; many threads. */
#include "selftest.h"

#include <pthread.h>

#define DELAY_US 200000
#define N (64 * 1024)

static CUdeviceptr d;
static unsigned char *back;

/* Sources: registered and pinned memory are read when the copy runs,
 * pageable memory when it is issued. */
static void async_sources(CUstream s, unsigned char *src, unsigned char *pin, unsigned char *pg) {
    memset(src, 0xa1, N);
    RC(cuMemHostRegister_v2(src, N, 0), OK);
    double t0 = now();
    RC(cuMemcpyHtoDAsync_v2(d, src, N, s), OK);
    check(now() - t0 < DELAY_US * 1e-6 / 2, "async copy returns before it is done (%.3f s)", now() - t0);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0), "DtoH before synchronize sees the old bytes");
    RC(cuStreamSynchronize(s), OK);
    check(now() - t0 >= DELAY_US * 1e-6 * 0.9, "synchronize waited for the copy (%.3f s)", now() - t0);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0xa1), "after synchronize: the new bytes");

    memset(pin, 0xb2, N);
    RC(cuMemcpyHtoDAsync_v2(d, pin, N, s), OK);
    memset(pin, 0xc3, N);
    RC(cuStreamSynchronize(s), OK);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0xc3), "pinned source changed before the copy ran: the device has the change");

    memset(pg, 0xd4, N);
    RC(cuMemcpyHtoDAsync_v2(d, pg, N, s), OK);
    memset(pg, 0xe5, N);
    RC(cuStreamSynchronize(s), OK);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0xd4), "pageable source changed after the call: the device has the original");
}

/* Unregistered / freed before the copy ran: sticky error, copy skipped. */
static void async_late_failures(CUstream s, unsigned char *src, unsigned char *pin, unsigned char *pg) {
    memset(src, 0x77, N);
    RC(cuMemcpyHtoDAsync_v2(d, src, N, s), OK);
    RC(cuMemHostUnregister(src), OK);
    RC(cuStreamSynchronize(s), ILLEGAL_ADDRESS);
    RC(cuStreamSynchronize(s), OK);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0xd4), "the failed copy did not write");
    RC(cuMemcpyHtoDAsync_v2(d, pin, N, s), OK);
    RC(cuMemFreeHost(pin), OK);
    RC(cuStreamSynchronize(s), ILLEGAL_ADDRESS);
    RC(cuMemcpyHtoDAsync_v2(d, pg, N, s), OK);
    CUdeviceptr d2;
    RC(cuMemAlloc_v2(&d2, N), OK);
    RC(cuMemcpyHtoDAsync_v2(d2, pg, N, s), OK);
    RC(cuMemFree_v2(d2), OK);
    RC(cuStreamSynchronize(s), ILLEGAL_ADDRESS); /* device memory freed under a queued copy */
    RC(cuStreamSynchronize(s), OK);
}

/* Waits (up to 10 s) until the device holds `v`: for work whose stream is
 * gone, so that nothing can synchronize with it. */
static int device_becomes(unsigned char v) {
    for (int i = 0; i < 1000; i++) {
        if (cuMemcpyDtoH_v2(back, d, N) == OK && all_eq(back, N, v)) return 1;
        usleep(10000);
    }
    return 0;
}

static void async_events(CUstream s, unsigned char *p1, unsigned char *p2) {
    CUevent ev, never;
    RC(cuEventCreate(&ev, 2), OK);
    RC(cuEventCreate(&never, 0), OK);
    RC(cuEventCreate(&ev, 0x10), INVALID_VALUE);
    RC(cuEventCreate(&ev, 5), INVALID_VALUE); /* INTERPROCESS without DISABLE_TIMING */
    RC(cuEventCreate(&ev, 2), OK);
    RC(cuEventSynchronize(never), OK); /* never recorded: complete */
    memset(p1, 0x11, N);
    double t0 = now();
    RC(cuMemcpyHtoDAsync_v2(d, p1, N, s), OK);
    RC(cuEventRecord(ev, s), OK);
    RC(cuEventSynchronize(ev), OK);
    check(now() - t0 >= DELAY_US * 1e-6 * 0.9, "event synchronize waited for the copy (%.3f s)", now() - t0);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0x11), "after the event: the new bytes");

    /* one stream runs in order */
    CUstream a;
    RC(cuStreamCreate(&a, 1), OK);
    memset(p1, 0x33, N);
    memset(p2, 0x44, N);
    RC(cuMemcpyHtoDAsync_v2(d, p1, N, a), OK);
    RC(cuMemcpyHtoDAsync_v2(d, p2, N, a), OK);
    RC(cuStreamSynchronize(a), OK);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0x44), "two copies on one stream: the last wins");

    /* destroying a stream / event with pending work */
    CUstream c;
    RC(cuStreamCreate(&c, 0), OK);
    memset(p1, 0x66, N);
    RC(cuMemcpyHtoDAsync_v2(d, p1, N, c), OK);
    RC(cuEventRecord(ev, c), OK);
    RC(cuStreamDestroy_v2(c), OK);
    RC(cuEventDestroy_v2(ev), OK);
    RC(cuStreamSynchronize(c), INVALID_HANDLE);
    RC(cuEventSynchronize(ev), INVALID_HANDLE);
    RC(cuStreamDestroy_v2(c), INVALID_HANDLE);
    check(device_becomes(0x66), "work of a destroyed stream still completed");
    RC(cuStreamDestroy_v2(a), OK);
    RC(cuEventDestroy_v2(never), OK);
}

/* The NULL stream, and what is refused when the copy is issued. */
static void async_null_stream_and_issue(CUstream s, unsigned char *p1) {
    memset(p1, 0x88, N);
    RC(cuMemcpyHtoDAsync_v2(d, p1, N, NULL), OK);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0x66), "a copy on the NULL stream is late too");
    RC(cuStreamSynchronize(NULL), OK);
    RC(cuMemcpyDtoH_v2(back, d, N), OK);
    check(all_eq(back, N, 0x88), "copy on the NULL stream");

    RC(cuMemcpyHtoDAsync_v2(d + 1, p1, N, s), INVALID_VALUE);
    RC(cuMemcpyHtoDAsync_v2(d, p1, N, (CUstream)p1), INVALID_HANDLE);
    if (!under_valgrind()) {
        void *gone = pages(1, PROT_READ | PROT_WRITE);
        munmap(gone, 4096);
        RC(cuMemcpyHtoDAsync_v2(d, gone, 100, s), INVALID_VALUE);
    }
    CUcontext c1, popped;
    CUstream s1;
    CUevent e1;
    RC(cuDevicePrimaryCtxRetain(&c1, 1), OK);
    RC(cuCtxPushCurrent_v2(c1), OK);
    RC(cuStreamCreate(&s1, 1), OK);
    RC(cuEventCreate(&e1, 0), OK);
    RC(cuCtxPopCurrent_v2(&popped), OK);
    RC(cuMemcpyHtoDAsync_v2(d, p1, N, s1), INVALID_HANDLE); /* stream of another context */
    RC(cuEventRecord(e1, s), INVALID_HANDLE);
    RC(cuStreamDestroy_v2(s1), OK); /* no context needed */
    RC(cuEventDestroy_v2(e1), OK);
}

void case_async(void) {
    char us[32];
    snprintf(us, sizeof us, "%d", DELAY_US);
    setenv("FAKECUDA_COPY_DELAY_US", us, 1);
    setenv("FAKECUDA_DEVICES", "2", 1);
    setenv("FAKECUDA_MEM_MB", "256", 1);
    load();
    init_and_push(0);
    RC(cuMemAlloc_v2(&d, N), OK);
    unsigned char *zero = calloc(1, N), *pg = malloc(N);
    back = malloc(N);
    RC(htod(d, zero, N), OK);
    CUstream s;
    RC(cuStreamCreate(&s, 1), OK);
    RC(cuStreamCreate(&s, 4), INVALID_VALUE);
    RC(cuStreamCreate(&s, 1), OK);
    unsigned char *src = pages(N / 4096, PROT_READ | PROT_WRITE), *pin, *p1, *p2;
    RC(cuMemHostAlloc((void **)&pin, N, 0), OK);
    async_sources(s, src, pin, pg);
    async_late_failures(s, src, pin, pg);
    RC(cuMemHostAlloc((void **)&p1, N, 0), OK);
    RC(cuMemHostAlloc((void **)&p2, N, 0), OK);
    async_events(s, p1, p2);
    async_null_stream_and_issue(s, p1);
    RC(cuStreamDestroy_v2(s), OK);
    RC(cuMemFreeHost(p1), OK);
    RC(cuMemFreeHost(p2), OK);
    RC(cuMemFree_v2(d), OK);
    free(zero);
    free(back);
    free(pg);
}

/* ======================================================================== */

void case_fail(void) {
    setenv("FAKECUDA_FAIL",
           "cuMemAlloc@2, cuStreamSynchronize@1=CUDA_ERROR_LAUNCH_FAILED,cuMemHostRegister_v2=CUDA_ERROR_NOT_PERMITTED,"
           "cuMemcpyHtoDAsync_v2@2,cuMemCreate,bogus@1,cuMemFree=CUDA_ERROR_NOPE,cuMemFree_v2@x,cuMemFree@0,"
           "cuStreamQuery@1",
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
    check(strstr(msg, "unknown driver function 'cuStreamQuery'") != NULL,
          "a function the library does not implement is reported");
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
    RC(cuMemHostRegister_v2(buf, 4096, 0), NOT_PERMITTED); /* every call */
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

#define NTHREADS 8
#define ROUNDS 40

static void *hammer(void *arg) {
    int id = (int)(intptr_t)arg;
    CUcontext c;
    int bad = 0;
    if (cuDevicePrimaryCtxRetain(&c, 0) || cuCtxPushCurrent_v2(c)) return (void *)1;
    const size_t n = 256 * 1024;
    CUdeviceptr dev;
    CUstream s;
    CUevent e;
    unsigned char *src = pages(n / 4096, PROT_READ | PROT_WRITE), *out = malloc(n);
    bad |= cuMemAlloc_v2(&dev, n) | cuStreamCreate(&s, 1) | cuEventCreate(&e, 2) |
           cuMemHostRegister_v2(src, n, 0);
    for (int r = 0; r < ROUNDS && !bad; r++) {
        unsigned char v = (unsigned char)(id * 31 + r);
        memset(src, v, n);
        bad |= cuMemcpyHtoDAsync_v2(dev, src, n, s) | cuEventRecord(e, s) | cuEventSynchronize(e);
        bad |= cuMemcpyDtoH_v2(out, dev, n);
        if (!all_eq(out, n, v)) bad |= 0x1000;
    }
    bad |= cuMemHostUnregister(src) | cuEventDestroy_v2(e) | cuStreamDestroy_v2(s) | cuMemFree_v2(dev);
    cuCtxPopCurrent_v2(NULL);
    cuDevicePrimaryCtxRelease_v2(0);
    free(out);
    munmap(src, n);
    return (void *)(intptr_t)bad;
}

static void fork_during_work(void *arg) {
    (void)arg;
    /* inherited: cuInit and this thread's current context; not the worker */
    CUdeviceptr dev;
    CUstream s;
    void *h;
    if (cuMemAlloc_v2(&dev, 4096) || cuStreamCreate(&s, 1) || cuMemHostAlloc(&h, 4096, 0)) _exit(4);
    memset(h, 0x5e, 4096);
    unsigned char out[4096];
    if (cuMemcpyHtoDAsync_v2(dev, h, 4096, s) || cuStreamSynchronize(s) || cuMemcpyDtoH_v2(out, dev, 4096))
        _exit(5);
    _exit(all_eq(out, 4096, 0x5e) ? 0 : 6);
}

void case_threads(void) {
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
    RC(can_alloc(mem_total()), OK); /* all device memory freed */
}
