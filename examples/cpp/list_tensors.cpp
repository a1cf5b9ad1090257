// Lists the tensors of a safetensors file through rzc.hpp (RAII over rzc.h).
// Usage: list_tensors FILE.safetensors
#include "rzc.hpp"

#include <iostream>

int main(int argc, char **argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " FILE.safetensors\n";
    return 2;
  }
  try {
    auto w = rzc::Weights::open_file(argv[1]);
    std::cout << w.size() << " tensors\n";
    for (size_t i = 0; i < w.size(); i++) {
      auto t = w.info(i);
      std::cout << "  " << t.name << " " << rzc_dtype_name(t.dtype) << " " << t.nbytes << " bytes\n";
    }
  } catch (const rzc::Error &e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
