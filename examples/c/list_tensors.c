/* Lists the tensors of a safetensors file through the C ABI and exports the
 * first one as a DLPack tensor. Usage: list_tensors FILE.safetensors */
#include "rzc.h"

#include <stdio.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s FILE.safetensors\n", argv[0]);
    return 2;
  }
  rzc_weights *w = NULL;
  rzc_status s = rzc_weights_open_file(argv[1], &w);
  if (s != RZC_OK) {
    fprintf(stderr, "%s: %s\n", rzc_status_name(s), rzc_last_error_message());
    return 1;
  }
  printf("ray-zerocopy %s: %zu tensors in %s\n", rzc_version(), rzc_weights_len(w), argv[1]);
  for (size_t i = 0; i < rzc_weights_len(w); i++) {
    rzc_tensor_info t;
    if (rzc_weights_get(w, i, &t) != RZC_OK) return 1;
    printf("  %-12.*s %-8s [", (int)t.name_len, t.name, rzc_dtype_name(t.dtype));
    for (uint32_t d = 0; d < t.ndim; d++) printf(d ? ", %lld" : "%lld", (long long)t.shape[d]);
    printf("] %llu bytes\n", (unsigned long long)t.nbytes);
  }
  DLManagedTensorVersioned *first = NULL;
  if (rzc_weights_len(w) > 0 && rzc_weights_to_dlpack(w, 0, &first) == RZC_OK) {
    rzc_weights_free(w); /* the DLPack tensor keeps the mapping alive */
    printf("DLPack: ndim %d, dtype code %u bits %u, read-only %d\n", first->dl_tensor.ndim,
           first->dl_tensor.dtype.code, first->dl_tensor.dtype.bits,
           (int)(first->flags & DLPACK_FLAG_BITMASK_READ_ONLY));
    first->deleter(first);
  } else {
    rzc_weights_free(w);
  }
  return 0;
}
