// rzc.hpp: a small header-only C++17 layer over rzc.h. Handles become
// move-only owners, failed statuses become rzc::Error exceptions carrying the
// status and the library's message, and DLPack tensors become unique_ptrs
// whose deleter is the tensor's own.
//
// It is written by hand over the plain C header rather than with a bridge
// generator: the C ABI is the contract, and a C++ caller should be able to
// read every line between its code and that contract.
#ifndef RZC_HPP
#define RZC_HPP

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "rzc.h"

namespace rzc {

/// A failed call: the status and the library's message.
class Error : public std::runtime_error {
 public:
  Error(rzc_status status, const std::string &message)
      : std::runtime_error(std::string(rzc_status_name(status)) + ": " + message), status_(status) {}
  /// The status the call returned.
  rzc_status status() const noexcept { return status_; }

 private:
  rzc_status status_;
};

/// Throws rzc::Error unless `status` is RZC_OK.
inline void check(rzc_status status) {
  if (status != RZC_OK) throw Error(status, rzc_last_error_message());
}

struct DLPackDeleter {
  void operator()(DLManagedTensorVersioned *t) const noexcept { rzc_dlpack_versioned_free(t); }
};
/// A versioned DLPack tensor that calls its deleter when destroyed.
using DLPackTensor = std::unique_ptr<DLManagedTensorVersioned, DLPackDeleter>;

/// One tensor's description; views stay valid while the Weights live.
struct TensorInfo {
  std::string_view name;
  rzc_dtype dtype;
  std::vector<int64_t> shape;
  const uint8_t *data;
  uint64_t nbytes;
};

/// An opened safetensors buffer (move-only).
class Weights {
 public:
  /// Memory-maps and opens a file.
  static Weights open_file(const std::string &path) {
    rzc_weights *w = nullptr;
    check(rzc_weights_open_file(path.c_str(), &w));
    return Weights(w);
  }
  /// Opens caller-owned bytes without copying; they must outlive the Weights
  /// and every tensor exported from them.
  static Weights open_memory(const void *data, size_t len) {
    rzc_weights *w = nullptr;
    check(rzc_weights_open_memory(static_cast<const uint8_t *>(data), len, &w));
    return Weights(w);
  }

  /// Number of tensors.
  size_t size() const noexcept { return rzc_weights_len(handle_.get()); }
  /// Index of the tensor called `name`; throws RZC_NOT_FOUND.
  size_t find(std::string_view name) const {
    size_t i = 0;
    check(rzc_weights_find_n(handle_.get(), name.data(), name.size(), &i));
    return i;
  }
  /// Describes tensor `index`.
  TensorInfo info(size_t index) const {
    rzc_tensor_info t;
    check(rzc_weights_get(handle_.get(), index, &t));
    return TensorInfo{std::string_view(t.name, t.name_len), t.dtype,
                      std::vector<int64_t>(t.shape, t.shape + t.ndim), t.data, t.nbytes};
  }
  /// Describes every tensor (one call into the library).
  std::vector<TensorInfo> infos() const {
    std::vector<rzc_tensor_info> raw(size());
    check(rzc_weights_get_all(handle_.get(), raw.data(), raw.size()));
    std::vector<TensorInfo> out;
    out.reserve(raw.size());
    for (const rzc_tensor_info &t : raw)
      out.push_back(TensorInfo{std::string_view(t.name, t.name_len), t.dtype,
                               std::vector<int64_t>(t.shape, t.shape + t.ndim), t.data, t.nbytes});
    return out;
  }
  /// Exports tensor `index` zero-copy; it may outlive these Weights.
  DLPackTensor to_dlpack(size_t index) const {
    DLManagedTensorVersioned *t = nullptr;
    check(rzc_weights_to_dlpack(handle_.get(), index, &t));
    return DLPackTensor(t);
  }
  /// The C handle, for calls this layer does not wrap.
  const rzc_weights *get() const noexcept { return handle_.get(); }

 private:
  struct Free {
    void operator()(rzc_weights *w) const noexcept { rzc_weights_free(w); }
  };
  explicit Weights(rzc_weights *w) : handle_(w) {}
  std::unique_ptr<rzc_weights, Free> handle_;
};

}  // namespace rzc

#endif  // RZC_HPP
