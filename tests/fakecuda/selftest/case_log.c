/* The resource log (FAKECUDA_LOG): lines of a clean process, a leaky one
 * that exits from another thread, and one killed by a signal. */
#include "selftest.h"

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>

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
    CUmemAllocationProp prop = {.type = 1, .requestedHandleTypes = 1, .location = {1, 0}};
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

void case_log(void) {
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

