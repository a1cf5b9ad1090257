/*
 * C caller test: written only against include/rzc.h. Opens a file written by
 * the official safetensors library, reads every tensor zero-copy, exports
 * DLPack, frees the handle before the DLPack deleters, and checks statuses on
 * malformed input.
 *
 * Usage: test_rzc FIXTURE_DIR
 */
#define _POSIX_C_SOURCE 200809L
#include "rzc.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    checks++;                                                                  \
    if (!(cond)) {                                                             \
      failures++;                                                              \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,  \
              __LINE__, #cond, rzc_last_error_message());                      \
    }                                                                          \
  } while (0)

static char *path_join(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  snprintf(p, n, "%s/%s", dir, name);
  return p;
}

static unsigned char *read_all(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *buf = malloc((size_t)n);
  if (fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
  fclose(f);
  *len = (size_t)n;
  return buf;
}

static size_t find(const rzc_weights *w, const char *name) {
  size_t i = (size_t)-1;
  CHECK(rzc_weights_find(w, name, &i) == RZC_OK);
  return i;
}

static void test_file(const char *dir) {
  char *path = path_join(dir, "sample.safetensors");
  rzc_weights *w = NULL;
  CHECK(rzc_weights_open_file(path, &w) == RZC_OK);
  CHECK(w != NULL);
  CHECK(rzc_weights_len(w) == 13);

  rzc_buffer_layout layout;
  CHECK(rzc_weights_get_layout(w, &layout) == RZC_OK);
  const uint8_t *bytes = layout.bytes;
  size_t len = layout.bytes_len, data_start = layout.data_start;
  CHECK(layout.data_end == len && data_start > 8 && data_start < len);

  /* Every tensor: name, sizes, and a data pointer inside the mapping. */
  for (size_t i = 0; i < rzc_weights_len(w); i++) {
    rzc_tensor_info info;
    CHECK(rzc_weights_get(w, i, &info) == RZC_OK);
    CHECK(info.name_len > 0 && info.name[info.name_len] == '\0');
    CHECK(info.data >= bytes + data_start && info.data + info.nbytes <= bytes + len);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < info.ndim; d++) numel *= (uint64_t)info.shape[d];
    CHECK(numel * rzc_dtype_bits(info.dtype) / 8 == info.nbytes);
  }

  /* Every extent in one array, tensor after tensor; nothing written when
   * the array is too small. */
  size_t ndims = rzc_weights_dims_len(w);
  int64_t *dims = calloc(ndims + 1, sizeof(int64_t));
  CHECK(ndims > 0 && rzc_weights_get_dims(w, dims, ndims - 1) == RZC_BUFFER_TOO_SMALL && dims[0] == 0);
  CHECK(rzc_weights_get_dims(w, dims, ndims + 1) == RZC_OK);
  for (size_t i = 0, at = 0; i < rzc_weights_len(w); i++) {
    rzc_tensor_info row;
    CHECK(rzc_weights_get(w, i, &row) == RZC_OK);
    for (uint32_t d = 0; d < row.ndim; d++) CHECK(dims[at + d] == row.shape[d]);
    at += row.ndim;
    if (i + 1 == rzc_weights_len(w)) CHECK(at == ndims);
  }
  free(dims);
  CHECK(rzc_weights_dims_len(NULL) == 0);

  rzc_tensor_info info;
  CHECK(rzc_weights_get(w, find(w, "ramp_f32"), &info) == RZC_OK);
  CHECK(info.dtype == RZC_DTYPE_F32 && info.ndim == 3 && info.shape[0] == 2 &&
        info.shape[1] == 3 && info.shape[2] == 4 && info.nbytes == 96);
  const float *ramp = (const float *)info.data;
  for (int k = 0; k < 24; k++) CHECK(ramp[k] == (float)k);

  CHECK(rzc_weights_get(w, find(w, "ids_i64"), &info) == RZC_OK);
  CHECK(info.dtype == RZC_DTYPE_I64 && ((const int64_t *)info.data)[2] == (1LL << 40));
  CHECK(rzc_weights_get(w, find(w, "ones_bf16"), &info) == RZC_OK);
  CHECK(info.dtype == RZC_DTYPE_BF16 && ((const uint16_t *)info.data)[4] == 0x3f80);
  CHECK(rzc_weights_get(w, find(w, "scalar_f64"), &info) == RZC_OK);
  CHECK(info.ndim == 0 && *(const double *)info.data == 3.25);
  CHECK(rzc_weights_get(w, find(w, "empty_f32"), &info) == RZC_OK);
  CHECK(info.ndim == 2 && info.shape[0] == 0 && info.nbytes == 0);
  CHECK(rzc_weights_get(w, find(w, "f8_e4m3"), &info) == RZC_OK);
  CHECK(info.dtype == RZC_DTYPE_F8E4M3 && info.data[0] == 0x38); /* 1.0 in e4m3fn */
  CHECK(strcmp(rzc_dtype_name(info.dtype), "F8_E4M3") == 0);

  const char *value = NULL;
  size_t value_len = 0;
  CHECK(rzc_weights_metadata_find(w, "producer", &value, &value_len) == RZC_OK);
  CHECK(value_len == 13 && memcmp(value, "make_fixtures", 13) == 0);
  CHECK(rzc_weights_metadata_len(w) == 2);

  /* DLPack: versioned and legacy, then free the handle before the deleters. */
  DLManagedTensorVersioned *t = NULL;
  DLManagedTensor *legacy = NULL;
  size_t ramp_index = find(w, "ramp_f32");
  CHECK(rzc_weights_to_dlpack(w, ramp_index, &t) == RZC_OK);
  CHECK(rzc_weights_to_dlpack_legacy(w, find(w, "ids_i64"), &legacy) == RZC_OK);
  DLManagedTensorVersioned *b16 = NULL;
  CHECK(rzc_weights_to_dlpack(w, find(w, "ones_bf16"), &b16) == RZC_OK);
  /* Many at once, in either form: all or nothing. */
  size_t pair[2] = {ramp_index, find(w, "ids_i64")}, bad[2] = {ramp_index, 999};
  DLManagedTensorVersioned *vmany[2] = {NULL, NULL};
  DLManagedTensor *lmany[2] = {NULL, NULL};
  CHECK(rzc_weights_to_dlpack_many(w, pair, 2, vmany) == RZC_OK);
  CHECK(rzc_weights_to_dlpack_legacy_many(w, pair, 2, lmany) == RZC_OK);
  CHECK(vmany[0]->dl_tensor.data == lmany[0]->dl_tensor.data && lmany[1]->dl_tensor.dtype.bits == 64);
  CHECK(((const int64_t *)lmany[1]->dl_tensor.data)[2] == (1LL << 40));
  DLManagedTensor *none[2] = {NULL, NULL};
  CHECK(rzc_weights_to_dlpack_legacy_many(w, bad, 2, none) == RZC_OUT_OF_RANGE && none[0] == NULL);
  CHECK(rzc_weights_to_dlpack_legacy_many(w, pair, 2, NULL) == RZC_NULL_ARGUMENT);
  for (int k = 0; k < 2; k++) {
    vmany[k]->deleter(vmany[k]);
    lmany[k]->deleter(lmany[k]);
  }
  rzc_weights_free(w);
  w = NULL;

  CHECK(t->version.major == DLPACK_MAJOR_VERSION);
  CHECK(t->flags & DLPACK_FLAG_BITMASK_READ_ONLY);
  CHECK(!(t->flags & DLPACK_FLAG_BITMASK_IS_COPIED));
  CHECK(t->dl_tensor.device.device_type == kDLCPU && t->dl_tensor.device.device_id == 0);
  CHECK(t->dl_tensor.dtype.code == kDLFloat && t->dl_tensor.dtype.bits == 32 && t->dl_tensor.dtype.lanes == 1);
  CHECK(t->dl_tensor.ndim == 3 && t->dl_tensor.shape[2] == 4 && t->dl_tensor.strides == NULL);
  CHECK(t->dl_tensor.byte_offset == 0);
  CHECK(((const float *)t->dl_tensor.data)[23] == 23.0f); /* still mapped */
  CHECK(b16->dl_tensor.dtype.code == kDLBfloat && b16->dl_tensor.dtype.bits == 16);
  CHECK(legacy->dl_tensor.dtype.code == kDLInt && legacy->dl_tensor.dtype.bits == 64);
  CHECK(((const int64_t *)legacy->dl_tensor.data)[0] == -1);
  t->deleter(t);
  rzc_dlpack_versioned_free(b16);
  legacy->deleter(legacy);
  free(path);
}

