// The check every model-aware op makes of its params: one dtype and one device for all.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pymeta {

inline void check_params_agree(const char* op, at::TensorList params) {
  for (size_t p = 0; p < params.size(); ++p) {
    TORCH_CHECK(params[p].scalar_type() == params[0].scalar_type(), op, ": params[", p, "] has dtype ",
                params[p].scalar_type(), ", expected ", params[0].scalar_type());
    TORCH_CHECK(params[p].device() == params[0].device(), op, ": params[", p, "] is on ", params[p].device(),
                ", expected ", params[0].device());
  }
}

}  // namespace pymeta
