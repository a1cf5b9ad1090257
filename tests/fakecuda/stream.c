/* Streams, events, the worker thread that runs their work, and the
 * asynchronous copy: work runs later, in order per stream, on ONE worker
 * serving every stream (round robin). */
#include "fakecuda.h"

#include <signal.h>
#include <time.h>

static void stream_maybe_free(struct fc_stream *s) {
    if (s->is_null || s->live || s->refs > 0 || s->head || s->busy) return;
    vec_remove(&G.streams, s);
    free(s);
}

static void event_unref(struct fc_event *e) {
    if (--e->refs > 0 || e->live) return;
    vec_remove(&G.events, e);
    if (e->rec_stream) {
        e->rec_stream->refs--;
        stream_maybe_free(e->rec_stream);
    }
    free(e);
}

static void op_free(op_t *op) {
    free(op->staged);
    if (op->ev) event_unref(op->ev);
    free(op);
}

void stream_kill(struct fc_stream *s) {
    s->live = 0;
    s->refs--;
    stream_maybe_free(s);
}

void event_kill(struct fc_event *e) {
    e->live = 0;
    event_unref(e);
}

/* ------------------------------------------------------------------------ */
/* The worker                                                                */
/* ------------------------------------------------------------------------ */

static void *worker_main(void *arg);

