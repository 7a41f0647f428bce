// The argument checks that every pymeta op makes, in one place: all tensor arguments on one
// device, and the model-aware ops' params of one dtype. The dispatcher picks a kernel from the
// highest-priority device among the arguments (meta over CUDA over CPU), so a call that mixes
// devices reaches a kernel with another device's memory; each kernel checks its arguments first.
// The fake (meta) kernels in pymeta/_ops.py make the same check with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace pymeta {

// Checks that every tensor argument given is on the device of the first one:
//   OneDevice(op).list("params", params).list("lrs", lrs).arg("support_x", support_x);
// raises ValueError "<op>: <arg>: expected device X like <first arg>, received Y". Undefined
// tensors are skipped. Names are formatted only on failure (sgd_update runs every inner step).
class OneDevice {
 public:
  explicit OneDevice(const char* op) : op_(op) {}

  OneDevice& arg(const char* name, const at::Tensor& t) { return check(name, -1, t); }

  OneDevice& list(const char* name, at::TensorList ts) {
    for (size_t i = 0; i < ts.size(); ++i) check(name, static_cast<int64_t>(i), ts[i]);
    return *this;
  }

 private:
  static std::string label(const char* name, int64_t index) {
    return index < 0 ? std::string(name) : c10::str(name, "[", index, "]");
  }

  OneDevice& check(const char* name, int64_t index, const at::Tensor& t) {
    if (!t.defined()) return *this;
    if (!device_) {
      device_ = t.device();
      first_name_ = name;
      first_index_ = index;
      return *this;
    }
    TORCH_CHECK_VALUE(t.device() == *device_, op_, ": ", label(name, index), ": expected device ", *device_,
                      " like ", label(first_name_, first_index_), ", received ", t.device());
    return *this;
  }

  const char* op_;
  std::optional<c10::Device> device_;
  const char* first_name_ = nullptr;
  int64_t first_index_ = -1;
};

// The model-aware ops' params share one dtype (their devices are checked by OneDevice).
inline void check_params_dtype(const char* op, at::TensorList params) {
  for (size_t p = 1; p < params.size(); ++p) {
    TORCH_CHECK(params[p].scalar_type() == params[0].scalar_type(), op, ": params[", p,
                "]: expected dtype ", params[0].scalar_type(), " like params[0], received ",
                params[p].scalar_type());
  }
}

}  // namespace pymeta
