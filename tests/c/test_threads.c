/*
 * The thread-safety contract of rzc.h ("Threads" in its preamble), checked
 * from C with POSIX threads, one promise per test:
 *  - calls taking a const handle run on several threads at once on one
 *    handle (tables, lookups, metadata, DLPack exports, digests, uploads,
 *    device reads and exports, plan writes, sealer advances);
 *  - rzc_last_error_message() is this thread's own;
 *  - a handle is not tied to a thread: made on one, freed on another, its
 *    tensors' deleters run on others still, and the release callback runs
 *    once, on the thread that let go of the last of them;
 *  - with a CUDA driver: uploads of one handle at once, in every staging
 *    mode, with other chunk sizes, to one device or several, all succeed
 *    and read back the source's bytes; uploads under one share key at once
 *    make one allocation.
 * Threads start together (a barrier) and repeat their calls, so that they
 * overlap. Run natively and under valgrind by `make test-c`, and on the
 * stand-in driver by `make test-gpu`.
 *
 * Usage: test_threads FIXTURE_DIR
 */
#define _POSIX_C_SOURCE 200112L
#include "rzc.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define THREADS 8
#define ROUNDS 40

static int failures = 0;
static int checks = 0;
static pthread_mutex_t counts = PTHREAD_MUTEX_INITIALIZER;

/* CHECK from any thread: the counters are shared. */
#define CHECK(cond)                                                            \
  do {                                                                         \
    int ok_ = (cond) ? 1 : 0;                                                  \
    pthread_mutex_lock(&counts);                                               \
    checks++;                                                                  \
    if (!ok_) {                                                                \
      failures++;                                                              \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,  \
              __LINE__, #cond, rzc_last_error_message());                      \
    }                                                                          \
    pthread_mutex_unlock(&counts);                                             \
  } while (0)

static pthread_barrier_t start;

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Runs fn(k) on n threads (k = 0..n-1) released together by a barrier. */
static void run_threads(int n, void *(*fn)(void *), void **args) {
  pthread_t t[THREADS];
  pthread_barrier_init(&start, NULL, (unsigned)n);
  for (int k = 0; k < n; k++) pthread_create(&t[k], NULL, fn, args[k]);
  for (int k = 0; k < n; k++) pthread_join(t[k], NULL);
  pthread_barrier_destroy(&start);
}

/* A buffer of `n` float32 tensors of `numel` elements each, packed by the
 * library (256-byte aligned tensors, `guard_nbytes` of other bytes around
 * them), page-aligned: tensor i holds i * 1000 + j. */
static uint8_t *make_buffer(int n, int numel, uint64_t guard_nbytes, size_t *len) {
  rzc_pack_tensor in[16];
  char names[16][8];
  int64_t shape[1] = {numel};
  float *data = malloc((size_t)n * (size_t)numel * sizeof(float));
  for (int i = 0; i < n; i++) {
    snprintf(names[i], sizeof names[i], "w%d", i);
    for (int j = 0; j < numel; j++) data[i * numel + j] = (float)(i * 1000 + j);
    rzc_pack_tensor t = {names[i], strlen(names[i]), RZC_DTYPE_F32, 1, shape,
                         (const uint8_t *)(data + (size_t)i * (size_t)numel),
                         (uint64_t)numel * sizeof(float)};
    in[i] = t;
  }
  rzc_pack_options opts = {.struct_nbytes = sizeof(rzc_pack_options), .guard_nbytes = guard_nbytes};
  rzc_pack_plan *plan = NULL;
  CHECK(rzc_pack_plan_new(in, (size_t)n, NULL, 0, &opts, &plan) == RZC_OK);
  *len = (size_t)rzc_pack_plan_nbytes(plan);
  uint8_t *buf = NULL;
  CHECK(posix_memalign((void **)&buf, 4096, *len) == 0);
  CHECK(rzc_pack_plan_write(plan, buf, *len) == RZC_OK);
  rzc_pack_plan_free(plan);
  free(data);
  return buf;
}

/* -- one handle, read from every thread at once ---------------------------- */
struct reader {
  const rzc_weights *w;
  int id;
  size_t n;
  const rzc_tensor_info *expect; /* the table, read before the threads */
  const rzc_digest *digest;
  DLManagedTensorVersioned *kept[ROUNDS]; /* freed by another thread */
};