static void on_release(void *ctx) { *(int *)ctx += 1; }

static void test_memory(const char *dir) {
  char *path = path_join(dir, "sample.safetensors");
  size_t len = 0;
  unsigned char *buf = read_all(path, &len);
  CHECK(buf != NULL);
  rzc_weights *w = NULL;
  CHECK(rzc_weights_open_memory(buf, len, &w) == RZC_OK);
  rzc_tensor_info info;
  CHECK(rzc_weights_get(w, find(w, "i16"), &info) == RZC_OK);
  /* Zero-copy: the pointer lies inside the caller's own buffer. */
  CHECK(info.data > buf && info.data + info.nbytes <= buf + len);
  CHECK(((const int16_t *)info.data)[1] == -300);
  rzc_weights_free(w);

  /* With options: the release callback runs once the last tensor is gone;
   * a NULL out-pointer creates nothing (the buffer is still released). */
  int released = 0;
  rzc_open_options opts = {.struct_nbytes = sizeof(rzc_open_options)};
  opts.release = on_release;
  opts.release_ctx = &released;
  CHECK(rzc_weights_open_memory_ex(buf, len, &opts, &w) == RZC_OK);
  DLManagedTensorVersioned *t = NULL;
  CHECK(rzc_weights_data_to_dlpack(w, NULL) == RZC_NULL_ARGUMENT);
  CHECK(rzc_weights_data_to_dlpack(w, &t) == RZC_OK);
  rzc_weights_free(w);
  CHECK(released == 0);
  rzc_dlpack_versioned_free(t);
  CHECK(released == 1);
  rzc_open_options unset = {0};
  CHECK(rzc_weights_open_memory_ex(buf, len, &unset, &w) == RZC_INVALID_ARGUMENT);
  CHECK(strstr(rzc_last_error_message(), "struct_nbytes") != NULL);
  free(buf);
  free(path);
}

