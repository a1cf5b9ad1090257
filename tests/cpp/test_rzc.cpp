// C++ caller test over include/rzc.hpp (itself over rzc.h): RAII handles,
// exceptions for statuses, DLPack tensors that outlive the Weights.
// Usage: test_rzc_cpp FIXTURE_DIR
#include "rzc.hpp"

#include <cstdio>
#include <cstring>
#include <string>

static int checks = 0, failures = 0;
#define CHECK(cond)                                                                      \
  do {                                                                                   \
    checks++;                                                                            \
    if (!(cond)) {                                                                       \
      failures++;                                                                        \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);      \
    }                                                                                    \
  } while (0)

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];

  rzc::DLPackTensor ramp;
  {
    auto w = rzc::Weights::open_file(dir + "/sample.safetensors");
    CHECK(w.size() == 13);
    auto info = w.info(w.find("ramp_f32"));
    CHECK(info.name == "ramp_f32");
    auto all = w.infos();
    CHECK(all.size() == 13 && all[w.find("ramp_f32")].data == info.data);
    CHECK(info.dtype == RZC_DTYPE_F32);
    CHECK((info.shape == std::vector<int64_t>{2, 3, 4}));
    CHECK(reinterpret_cast<const float *>(info.data)[7] == 7.0f);
    ramp = w.to_dlpack(w.find("ramp_f32"));
    auto moved = std::move(w);  // handles are move-only owners
    CHECK(moved.size() == 13);
  }  // Weights freed here; the DLPack tensor keeps the mapping alive.
  CHECK(ramp->dl_tensor.ndim == 3);
  CHECK(static_cast<const float *>(ramp->dl_tensor.data)[23] == 23.0f);
  ramp.reset();

  try {
    rzc::Weights::open_file(dir + "/truncated.safetensors");
    CHECK(false);
  } catch (const rzc::Error &e) {
    CHECK(e.status() == RZC_BAD_FORMAT);
    CHECK(std::strstr(e.what(), "RZC_BAD_FORMAT: ") != nullptr);
    CHECK(std::strstr(e.what(), "run past the end") != nullptr);
  }
  try {
    auto w = rzc::Weights::open_file(dir + "/sample.safetensors");
    w.find("missing");
    CHECK(false);
  } catch (const rzc::Error &e) {
    CHECK(e.status() == RZC_NOT_FOUND);
  }
  std::printf("C++: %d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