static void *read_shared(void *arg) {
  struct reader *r = arg;
  rzc_tensor_info *all = malloc(r->n * sizeof *all);
  char missing[32];
  snprintf(missing, sizeof missing, "missing-%d", r->id);
  pthread_barrier_wait(&start);
  for (int round = 0; round < ROUNDS; round++) {
    size_t i = (size_t)(round + r->id) % r->n;
    CHECK(rzc_weights_len(r->w) == r->n);
    CHECK(rzc_weights_get_all(r->w, all, r->n) == RZC_OK);
    for (size_t j = 0; j < r->n; j++)
      CHECK(all[j].name == r->expect[j].name && all[j].data == r->expect[j].data &&
            all[j].shape == r->expect[j].shape && all[j].nbytes == r->expect[j].nbytes);
    size_t at = (size_t)-1;
    CHECK(rzc_weights_find_n(r->w, r->expect[i].name, r->expect[i].name_len, &at) == RZC_OK && at == i);
    const char *value = NULL;
    size_t value_len = 0;
    CHECK(rzc_weights_metadata_find(r->w, "producer", &value, &value_len) == RZC_OK && value_len == 13);
    /* This thread's error message is its own, whatever the others do. */
    CHECK(rzc_weights_find(r->w, missing, &at) == RZC_NOT_FOUND);
    CHECK(strstr(rzc_last_error_message(), missing) != NULL);
    DLManagedTensorVersioned *t = NULL;
    DLManagedTensor *legacy = NULL;
    CHECK(rzc_weights_to_dlpack(r->w, i, &t) == RZC_OK);
    CHECK(strcmp(rzc_last_error_message(), "") == 0); /* after a success */
    CHECK(t->dl_tensor.data == r->expect[i].data);
    CHECK(rzc_weights_to_dlpack_legacy(r->w, i, &legacy) == RZC_OK);
    CHECK(legacy->dl_tensor.data == r->expect[i].data);
    legacy->deleter(legacy);
    r->kept[round] = t;
    DLManagedTensorVersioned *section = NULL;
    CHECK(rzc_weights_data_to_dlpack(r->w, &section) == RZC_OK);
    rzc_dlpack_versioned_free(section);
    if (round % 8 == 0) {
      rzc_digest d;
      CHECK(rzc_weights_content_digest(r->w, 0, &d) == RZC_OK);
      CHECK(memcmp(d.bytes, r->digest->bytes, 32) == 0);
    }
  }
  free(all);
  return NULL;
}

/* Frees the tensors another thread exported; thread 0 frees the handle
 * first, while the others free their tensors. */
static rzc_weights *to_free;
static void *free_kept(void *arg) {
  struct reader *r = arg;
  pthread_barrier_wait(&start);
  if (r->id == 0) rzc_weights_free(to_free);
  for (int round = 0; round < ROUNDS; round++) r->kept[round]->deleter(r->kept[round]);
  return NULL;
}

static int released = 0;
static pthread_t released_on;
static void on_release(void *ctx) {
  (void)ctx;
  pthread_mutex_lock(&counts);
  released++;
  released_on = pthread_self();
  pthread_mutex_unlock(&counts);
}

static void test_one_handle(const char *dir) {
  size_t n = strlen(dir) + 32;
  char *path = malloc(n);
  snprintf(path, n, "%s/sample.safetensors", dir);
  FILE *f = fopen(path, "rb");
  CHECK(f != NULL);
  fseek(f, 0, SEEK_END);
  size_t len = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *buf = malloc(len);
  CHECK(fread(buf, 1, len, f) == len);
  fclose(f);
  free(path);

  rzc_open_options opts = {.struct_nbytes = sizeof(rzc_open_options)};
  opts.release = on_release;
  rzc_weights *w = NULL;
  CHECK(rzc_weights_open_memory_ex(buf, len, &opts, &w) == RZC_OK);
  struct reader r[THREADS];
  size_t count = rzc_weights_len(w);
  rzc_tensor_info *expect = malloc(count * sizeof *expect);
  CHECK(rzc_weights_get_all(w, expect, count) == RZC_OK);
  rzc_digest digest;
  CHECK(rzc_weights_content_digest(w, 0, &digest) == RZC_OK);
  void *args[THREADS];
  for (int k = 0; k < THREADS; k++) {
    struct reader x = {w, k, count, expect, &digest, {NULL}};
    r[k] = x;
    args[k] = &r[k];
  }
  run_threads(THREADS, read_shared, args);

  /* The handle, made on this thread, is freed on another while the others
   * free the tensors the readers exported: the buffer is released once, by
   * whichever thread lets go of the last of them. */
  CHECK(released == 0);
  to_free = w;
  run_threads(THREADS, free_kept, args);
  CHECK(released == 1 && !pthread_equal(released_on, pthread_self()));
  free(expect);
  free(buf);
}

