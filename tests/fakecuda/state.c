/* The process-wide state: configuration read at load, the tables, and what
 * a forked child keeps of them. */
#include "fakecuda.h"

#include <dlfcn.h>
#include <stdarg.h>

struct fc_state G = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .work_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
    .log_fd = -1,
};

struct fc_ctx g_ctx[MAXDEV];

void lock(void) { pthread_mutex_lock(&G.mu); }
void unlock(void) { pthread_mutex_unlock(&G.mu); }

void warn(const char *fmt, ...) {
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

int vec_push(vec_t *a, void *p) {
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

void vec_remove(vec_t *a, void *p) {
    for (size_t i = 0; i < a->n; i++)
        if (a->v[i] == p) {
            vec_del(a, i);
            return;
        }
}

/* ------------------------------------------------------------------------ */
/* Configuration                                                             */
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

/* ------------------------------------------------------------------------ */
/* fork                                                                      */
/* ------------------------------------------------------------------------ */

static void fork_prepare(void) { lock(); }
static void fork_parent(void) { unlock(); }

static void free_all(vec_t *v) {
    for (size_t i = 0; i < v->n; i++) free(v->v[i]);
    v->n = 0;
}

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
    free_all(&G.events);
    for (int d = 0; d < G.ndev; d++) vec_push(&G.streams, &g_ctx[d].null_stream);
    free_all(&G.allocs);
    free_all(&G.regions);
    free_all(&G.maps);
    free_all(&G.resvs);
    for (size_t i = 0; i < G.phys.n; i++) close(((phys_t *)G.phys.v[i])->fd);
    free_all(&G.phys);
    if (G.va_ready) {
        mmap((void *)(G.shadow_base + (G.vmm_base - G.va_base)), G.vmm_size, PROT_NONE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        for (int d = 0; d < G.ndev; d++) {
            close(G.arena_fd[d]);
            G.arena_fd[d] = new_arena_fd(d);
        }
    }
    for (int d = 0; d < G.ndev; d++) G.used[d] = 0;
    live_reset();
    faults_reset_counts();
}

/* ------------------------------------------------------------------------ */
/* Load                                                                      */
/* ------------------------------------------------------------------------ */

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
    G.gate = getenv("FAKECUDA_COPY_GATE");
    if (G.gate && !*G.gate) G.gate = NULL;
    G.no_ro_register = env_long("FAKECUDA_NO_READONLY_REGISTER", 0, 0, 1) == 1;
    G.no_vmm = env_long("FAKECUDA_NO_VMM", 0, 0, 1) == 1;
    parse_visible();
    const char *fail = getenv("FAKECUDA_FAIL");
    if (fail) faults_parse(fail);
    const char *log = getenv("FAKECUDA_LOG");
    if (log && *log) {
        G.log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (G.log_fd < 0) warn("cannot open FAKECUDA_LOG=%s: %s", log, strerror(errno));
    }
    for (int d = 0; d < G.ndev; d++) {
        g_ctx[d].dev = d;
        g_ctx[d].null_stream.ctx = &g_ctx[d];
        g_ctx[d].null_stream.is_null = 1;
        g_ctx[d].null_stream.live = 1;
        vec_push(&G.streams, &g_ctx[d].null_stream);
    }
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}