static void expect_bad(const char *dir, const char *name, const char *needle) {
  char *path = path_join(dir, name);
  rzc_weights *w = (rzc_weights *)0x1; /* must stay untouched on failure */
  CHECK(rzc_weights_open_file(path, &w) == RZC_BAD_FORMAT);
  CHECK(w == (rzc_weights *)0x1);
  CHECK(strstr(rzc_last_error_message(), needle) != NULL);
  free(path);
}

static void test_errors(const char *dir) {
  expect_bad(dir, "truncated.safetensors", "run past the end");
  expect_bad(dir, "huge_header.safetensors", "exceeds the limit");
  expect_bad(dir, "not_json.safetensors", "JSON");

  rzc_weights *w = NULL;
  CHECK(rzc_weights_open_file("/nonexistent/x.safetensors", &w) == RZC_IO);
  CHECK(strstr(rzc_last_error_message(), "/nonexistent/x.safetensors") != NULL);
  CHECK(rzc_weights_open_file(NULL, &w) == RZC_NULL_ARGUMENT);
  CHECK(rzc_weights_open_memory(NULL, 0, &w) == RZC_NULL_ARGUMENT);
  CHECK(rzc_weights_get(NULL, 0, NULL) == RZC_NULL_ARGUMENT);
  CHECK(rzc_weights_to_dlpack(NULL, 0, NULL) == RZC_NULL_ARGUMENT);
  CHECK(strcmp(rzc_status_name(RZC_BAD_FORMAT), "RZC_BAD_FORMAT") == 0);
  CHECK(strcmp(rzc_status_name(999), "RZC_UNKNOWN") == 0);
  rzc_weights_free(NULL);
}