/* -- one buffer opened, write-protected, by several threads at once ------- */
/* Whether the page holding `p` is writable in this process. */
static int writable(const void *p) {
  FILE *f = fopen("/proc/self/maps", "r");
  char line[512];
  int w = -1;
  while (f && w < 0 && fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    char perms[5];
    if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) == 3 && lo <= (unsigned long)p && (unsigned long)p < hi)
      w = perms[1] == 'w';
  }
  if (f) fclose(f);
  return w;
}

struct opener {
  const uint8_t *buf;
  size_t len;
  rzc_weights *w;
};

static void *open_protected(void *arg) {
  struct opener *o = arg;
  rzc_open_options opts = {.struct_nbytes = sizeof(rzc_open_options), .flags = RZC_OPEN_WRITE_PROTECT};
  pthread_barrier_wait(&start);
  CHECK(rzc_weights_open_memory_ex(o->buf, o->len, &opts, &o->w) == RZC_OK);
  CHECK(rzc_weights_guard_state(o->w) == RZC_GUARD_PRIVATE);
  return NULL;
}

static void *free_opened(void *arg) {
  struct opener *o = arg;
  pthread_barrier_wait(&start);
  rzc_weights_free(o->w);
  return NULL;
}

static void test_open_at_once(void) {
  size_t len = 0;
  uint8_t *buf = make_buffer(4, 4096, 4096, &len);
  struct opener o[THREADS];
  void *args[THREADS];
  for (int k = 0; k < THREADS; k++) {
    struct opener x = {buf, len, NULL};
    o[k] = x;
    args[k] = &o[k];
  }
  run_threads(THREADS, open_protected, args);
  rzc_tensor_info t;
  CHECK(rzc_weights_get(o[0].w, 0, &t) == RZC_OK);
  CHECK(writable(t.data) == 0);
  /* All but one freed at once: the pages stay read-only for the last. */
  run_threads(THREADS - 1, free_opened, args + 1);
  CHECK(writable(t.data) == 0);
  rzc_weights_free(o[0].w);
  CHECK(writable(t.data) == 1);
  free(buf);
}

/* -- a plan written, and a sealer advanced, from several threads ---------- */
struct writer {
  const rzc_pack_plan *plan;
  uint8_t *dst;
  size_t len;
  const rzc_pack_sealer *sealer;
  size_t from, to; /* the stripe this thread declares final (the buffer is written whole first:
                      advance's upto is a prefix every writer has finished) */
};

static void *write_plan(void *arg) {
  struct writer *x = arg;
  pthread_barrier_wait(&start);
  CHECK(rzc_pack_plan_write(x->plan, x->dst, x->len) == RZC_OK);
  return NULL;
}

static void *advance(void *arg) {
  struct writer *x = arg;
  pthread_barrier_wait(&start);
  for (size_t at = x->from; at < x->to; at += 64) CHECK(rzc_pack_sealer_advance(x->sealer, at) == RZC_OK);
  CHECK(rzc_pack_sealer_advance(x->sealer, x->to) == RZC_OK);
  return NULL;
}

