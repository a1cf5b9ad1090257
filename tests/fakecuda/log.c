/* The resource log (FAKECUDA_LOG): one JSON object per line, and an exit
 * line with what the process still holds. */
#include "fakecuda.h"

static atomic_long g_live[L_COUNT];
static pid_t g_exit_logged;

/* One write(2) per line on an O_APPEND descriptor: lines from several
 * processes do not interleave. */
void log_event(const char *op, unsigned long long bytes, int dev) {
    if (G.log_fd < 0) return;
    char buf[200];
    int n = snprintf(buf, sizeof buf, "{\"pid\": %d, \"op\": \"%s\", \"bytes\": %llu, \"dev\": %d}\n",
                     (int)getpid(), op, bytes, dev);
    if (n > 0 && write(G.log_fd, buf, (size_t)n) < 0) {
    }
}

void live_add(int kind, long d) { atomic_fetch_add(&g_live[kind], d); }

void live_reset(void) {
    for (int i = 0; i < L_COUNT; i++) atomic_store(&g_live[i], 0);
}

__attribute__((destructor)) static void fc_fini(void) {
    /* Runs at exit() (from any thread; the library pins itself, so never at
     * dlclose). Takes no lock: another thread may hold it forever. */
    if (G.log_fd < 0 || g_exit_logged == getpid()) return;
    g_exit_logged = getpid();
    long l[L_COUNT], total = 0;
    for (int i = 0; i < L_COUNT; i++) total += (l[i] = atomic_load(&g_live[i]));
    char buf[300];
    int n = snprintf(buf, sizeof buf,
                     "{\"op\": \"exit\", \"pid\": %d, \"leaks\": %ld, \"allocs\": %ld, \"handles\": %ld, "
                     "\"registrations\": %ld, \"pinned\": %ld, \"mappings\": %ld}\n",
                     (int)getpid(), total, l[L_ALLOC], l[L_HANDLE], l[L_REG], l[L_PINNED], l[L_MAP]);
    if (n > 0 && write(G.log_fd, buf, (size_t)n) < 0) {
    }
}