/* The worker is started on first use (and again in a forked child). */
static CUresult ensure_worker(void) {
    if (G.worker_running) return CUDA_SUCCESS;
    pthread_t t;
    pthread_attr_t at;
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    /* The worker takes no signals: they belong to the application. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(&t, &at, worker_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&at);
    if (e) {
        warn("cannot start the worker thread: %s", strerror(e));
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    G.worker_running = 1;
    return CUDA_SUCCESS;
}

/* Appends an op to a stream; the caller made sure the worker runs. */
static void enqueue(struct fc_stream *s, op_t *op) {
    op->next = NULL;
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    pthread_cond_signal(&G.work_cv);
}

/* Whether a copy to device `dev` must wait: FAKECUDA_COPY_GATE is set and
 * "<gate>.<dev>" does not exist yet. Lets a test hold one device's copies
 * until it has seen what it waits for, with no timing involved. */
static int gate_closed(int dev) {
    if (!G.gate) return 0;
    char path[4096];
    int n = snprintf(path, sizeof path, "%s.%d", G.gate, dev);
    return n > 0 && (size_t)n < sizeof path && access(path, F_OK) != 0;
}

/* Under the lock: a stream whose head op may run now, round robin; `*gated`
 * is set when a stream waits only for its gate. */
static struct fc_stream *pick_runnable(int *gated) {
    size_t n = G.streams.n;
    *gated = 0;
    for (size_t k = 0; k < n; k++) {
        struct fc_stream *s = G.streams.v[(G.rr + k) % n];
        if (s->head && !s->busy) {
            if (s->head->kind == OP_HTOD && gate_closed(s->ctx->dev)) {
                *gated = 1;
                continue;
            }
            G.rr = (G.rr + k + 1) % n;
            return s;
        }
    }
    return NULL;
}

static void set_sticky(struct fc_stream *s, CUresult r) {
    if (s->sticky == CUDA_SUCCESS) s->sticky = r;
}

/* Executes one op with the lock held. The tables are checked again now:
 * the device range must still be mapped with access, and a pinned or
 * registered host side must still be pinned/registered. A failure is
 * recorded on the stream (as a GPU fault would) and the copy is skipped. */
static void execute(struct fc_stream *s, op_t *op) {
    if (op->kind == OP_RECORD) {
        if (op->ev->done_id < op->evid) op->ev->done_id = op->evid;
        return;
    }
    if (dev_range(op->dptr, op->n, s->ctx->dev, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)) {
        set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
        return;
    }
    const void *src = op->staged;
    if (!src) {
        region_t *r = find_region_id(op->region);
        if (!r || (uintptr_t)op->host < r->start || (uintptr_t)op->host + op->n > r->end) {
            set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
            return;
        }
        src = op->host;
    }
    if (safe_copy(shadow(op->dptr), src, op->n)) set_sticky(s, CUDA_ERROR_ILLEGAL_ADDRESS);
}

static void sleep_us(unsigned long us) {
    struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    lock();
    for (;;) {
        int gated;
        struct fc_stream *s = pick_runnable(&gated);
        if (!s && gated) {
            /* Nothing signals a gate's file appearing: look again soon. */
            unlock();
            sleep_us(1000);
            lock();
            continue;
        }
        if (!s) {
            pthread_cond_wait(&G.work_cv, &G.mu);
            continue;
        }
        op_t *op = s->head;
        s->busy = 1;
        if (op->kind == OP_HTOD && G.delay_us) {
            /* The transfer time: others may issue and query meanwhile. */
            unlock();
            sleep_us(G.delay_us);
            lock();
        }
        execute(s, op);
        s->head = op->next;
        if (!s->head) s->tail = NULL;
        s->busy = 0;
        s->refs++; /* op_free may drop the last other reference to s */
        op_free(op);
        s->refs--;
        stream_maybe_free(s);
        pthread_cond_broadcast(&G.done_cv);
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Streams                                                                   */
/* ------------------------------------------------------------------------ */

/* Under the lock: resolves a stream handle. NULL (and CU_STREAM_LEGACY /
 * CU_STREAM_PER_THREAD) is the current context's own NULL stream. */
static CUresult stream_get(CUstream h, struct fc_stream **out) {
    if (h == NULL || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        struct fc_ctx *c;
        CUresult r = need_ctx(&c);
        if (r) return r;
        *out = &c->null_stream;
        return CUDA_SUCCESS;
    }
    for (size_t i = 0; i < G.streams.n; i++) {
        struct fc_stream *s = G.streams.v[i];
        if (s == h && s->live && !s->is_null) {
            *out = s;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuStreamCreate(CUstream *ph, unsigned flags) {
    ENTER(cuStreamCreate);
    if (!ph || (flags & ~(unsigned)CU_STREAM_NON_BLOCKING)) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    struct fc_stream *s = calloc(1, sizeof *s);
    if (!s || vec_push(&G.streams, s)) {
        free(s);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    s->ctx = c;
    s->live = 1;
    s->refs = 1;
    *ph = s;
out:
    unlock();
    return r;
}

/* Pending work still completes. */
EXPORT CUresult cuStreamDestroy_v2(CUstream h) {
    ENTER(cuStreamDestroy);
    NEED_INIT();
    if (!h || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) return CUDA_ERROR_INVALID_HANDLE;
    lock();
    struct fc_stream *s;
    CUresult r = stream_get(h, &s);
    if (!r) stream_kill(s);
    unlock();
    return r;
}

/* Waits until the stream has no work left; returns and clears its sticky
 * error. */
EXPORT CUresult cuStreamSynchronize(CUstream h) {
    ENTER(cuStreamSynchronize);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    CUresult r = stream_get(h, &s);
    if (!r) {
        s->refs++;
        while (s->head) pthread_cond_wait(&G.done_cv, &G.mu);
        s->refs--;
        r = s->sticky;
        s->sticky = CUDA_SUCCESS;
        stream_maybe_free(s);
    }
    unlock();
    return r;
}

/* ------------------------------------------------------------------------ */
/* Events                                                                    */
/* ------------------------------------------------------------------------ */

static struct fc_event *event_get(CUevent h) {
    for (size_t i = 0; i < G.events.n; i++) {
        struct fc_event *e = G.events.v[i];
        if (e == h && e->live) return e;
    }
    return NULL;
}

EXPORT CUresult cuEventCreate(CUevent *ph, unsigned flags) {
    ENTER(cuEventCreate);
    if (!ph || (flags & ~7u)) return CUDA_ERROR_INVALID_VALUE;
    if ((flags & CU_EVENT_INTERPROCESS) && !(flags & CU_EVENT_DISABLE_TIMING)) return CUDA_ERROR_INVALID_VALUE;
    NEED_INIT();
    lock();
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) goto out;
    struct fc_event *e = calloc(1, sizeof *e);
    if (!e || vec_push(&G.events, e)) {
        free(e);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    e->ctx = c;
    e->live = 1;
    e->refs = 1;
    *ph = e;
out:
    unlock();
    return r;
}

EXPORT CUresult cuEventDestroy_v2(CUevent ev) {
    ENTER(cuEventDestroy);
    NEED_INIT();
    lock();
    struct fc_event *e = event_get(ev);
    if (e) event_kill(e);
    unlock();
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuEventRecord(CUevent ev, CUstream h) {
    ENTER(cuEventRecord);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    struct fc_event *e = event_get(ev);
    CUresult r = e ? stream_get(h, &s) : CUDA_ERROR_INVALID_HANDLE;
    if (r) goto out;
    if (s->ctx != e->ctx) { /* the event and the stream must share a context */
        r = CUDA_ERROR_INVALID_HANDLE;
        goto out;
    }
    if ((r = ensure_worker())) goto out;
    op_t *op = calloc(1, sizeof *op);
    if (!op) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    op->kind = OP_RECORD;
    op->ev = e;
    op->evid = e->rec_id = ++G.next_id;
    e->refs++;
    if (e->rec_stream != s) {
        if (e->rec_stream) {
            e->rec_stream->refs--;
            stream_maybe_free(e->rec_stream);
        }
        e->rec_stream = s;
        s->refs++;
    }
    enqueue(s, op);
out:
    unlock();
    return r;
}

/* Waits for the last record (an event never recorded is complete); returns
 * (and clears) the sticky error of the stream it was recorded on. */
EXPORT CUresult cuEventSynchronize(CUevent ev) {
    ENTER(cuEventSynchronize);
    NEED_INIT();
    lock();
    struct fc_event *e = event_get(ev);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (e) {
        uint64_t target = e->rec_id;
        e->refs++;
        while (e->done_id < target) pthread_cond_wait(&G.done_cv, &G.mu);
        r = CUDA_SUCCESS;
        if (e->rec_stream) {
            r = e->rec_stream->sticky;
            e->rec_stream->sticky = CUDA_SUCCESS;
        }
        event_unref(e);
    }
    unlock();
    return r;
}

/* ------------------------------------------------------------------------ */
/* The asynchronous copy                                                     */
/* ------------------------------------------------------------------------ */

/* Issue-time checks: context, stream (of the current context), a device
 * range that exists now (access is checked when the copy runs, where a GPU
 * would fault). */
static CUresult async_prologue(CUstream h, CUdeviceptr dptr, size_t n, struct fc_stream **s) {
    struct fc_ctx *c;
    CUresult r = need_ctx(&c);
    if (r) return r;
    if ((r = stream_get(h, s))) return r;
    if ((*s)->ctx != c) return CUDA_ERROR_INVALID_HANDLE;
    if (n == 0) return CUDA_SUCCESS;
    if ((r = dev_range(dptr, n, c->dev, 0))) return r;
    return ensure_worker();
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream h) {
    ENTER(cuMemcpyHtoDAsync);
    NEED_INIT();
    lock();
    struct fc_stream *s;
    CUresult r = async_prologue(h, dst, n, &s);
    if (r || n == 0) goto out;
    if (!src) {
        r = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    op_t *op = calloc(1, sizeof *op);
    if (!op) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    op->kind = OP_HTOD;
    op->dptr = dst;
    op->host = src;
    op->n = n;
    region_t *x = find_region_covering((uintptr_t)src, n);
    if (x) {
        op->region = x->id; /* read when the copy runs */
    } else {
        /* Pageable: staged now, so the caller may reuse its buffer. */
        if (!(op->staged = malloc(n))) {
            r = CUDA_ERROR_OUT_OF_MEMORY;
        } else if (safe_copy(op->staged, src, n)) {
            r = CUDA_ERROR_INVALID_VALUE;
        }
    }
    if (r) {
        op_free(op);
    } else {
        log_event("copy", n, s->ctx->dev);
        enqueue(s, op);
    }
out:
    unlock();
    return r;
}