static void test_pack(void) {
  float a[6] = {1, 2, 3, 4, 5, 6};
  uint8_t b[3] = {9, 8, 7};
  int64_t sa[2] = {2, 3}, sb[1] = {3};
  rzc_pack_tensor in[2] = {
      {"b", 1, RZC_DTYPE_U8, 1, sb, b, sizeof b},
      {"a", 1, RZC_DTYPE_F32, 2, sa, (const uint8_t *)a, sizeof a},
  };
  rzc_metadata_entry meta = {"format", 6, "pt", 2};
  rzc_pack_plan *plan = NULL;
  CHECK(rzc_pack_plan_new(in, 2, &meta, 1, NULL, &plan) == RZC_OK);
  size_t total = (size_t)rzc_pack_plan_nbytes(plan);
  uint8_t *dst = NULL;
  CHECK(posix_memalign((void **)&dst, 64, total) == 0);
  CHECK(rzc_pack_plan_write(plan, dst, total - 1) == RZC_BUFFER_TOO_SMALL);
  CHECK(rzc_pack_plan_write(plan, dst, total) == RZC_OK);
  uint64_t off = 0;
  CHECK(rzc_pack_plan_offset(plan, 1, &off) == RZC_OK && off % 64 == 0);
  rzc_pack_plan_free(plan);

  rzc_weights *w = NULL;
  CHECK(rzc_weights_open_memory(dst, total, &w) == RZC_OK);
  CHECK(rzc_weights_len(w) == 2); /* padding entries are hidden */
  rzc_tensor_info info;
  CHECK(rzc_weights_get(w, find(w, "a"), &info) == RZC_OK);
  CHECK(info.data == dst + off && ((const float *)info.data)[5] == 6.0f);
  rzc_weights_free(w);
  free(dst);

  /* A sealed buffer: the data digest in the header, the content digest
     returned, and both the same when recomputed from every byte. */
  rzc_pack_options popts = {.struct_nbytes = sizeof(rzc_pack_options), .reserve_digest = 1};
  CHECK(rzc_pack_plan_new(in, 2, &meta, 1, &popts, &plan) == RZC_OK);
  total = (size_t)rzc_pack_plan_nbytes(plan);
  CHECK(posix_memalign((void **)&dst, 64, total) == 0);
  CHECK(rzc_pack_plan_write(plan, dst, total) == RZC_OK);
  rzc_pack_plan_free(plan);
  rzc_digest sealed, claimed, full;
  CHECK(rzc_pack_seal(dst, total, &sealed) == RZC_OK);
  CHECK(rzc_pack_seal(dst, total, &sealed) == RZC_INVALID_ARGUMENT); /* sealed once */
  CHECK(rzc_weights_open_memory(dst, total, &w) == RZC_OK);
  const char *value = NULL;
  size_t value_len = 0;
  CHECK(rzc_weights_metadata_find(w, "rzc.data_blake3", &value, &value_len) == RZC_OK && value_len == 64);
  CHECK(rzc_weights_content_digest(w, 1, &claimed) == RZC_OK);
  CHECK(rzc_weights_content_digest(w, 0, &full) == RZC_OK);
  CHECK(memcmp(sealed.bytes, claimed.bytes, 32) == 0 && memcmp(sealed.bytes, full.bytes, 32) == 0);
  CHECK(rzc_weights_content_digest(w, 0, NULL) == RZC_NULL_ARGUMENT);
  rzc_weights_free(w);

  /* The same buffer sealed while it is filled: the same digest. */
  CHECK(rzc_pack_plan_new(in, 2, &meta, 1, &popts, &plan) == RZC_OK);
  uint8_t *again = NULL;
  CHECK(posix_memalign((void **)&again, 64, total) == 0);
  CHECK(rzc_pack_plan_write_layout(plan, again, total) == RZC_OK);
  rzc_pack_sealer *sealer = NULL;
  CHECK(rzc_pack_sealer_new(again, total, &sealer) == RZC_OK);
  CHECK(rzc_pack_plan_write_sealing(plan, again, total, sealer) == RZC_OK);
  rzc_digest streamed;
  CHECK(rzc_pack_sealer_finish(sealer, &streamed) == RZC_OK);
  CHECK(rzc_pack_sealer_finish(sealer, &streamed) == RZC_INVALID_ARGUMENT); /* spent */
  rzc_pack_sealer_free(sealer);
  CHECK(memcmp(streamed.bytes, sealed.bytes, 32) == 0 && memcmp(again, dst, total) == 0);
  /* A sealer serves its own buffer only. */
  CHECK(rzc_pack_plan_write_layout(plan, again, total) == RZC_OK);
  CHECK(rzc_pack_sealer_new(again, total, &sealer) == RZC_OK);
  CHECK(rzc_pack_plan_write_sealing(plan, dst, total, sealer) == RZC_INVALID_ARGUMENT);
  rzc_pack_sealer_free(sealer);
  /* Tensors copied by the sealer: named by their offset and size in the
     layout, each once, never from the buffer itself; a refused call copies
     nothing; the same digest. */
  CHECK(rzc_pack_plan_write_layout(plan, again, total) == RZC_OK);
  CHECK(rzc_pack_sealer_new(again, total, &sealer) == RZC_OK);
  uint64_t at0 = 0, at1 = 0;
  CHECK(rzc_pack_plan_offset(plan, 0, &at0) == RZC_OK && rzc_pack_plan_offset(plan, 1, &at1) == RZC_OK);
  rzc_pack_copy copies[2] = {{in[0].data, at0, in[0].nbytes}, {in[1].data, at1, in[1].nbytes}};
  rzc_pack_copy wrong[2] = {copies[0], {in[1].data, at1 + 4, in[1].nbytes}};
  CHECK(rzc_pack_sealer_copy(sealer, wrong, 2, 0) == RZC_INVALID_ARGUMENT);
  CHECK(strstr(rzc_last_error_message(), "copies[1]") != NULL);
  wrong[1] = copies[1];
  wrong[1].nbytes -= 1;
  CHECK(rzc_pack_sealer_copy(sealer, wrong, 2, 0) == RZC_INVALID_ARGUMENT);
  wrong[1] = copies[1];
  wrong[1].src = again + 8;
  CHECK(rzc_pack_sealer_copy(sealer, wrong, 2, 0) == RZC_INVALID_ARGUMENT);
  CHECK(strstr(rzc_last_error_message(), "overlaps") != NULL);
  wrong[1] = copies[1];
  wrong[1].src = NULL;
  CHECK(rzc_pack_sealer_copy(sealer, wrong, 2, 0) == RZC_NULL_ARGUMENT);
  CHECK(strstr(rzc_last_error_message(), "copies[1].src") != NULL);
  CHECK(rzc_pack_sealer_copy(sealer, NULL, 2, 0) == RZC_NULL_ARGUMENT);
  CHECK(rzc_pack_sealer_copy(NULL, copies, 2, 0) == RZC_NULL_ARGUMENT);
  CHECK(rzc_pack_sealer_copy(sealer, copies, 1, 1) == RZC_OK);
  CHECK(rzc_pack_sealer_copy(sealer, copies, 2, 1) == RZC_INVALID_ARGUMENT); /* the first again */
  CHECK(rzc_pack_sealer_copy(sealer, copies + 1, 1, 0) == RZC_OK);
  CHECK(rzc_pack_sealer_finish(sealer, &streamed) == RZC_OK);
  CHECK(rzc_pack_sealer_copy(sealer, copies, 0, 0) == RZC_INVALID_ARGUMENT); /* spent */
  rzc_pack_sealer_free(sealer);
  CHECK(memcmp(streamed.bytes, sealed.bytes, 32) == 0 && memcmp(again, dst, total) == 0);
  /* Tensors read from a file by the sealer (pread): the same digest; a file
     that ends inside a tensor is RZC_IO, and the sealer then refuses to go
     on or to finish. */
  {
    char path[] = "/tmp/rzc-test-read-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    CHECK(write(fd, "pad", 3) == 3);
    CHECK(write(fd, in[1].data, in[1].nbytes) == (ssize_t)in[1].nbytes);
    CHECK(write(fd, in[0].data, in[0].nbytes) == (ssize_t)in[0].nbytes);
    rzc_pack_read reads[2] = {{3 + in[1].nbytes, at0, in[0].nbytes}, {3, at1, in[1].nbytes}};
    CHECK(rzc_pack_plan_write_layout(plan, again, total) == RZC_OK);
    CHECK(rzc_pack_sealer_new(again, total, &sealer) == RZC_OK);
    CHECK(rzc_pack_sealer_read(sealer, -1, reads, 2, 0) == RZC_INVALID_ARGUMENT);
    {
      /* A descriptor that cannot be read is refused up front, the sealer unharmed. */
      int wronly = open("/dev/null", O_WRONLY);
      CHECK(wronly >= 0);
      CHECK(rzc_pack_sealer_read(sealer, wronly, reads, 2, 0) == RZC_INVALID_ARGUMENT);
      CHECK(strstr(rzc_last_error_message(), "writing only") != NULL);
      close(wronly);
    }
    CHECK(rzc_pack_sealer_read(sealer, fd, NULL, 2, 0) == RZC_NULL_ARGUMENT);
    CHECK(rzc_pack_sealer_read(NULL, fd, reads, 2, 0) == RZC_NULL_ARGUMENT);
    CHECK(rzc_pack_sealer_read(sealer, fd, reads, 2, 2) == RZC_OK);
    CHECK(rzc_pack_sealer_read(sealer, fd, reads, 1, 0) == RZC_INVALID_ARGUMENT); /* read already */
    CHECK(rzc_pack_sealer_finish(sealer, &streamed) == RZC_OK);
    rzc_pack_sealer_free(sealer);
    CHECK(memcmp(streamed.bytes, sealed.bytes, 32) == 0 && memcmp(again, dst, total) == 0);
    CHECK(ftruncate(fd, 3 + in[1].nbytes + 1) == 0);
    CHECK(rzc_pack_plan_write_layout(plan, again, total) == RZC_OK);
    CHECK(rzc_pack_sealer_new(again, total, &sealer) == RZC_OK);
    CHECK(rzc_pack_sealer_read(sealer, fd, reads, 2, 0) == RZC_IO);
    CHECK(strstr(rzc_last_error_message(), "bytes long") != NULL);
    CHECK(rzc_pack_sealer_copy(sealer, copies, 1, 0) == RZC_INVALID_ARGUMENT);
    CHECK(rzc_pack_sealer_finish(sealer, &streamed) == RZC_INVALID_ARGUMENT);
    CHECK(strstr(rzc_last_error_message(), "cannot be sealed") != NULL);
    rzc_pack_sealer_free(sealer);
    close(fd);
  }
  /* A sealer freed unfinished stops its thread. */
  CHECK(rzc_pack_plan_write_layout(plan, again, total) == RZC_OK);
  CHECK(rzc_pack_sealer_new(again, total, &sealer) == RZC_OK);
  CHECK(rzc_pack_sealer_advance(sealer, 64) == RZC_OK);
  rzc_pack_sealer_free(sealer);
  rzc_pack_plan_free(plan);
  free(again);
  free(dst);

  in[0].dtype = 77;
  CHECK(rzc_pack_plan_new(in, 2, NULL, 0, NULL, &plan) == RZC_UNSUPPORTED_DTYPE);
  in[0].dtype = RZC_DTYPE_U8;
  in[0].nbytes = 2;
  CHECK(rzc_pack_plan_new(in, 2, NULL, 0, NULL, &plan) == RZC_INVALID_ARGUMENT);
}

