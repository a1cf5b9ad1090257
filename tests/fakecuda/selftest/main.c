/* The self-test's driver: loads the library and its API, the checks and
 * helpers every case uses, and the case table. See selftest.h. */
#include "selftest.h"

#include <dlfcn.h>
#include <signal.h>
#include <stdarg.h>
#include <time.h>

#define X(name, args) CUresult(*name) args;
API(X)
#undef X

void *lib;
static const char *lib_path;
const char *g_case = "?";
static int g_pass;
int g_fail;

void load(void) {
    lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "cannot load %s: %s\n", lib_path, dlerror());
        exit(2);
    }
#define X(name, args)                                           \
    *(void **)&name = dlsym(lib, #name);                        \
    if (!name) {                                                \
        fprintf(stderr, "missing symbol %s\n", #name);          \
        exit(2);                                                \
    }
    API(X)
#undef X
}

void check(int ok, const char *fmt, ...) {
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

const char *ename(CUresult r) {
    static char buf[8][48];
    static int k;
    const char *s = NULL;
    if (cuGetErrorName && cuGetErrorName(r, &s) == OK && s) return s;
    char *b = buf[k++ % 8];
    snprintf(b, 48, "error %d", r);
    return b;
}

int under_valgrind(void) { return getenv("SELFTEST_VALGRIND") != NULL; }

double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int all_eq(const void *p, size_t n, unsigned char v) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != v) return 0;
    return 1;
}

void *pages(size_t n, int prot) {
    void *p = mmap(NULL, n * 4096, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

void init_and_push(int dev) {
    CUcontext c;
    RC(cuInit(0), OK);
    RC(cuDevicePrimaryCtxRetain(&c, dev), OK);
    RC(cuCtxPushCurrent_v2(c), OK);
}

int in_child(void (*fn)(void *), void *arg) {
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

void expect_segv(CUdeviceptr p, const char *what) {
    if (no_fork()) return;
    int st = in_child(touch, (void *)(uintptr_t)p);
    check(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "host dereference of %s dies of SIGSEGV (status 0x%x)",
          what, st);
}

CUresult htod(CUdeviceptr dst, const void *src, size_t n) {
    CUresult r = cuMemcpyHtoDAsync_v2(dst, src, n, NULL);
    return r ? r : cuStreamSynchronize(NULL);
}

CUresult can_alloc(size_t size) {
    CUdeviceptr p;
    CUresult r = cuMemAlloc_v2(&p, size);
    if (r == OK) cuMemFree_v2(p);
    return r;
}

size_t mem_total(void) {
    const char *s = getenv("FAKECUDA_MEM_MB");
    return (size_t)(s ? atol(s) : 4096) * MiB;
}

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

/* Every case in its own process, so that each loads the library afresh. */
static int run_all(const char *argv0) {
    int failed = 0;
    for (int i = 0; i < NCASES; i++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            execl("/proc/self/exe", argv0, lib_path, CASES[i].name, (char *)NULL);
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

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s LIBPATH [CASE|all|list]\n", argv[0]);
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
    if (strcmp(which, "all") == 0) return run_all(argv[0]);
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
