/* Virtual memory management, and sharing it between two processes through
 * an exported file descriptor. */
#include "selftest.h"

#include <sys/socket.h>

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

/* Device memory left, as allocations see it: exactly `left` bytes. */
static void left_exactly(size_t left, const char *what) {
    check(can_alloc(left) == OK && can_alloc(left + 4096) == OUT_OF_MEMORY, "%s: %zu MiB left", what, left >> 20);
}

/* Creation: arguments, and the memory it takes from the device. */
static void vmm_create(CUmemGenericAllocationHandle *h) {
    CUmemAllocationProp prop = vmm_prop(1), bad;
    size_t g = 0;
    RC(cuMemGetAllocationGranularity(&g, &prop, 0), OK);
    check(g == GRAN, "minimum granularity %zu", g);
    RC(cuMemGetAllocationGranularity(&g, &prop, 1), OK);
    check(g == GRAN, "recommended granularity %zu", g);
    RC(cuMemGetAllocationGranularity(&g, &prop, 2), INVALID_VALUE);
    RC(cuMemGetAllocationGranularity(NULL, &prop, 0), INVALID_VALUE);
    RC(cuMemCreate(h, MiB, &prop, 0), INVALID_VALUE);
    RC(cuMemCreate(h, 128 * MiB, &prop, 0), OUT_OF_MEMORY);
    bad = prop;
    bad.type = 2;
    RC(cuMemCreate(h, GRAN, &bad, 0), INVALID_VALUE);
    bad = prop;
    bad.location.id = 3;
    RC(cuMemCreate(h, GRAN, &bad, 0), INVALID_DEVICE);
    bad = prop;
    bad.requestedHandleTypes = 8;
    RC(cuMemCreate(h, GRAN, &bad, 0), NOT_SUPPORTED);
    RC(cuMemCreate(NULL, GRAN, &prop, 0), INVALID_VALUE);
    left_exactly(64 * MiB, "before cuMemCreate");
    RC(cuMemCreate(h, 4 * MiB, &prop, 0), OK);
    left_exactly(60 * MiB, "cuMemCreate is counted against device memory");
}

/* Mapping, and access: copies need it, per direction. */
static void vmm_map_access(CUdeviceptr va, CUmemGenericAllocationHandle h, unsigned char *buf,
                           unsigned char *back) {
    RC(cuMemMap(va, 4 * MiB, 0, h, 0), OK);
    RC(cuMemMap(va, 2 * MiB, 0, h, 0), ALREADY_MAPPED);
    RC(cuMemMap(va + 4 * MiB, 2 * MiB, 4096, h, 0), INVALID_VALUE);
    RC(cuMemMap(va + 4 * MiB, 4 * MiB, 2 * MiB, h, 0), INVALID_VALUE); /* beyond the handle */
    RC(cuMemMap(va + 6 * MiB, 4 * MiB, 0, h, 0), INVALID_VALUE);       /* runs past the reservation */
    RC(cuMemMap(va + 4 * MiB, 2 * MiB, 0, 12345, 0), INVALID_VALUE);

    memset(buf, 0x3c, 4 * MiB);
    RC(htod(va, buf, 4096), ILLEGAL_ADDRESS); /* no access before cuMemSetAccess */
    RC(cuMemcpyDtoH_v2(back, va, 4096), ILLEGAL_ADDRESS);
    set_access(va, 4 * MiB, 3);
    RC(htod(va, buf, 4 * MiB), OK);
    RC(cuMemcpyDtoH_v2(back, va, 4 * MiB), OK);
    check(memcmp(buf, back, 4 * MiB) == 0, "VMM memory holds what was copied in");
    RC(htod(va + 2 * MiB, buf, 4 * MiB), INVALID_VALUE); /* runs past the mapping */

    /* read-only: copies in fail when they run, copies out work */
    set_access(va, 4 * MiB, 1);
    RC(htod(va, buf, 4096), ILLEGAL_ADDRESS);
    RC(cuMemcpyDtoH_v2(back, va, 4096), OK);
    CUstream s;
    RC(cuStreamCreate(&s, 1), OK);
    RC(cuMemcpyHtoDAsync_v2(va, buf, 4096, s), OK);
    RC(cuStreamSynchronize(s), ILLEGAL_ADDRESS);
    RC(cuStreamDestroy_v2(s), OK);
    /* access set on half a mapping */
    set_access(va + 2 * MiB, 2 * MiB, 3);
    RC(htod(va + 2 * MiB, buf, 4096), OK);
    RC(htod(va, buf, 4096), ILLEGAL_ADDRESS); /* the first half is still read-only */
    RC(cuMemcpyDtoH_v2(back, va, 4096), OK);
    set_access(va, 4 * MiB, 3);
}