static void test_pack(void) {
  /* Small: a data section under blake3's parallel threshold (8 KiB), so
   * that no pool of hashing threads outlives the test (valgrind counts
   * what such a pool holds at exit as "still reachable"). */
  float a[512];
  for (int j = 0; j < 512; j++) a[j] = (float)j;
  int64_t shape[1] = {512};
  rzc_pack_tensor in[2] = {{"a", 1, RZC_DTYPE_F32, 1, shape, (const uint8_t *)a, sizeof a},
                           {"b", 1, RZC_DTYPE_F32, 1, shape, (const uint8_t *)a, sizeof a}};
  rzc_pack_options popts = {.struct_nbytes = sizeof(rzc_pack_options), .reserve_digest = 1};
  rzc_pack_plan *plan = NULL;
  CHECK(rzc_pack_plan_new(in, 2, NULL, 0, &popts, &plan) == RZC_OK);
  size_t len = (size_t)rzc_pack_plan_nbytes(plan);
  struct writer x[THREADS];
  void *args[THREADS];
  for (int k = 0; k < THREADS; k++) {
    struct writer y = {plan, malloc(len), len, NULL, 0, 0};
    x[k] = y;
    args[k] = &x[k];
  }
  run_threads(THREADS, write_plan, args);
  for (int k = 1; k < THREADS; k++) CHECK(memcmp(x[k].dst, x[0].dst, len) == 0);
  rzc_digest sealed;
  CHECK(rzc_pack_seal(x[0].dst, len, &sealed) == RZC_OK);

  /* A buffer filled, and declared final stripe by stripe, by several
   * threads at once: the same digest as sealing it whole. */
  uint8_t *dst = x[1].dst;
  CHECK(rzc_pack_plan_write_layout(plan, dst, len) == RZC_OK);
  rzc_pack_sealer *sealer = NULL;
  CHECK(rzc_pack_sealer_new(dst, len, &sealer) == RZC_OK);
  CHECK(rzc_pack_plan_write(plan, dst, len) == RZC_OK);
  for (int k = 0; k < THREADS; k++) {
    x[k].sealer = sealer;
    x[k].from = len * (size_t)k / THREADS;
    x[k].to = len * (size_t)(k + 1) / THREADS;
  }
  run_threads(THREADS, advance, args);
  rzc_digest streamed;
  CHECK(rzc_pack_sealer_finish(sealer, &streamed) == RZC_OK);
  CHECK(memcmp(streamed.bytes, sealed.bytes, 32) == 0);
  rzc_pack_sealer_free(sealer);
  rzc_pack_plan_free(plan);
  for (int k = 0; k < THREADS; k++) free(x[k].dst);
}

/* -- tensors copied by one sealer from several threads at once ---------- */
struct copier {
  const rzc_pack_sealer *sealer;
  rzc_pack_copy copies[2];
};

static void *copy_tensors(void *arg) {
  struct copier *x = arg;
  pthread_barrier_wait(&start);
  CHECK(rzc_pack_sealer_copy(x->sealer, x->copies, 2, 2) == RZC_OK);
  return NULL;
}

static void test_sealer_copy(void) {
  /* 2 * THREADS tensors over several 1 MiB hashing blocks, most of them
   * straddling a block boundary: each thread copies two (on two threads of
   * the library's), so blocks complete on whichever thread writes last. */
  enum { N = 2 * THREADS };
  uint8_t *data[N];
  int64_t shapes[N];
  rzc_pack_tensor in[N];
  char names[N][8];
  for (int k = 0; k < N; k++) {
    shapes[k] = 250000 + 37 * k;
    data[k] = malloc((size_t)shapes[k]);
    memset(data[k], k + 1, (size_t)shapes[k]);
    snprintf(names[k], sizeof names[k], "t%d", k);
    rzc_pack_tensor t = {names[k], strlen(names[k]), RZC_DTYPE_U8, 1, &shapes[k], data[k], (uint64_t)shapes[k]};
    in[k] = t;
  }
  rzc_pack_options popts = {.struct_nbytes = sizeof(rzc_pack_options), .reserve_digest = 1};
  rzc_pack_plan *plan = NULL;
  CHECK(rzc_pack_plan_new(in, N, NULL, 0, &popts, &plan) == RZC_OK);
  size_t len = (size_t)rzc_pack_plan_nbytes(plan);
  uint8_t *whole = malloc(len), *dst = malloc(len);
  CHECK(rzc_pack_plan_write(plan, whole, len) == RZC_OK);
  rzc_digest sealed, copied;
  CHECK(rzc_pack_seal(whole, len, &sealed) == RZC_OK);

  CHECK(rzc_pack_plan_write_layout(plan, dst, len) == RZC_OK);
  rzc_pack_sealer *sealer = NULL;
  CHECK(rzc_pack_sealer_new(dst, len, &sealer) == RZC_OK);
  struct copier x[THREADS];
  void *args[THREADS];
  for (int k = 0; k < THREADS; k++) {
    x[k].sealer = sealer;
    for (int j = 0; j < 2; j++) {
      int t = k + j * THREADS; /* not neighbours: blocks are shared across threads */
      uint64_t at = 0;
      CHECK(rzc_pack_plan_offset(plan, (size_t)t, &at) == RZC_OK);
      rzc_pack_copy c = {data[t], at, (uint64_t)shapes[t]};
      x[k].copies[j] = c;
    }
    args[k] = &x[k];
  }
  run_threads(THREADS, copy_tensors, args);
  /* Every tensor is taken: another copy of one is refused. */
  CHECK(rzc_pack_sealer_copy(sealer, x[0].copies, 1, 0) == RZC_INVALID_ARGUMENT);
  CHECK(strstr(rzc_last_error_message(), "filled already") != NULL);
  CHECK(rzc_pack_sealer_finish(sealer, &copied) == RZC_OK);
  CHECK(memcmp(copied.bytes, sealed.bytes, 32) == 0 && memcmp(dst, whole, len) == 0);
  rzc_pack_sealer_free(sealer);
  rzc_pack_plan_free(plan);
  for (int k = 0; k < N; k++) free(data[k]);
  free(whole);
  free(dst);
}