/* Without a CUDA driver every device call is a status, not an abort; with
 * one, an upload round-trips (checked in depth by the GPU suite). */
static void test_device(const char *dir) {
  char *path = path_join(dir, "sample.safetensors");
  rzc_weights *w = NULL;
  CHECK(rzc_weights_open_file(path, &w) == RZC_OK);
  int32_t count = -1;
  rzc_status s = rzc_cuda_count_devices(&count);
  rzc_device_weights *dev = NULL;
  if (s == RZC_NO_CUDA) {
    printf("no CUDA driver here: %s\n", rzc_last_error_message());
    CHECK(count == -1);
    CHECK(strlen(rzc_last_error_message()) > 0);
    CHECK(rzc_device_weights_upload(w, 0, NULL, &dev) == RZC_NO_CUDA && dev == NULL);
  } else {
    CHECK(s == RZC_OK && count >= 0);
    if (count > 0) {
      CHECK(rzc_device_weights_upload(w, count, NULL, &dev) == RZC_BAD_DEVICE);
      rzc_upload_options opts = {.struct_nbytes = sizeof(rzc_upload_options), .staging = RZC_STAGING_PINNED};
      CHECK(rzc_device_weights_upload(w, 0, &opts, &dev) == RZC_OK);
      CHECK(rzc_device_weights_len(dev) == rzc_weights_len(w));
      rzc_device_info info = {.struct_nbytes = sizeof(rzc_device_info)};
      CHECK(rzc_device_weights_info(dev, &info) == RZC_OK);
      CHECK(info.staging == RZC_STAGING_PINNED && info.ordinal == 0 && info.nbytes > 0);
      /* Every tensor reads back as the source has it, from a 256-byte
       * aligned place in the one allocation. */
      for (size_t i = 0; i < rzc_weights_len(w); i++) {
        rzc_tensor_info host;
        rzc_device_tensor_info d;
        CHECK(rzc_weights_get(w, i, &host) == RZC_OK);
        CHECK(rzc_device_weights_get(dev, i, &d) == RZC_OK);
        CHECK(d.nbytes == host.nbytes && d.device_ptr >= info.device_ptr && (d.device_ptr - info.device_ptr) % 256 == 0);
        uint8_t *back = malloc(d.nbytes + 1);
        CHECK(rzc_device_weights_read(dev, i, back, (size_t)d.nbytes) == RZC_OK);
        CHECK(memcmp(back, host.data, (size_t)d.nbytes) == 0);
        CHECK(rzc_device_weights_read(dev, i, back, (size_t)d.nbytes + 1) == RZC_INVALID_ARGUMENT);
        free(back);
      }
      /* Shared under a key: a second upload in this process maps the first. */
      rzc_upload_options shared = {.struct_nbytes = sizeof(rzc_upload_options), .share_key = "c-test", .share_key_len = 6};
      rzc_device_weights *s1 = NULL, *s2 = NULL;
      CHECK(rzc_device_weights_upload(w, 0, &shared, &s1) == RZC_OK);
      CHECK(rzc_device_weights_upload(w, 0, &shared, &s2) == RZC_OK);
      rzc_device_info i1 = {.struct_nbytes = sizeof(rzc_device_info)}, i2 = i1;
      CHECK(rzc_device_weights_info(s1, &i1) == RZC_OK && rzc_device_weights_info(s2, &i2) == RZC_OK);
      if (i1.sharing == RZC_SHARING_PRIVATE) printf("sharing did not apply: %.*s\n", (int)i1.note_len, i1.note);
      CHECK(i1.sharing == RZC_SHARING_UPLOADED && i1.note_len == 0);
      CHECK(i2.device_ptr == i1.device_ptr);
      rzc_device_weights_free(s1);
      rzc_device_weights_free(s2);
      DLManagedTensorVersioned *t = NULL;
      CHECK(rzc_device_weights_to_dlpack(dev, 0, &t) == RZC_OK);
      rzc_device_weights_free(dev); /* t keeps the allocation */
      CHECK(t->dl_tensor.device.device_type == kDLCUDA && (t->flags & DLPACK_FLAG_BITMASK_IS_COPIED));
      t->deleter(t);
    }
  }
  CHECK(rzc_cuda_count_devices(NULL) == RZC_NULL_ARGUMENT);
  rzc_upload_options bad = {.struct_nbytes = sizeof(rzc_upload_options), .staging = 99};
  CHECK(rzc_device_weights_upload(w, 0, &bad, &dev) == RZC_INVALID_ARGUMENT); /* options are checked before the driver */
  rzc_weights_free(w);
  free(path);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s FIXTURE_DIR\n", argv[0]);
    return 2;
  }
  CHECK(strcmp(rzc_version(), "0.0.0") != 0);
  test_file(argv[1]);
  test_memory(argv[1]);
  test_errors(argv[1]);
  test_pack();
  test_device(argv[1]);
  printf("C: %d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