/* Export refused where it must be, and an fd this library did not export. */
static void vmm_export_errors(CUmemGenericAllocationHandle h, CUmemGenericAllocationHandle h2) {
    int fd = -1;
    CUmemGenericAllocationHandle hx;
    RC(cuMemExportToShareableHandle(&fd, h2, 1, 0), INVALID_VALUE); /* not created exportable */
    RC(cuMemExportToShareableHandle(&fd, h, 2, 0), NOT_SUPPORTED);
    RC(cuMemExportToShareableHandle(NULL, h, 1, 0), INVALID_VALUE);
    int pipefd[2];
    if (pipe(pipefd) == 0) {
        RC(cuMemImportFromShareableHandle(&hx, (void *)(intptr_t)pipefd[0], 1), INVALID_VALUE);
        close(pipefd[0]);
        close(pipefd[1]);
    }
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

/* Two processes share memory through an exported fd. */
static void vmm_share(unsigned char *back) {
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
    left_exactly(64 * MiB, "imported memory is not counted in the importing process");
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

void case_vmm(void) {
    setenv("FAKECUDA_MEM_MB", "64", 1);
    load();
    init_and_push(0);
    CUmemGenericAllocationHandle h, h2;
    vmm_create(&h);
    CUdeviceptr va, va2;
    RC(cuMemAddressReserve(&va, 8 * MiB, 0, 0, 0), OK);
    check(va % GRAN == 0, "reserved VA %#llx is 2 MiB aligned", va);
    RC(cuMemAddressReserve(&va2, 2 * MiB, 16 * MiB, 0, 0), OK);
    check(va2 % (16 * MiB) == 0, "alignment honoured (%#llx)", va2);
    RC(cuMemAddressReserve(&va2, MiB, 0, 0, 0), INVALID_VALUE);
    unsigned char *buf = malloc(4 * MiB), *back = malloc(4 * MiB);
    vmm_map_access(va, h, buf, back);
    CUmemAllocationProp plain = vmm_prop(0);
    RC(cuMemCreate(&h2, 2 * MiB, &plain, 0), OK);
    vmm_export_errors(h, h2);
    expect_segv(va, "a mapped VMM address");

    /* release while mapped: the memory lives on until unmapped */
    RC(cuMemRelease(h), OK);
    RC(cuMemRelease(h), INVALID_VALUE);
    RC(cuMemcpyDtoH_v2(back, va, 4096), OK);
    check(all_eq(back, 4096, 0x3c), "released but still mapped: still readable");
    RC(cuMemUnmap(va, 2 * MiB), INVALID_VALUE);       /* half of a mapping */
    RC(cuMemAddressFree(va, 8 * MiB), INVALID_VALUE); /* still mapped */
    RC(cuMemUnmap(va, 4 * MiB), OK);
    RC(cuMemcpyDtoH_v2(back, va, 4096), INVALID_VALUE);
    left_exactly(62 * MiB, "unmapped and released: only h2's 2 MiB still counted");
    RC(cuMemAddressFree(va, 4 * MiB), INVALID_VALUE); /* wrong size */
    RC(cuMemAddressFree(va, 8 * MiB), OK);
    RC(cuMemAddressFree(va2, 2 * MiB), OK);
    RC(cuMemRelease(h2), OK);
    if (!no_fork()) vmm_share(back);
    free(buf);
    free(back);
}