/* -- uploads of one handle at once, and one upload read from every thread -- */
struct uploader {
  const rzc_weights *w;
  int32_t ordinal;
  uint32_t staging;
  uint64_t chunk;
  const char *share_key;
  long after_ms;
  rzc_device_weights *dev;
  rzc_status status;
  char message[256];
};

static void *upload(void *arg) {
  struct uploader *u = arg;
  rzc_upload_options o = {.struct_nbytes = sizeof(rzc_upload_options)};
  o.staging = u->staging;
  o.chunk_nbytes = u->chunk;
  if (u->share_key) {
    o.share_key = u->share_key;
    o.share_key_len = strlen(u->share_key);
  }
  pthread_barrier_wait(&start);
  sleep_ms(u->after_ms);
  u->status = rzc_device_weights_upload(u->w, u->ordinal, &o, &u->dev);
  snprintf(u->message, sizeof u->message, "%s", rzc_last_error_message());
  return NULL;
}

/* Whether every tensor of `dev` reads back as `w` has it. */
static int reads_back(const rzc_weights *w, const rzc_device_weights *dev) {
  int ok = 1;
  for (size_t i = 0; i < rzc_weights_len(w); i++) {
    rzc_tensor_info host;
    rzc_device_tensor_info d;
    ok &= rzc_weights_get(w, i, &host) == RZC_OK && rzc_device_weights_get(dev, i, &d) == RZC_OK;
    uint8_t *back = malloc((size_t)d.nbytes + 1);
    ok &= rzc_device_weights_read(dev, i, back, (size_t)d.nbytes) == RZC_OK;
    ok &= memcmp(back, host.data, (size_t)d.nbytes) == 0;
    free(back);
  }
  return ok;
}

struct device_reader {
  const rzc_weights *w;
  const rzc_device_weights *dev;
  uint64_t device_ptr;
};

static void *read_device(void *arg) {
  struct device_reader *r = arg;
  pthread_barrier_wait(&start);
  for (int round = 0; round < 4; round++) {
    CHECK(reads_back(r->w, r->dev));
    rzc_device_info info = {.struct_nbytes = sizeof(rzc_device_info)};
    CHECK(rzc_device_weights_info(r->dev, &info) == RZC_OK && info.device_ptr == r->device_ptr);
    DLManagedTensorVersioned *t = NULL;
    CHECK(rzc_device_weights_to_dlpack(r->dev, (size_t)round % rzc_device_weights_len(r->dev), &t) == RZC_OK);
    CHECK(t->dl_tensor.device.device_type == kDLCUDA);
    t->deleter(t);
  }
  return NULL;
}

static void test_device(void) {
  int32_t count = 0;
  if (rzc_cuda_count_devices(&count) != RZC_OK || count == 0) {
    printf("no CUDA device here: the device half is left out\n");
    return;
  }
  size_t len = 0;
  uint8_t *buf = make_buffer(6, 20000, 0, &len);
  rzc_weights *w = NULL;
  CHECK(rzc_weights_open_memory(buf, len, &w) == RZC_OK);

  /* Every staging mode, two chunk sizes, every device, at once: the first
   * registers the whole buffer in one chunk; the others start while its
   * copies are in flight. */
  struct uploader u[THREADS] = {
      {w, 0, RZC_STAGING_REGISTER, 1 << 20, NULL, 0, NULL, RZC_OK, ""},
      {w, 1, RZC_STAGING_PAGEABLE, 0, NULL, 2, NULL, RZC_OK, ""},
      {w, 0, RZC_STAGING_AUTO, 0, NULL, 2, NULL, RZC_OK, ""},
      {w, 1, RZC_STAGING_REGISTER, 16384, NULL, 4, NULL, RZC_OK, ""},
      {w, 0, RZC_STAGING_PINNED, 16384, NULL, 4, NULL, RZC_OK, ""},
      {w, 1, RZC_STAGING_AUTO, 65536, NULL, 6, NULL, RZC_OK, ""},
      {w, 0, RZC_STAGING_PAGEABLE, 0, NULL, 6, NULL, RZC_OK, ""},
      {w, 1, RZC_STAGING_REGISTER, 0, NULL, 8, NULL, RZC_OK, ""},
  };
  void *args[THREADS];
  for (int k = 0; k < THREADS; k++) {
    u[k].ordinal %= count;
    args[k] = &u[k];
  }
  run_threads(THREADS, upload, args);
  for (int k = 0; k < THREADS; k++) {
    if (u[k].status != RZC_OK) fprintf(stderr, "upload %d: %s\n", k, u[k].message);
    CHECK(u[k].status == RZC_OK);
    if (u[k].status != RZC_OK) continue;
    CHECK(reads_back(w, u[k].dev));
  }

  /* One upload, read and exported from every thread at once. */
  rzc_device_info info = {.struct_nbytes = sizeof(rzc_device_info)};
  CHECK(u[0].status == RZC_OK && rzc_device_weights_info(u[0].dev, &info) == RZC_OK);
  struct device_reader r = {w, u[0].dev, info.device_ptr};
  for (int k = 0; k < THREADS; k++) args[k] = &r;
  if (u[0].status == RZC_OK) run_threads(THREADS, read_device, args);
  for (int k = 0; k < THREADS; k++) rzc_device_weights_free(u[k].dev);

  /* Uploads under one share key at once, from several threads of this
   * process: one allocation, which every one of them maps. */
  char key[64];
  snprintf(key, sizeof key, "c-threads-%ld", (long)getpid());
  for (int k = 0; k < 4; k++) {
    struct uploader s = {w, 0, RZC_STAGING_AUTO, 0, key, 0, NULL, RZC_OK, ""};
    u[k] = s;
    args[k] = &u[k];
  }
  run_threads(4, upload, args);
  uint64_t ptr = 0;
  for (int k = 0; k < 4; k++) {
    if (u[k].status != RZC_OK) fprintf(stderr, "shared upload %d: %s\n", k, u[k].message);
    CHECK(u[k].status == RZC_OK);
    if (u[k].status != RZC_OK) continue;
    rzc_device_info i = {.struct_nbytes = sizeof(rzc_device_info)};
    CHECK(rzc_device_weights_info(u[k].dev, &i) == RZC_OK);
    if (i.sharing == RZC_SHARING_PRIVATE) printf("sharing did not apply: %.*s\n", (int)i.note_len, i.note);
    CHECK(i.sharing == RZC_SHARING_UPLOADED);
    CHECK(ptr == 0 || i.device_ptr == ptr);
    ptr = i.device_ptr;
    CHECK(reads_back(w, u[k].dev));
  }
  for (int k = 0; k < 4; k++) rzc_device_weights_free(u[k].dev);
  rzc_weights_free(w);
  free(buf);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s FIXTURE_DIR\n", argv[0]);
    return 2;
  }
  test_one_handle(argv[1]);
  test_open_at_once();
  test_pack();
  test_sealer_copy();
  test_device();
  printf("C threads: %d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
