// CPU kernels of sgd_update and sgd_update_backward: one pass over every param tensor,
// tasks spread over threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "sgd_update.h"

namespace pymeta {
namespace {

// Below this many elements a thread is not worth waking.
constexpr int64_t kGrainElements = 32768;

int64_t task_grain(int64_t per_task) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_task, 1));
}

const at::Tensor& lr_of(at::TensorList lrs, size_t i) { return lrs.size() == 1 ? lrs[0] : lrs[i]; }

std::vector<at::Tensor> sgd_update_cpu(at::TensorList params, at::TensorList grads,
                                       at::TensorList lrs) {
  constexpr const char* op = "pymeta::sgd_update";
  check_sgd_lists(op, params.size(), grads.size(), lrs.size());
  std::vector<at::Tensor> out;
  out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const LrLayout layout = check_sgd_triple(op, i, params[i], grads[i], lr_of(lrs, i));
    const at::Tensor p = params[i].contiguous();
    const at::Tensor g = grads[i].contiguous();
    const at::Tensor lr = lr_of(lrs, i).contiguous();
    at::Tensor o = at::empty_like(p, at::MemoryFormat::Contiguous);
    const int64_t tasks = p.size(0);
    const int64_t n = tasks == 0 ? 0 : p.numel() / tasks;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sgd_update_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* lp = lr.const_data_ptr<scalar_t>();
      scalar_t* op_ = o.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, tasks, task_grain(n), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t base = t * n;
          for (int64_t j = 0; j < n; ++j) {
            const opmath_t rate = lp[lr_index(layout, t, j, n)];
            op_[base + j] = sgd_step<opmath_t>(pp[base + j], rate, gp[base + j]);
          }
        }
      });
    });
    out.push_back(std::move(o));
  }
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sgd_update_backward_cpu(
    at::TensorList grads, at::TensorList grad_outputs, at::TensorList lrs, bool compute_lr_grad) {
  constexpr const char* op = "pymeta::sgd_update_backward";
  check_sgd_lists(op, grads.size(), grad_outputs.size(), lrs.size());
  std::vector<at::Tensor> grad_grads;
  grad_grads.reserve(grads.size());
  std::vector<at::Tensor> grad_lrs;
  if (compute_lr_grad) {
    for (const auto& lr : lrs) grad_lrs.push_back(at::zeros_like(lr, at::MemoryFormat::Contiguous));
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    const LrLayout layout = check_sgd_triple(op, i, grads[i], grad_outputs[i], lr_of(lrs, i));
    const at::Tensor g = grads[i].contiguous();
    const at::Tensor u = grad_outputs[i].contiguous();
    const at::Tensor lr = lr_of(lrs, i).contiguous();
    at::Tensor gg = at::empty_like(g, at::MemoryFormat::Contiguous);
    const int64_t tasks = g.size(0);
    const int64_t n = tasks == 0 ? 0 : g.numel() / tasks;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sgd_update_backward_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const scalar_t* lp = lr.const_data_ptr<scalar_t>();
      scalar_t* ggp = gg.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, tasks, task_grain(n), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t base = t * n;
          for (int64_t j = 0; j < n; ++j) {
            const opmath_t rate = lp[lr_index(layout, t, j, n)];
            ggp[base + j] = sgd_grad_wrt_grad<opmath_t>(rate, up[base + j]);
          }
        }
      });
      if (!compute_lr_grad) return;
      scalar_t* dl = grad_lrs[lrs.size() == 1 ? 0 : i].mutable_data_ptr<scalar_t>();
      switch (layout) {
        case LrLayout::kScalar: {
          // Sum in opmath; a param that shares the lr adds to what earlier params left.
          const opmath_t total = at::parallel_reduce(
              0, tasks * n, kGrainElements, opmath_t(0),
              [&](int64_t b, int64_t e, opmath_t acc) {
                for (int64_t k = b; k < e; ++k) acc += sgd_grad_wrt_lr<opmath_t>(gp[k], up[k]);
                return acc;
              },
              std::plus<opmath_t>());
          dl[0] = static_cast<opmath_t>(dl[0]) + total;
          break;
        }
        case LrLayout::kPerElement:
          at::parallel_for(0, n, kGrainElements / std::max<int64_t>(tasks, 1) + 1,
                           [&](int64_t j0, int64_t j1) {
                             for (int64_t j = j0; j < j1; ++j) {
                               opmath_t acc = dl[j];
                               for (int64_t t = 0; t < tasks; ++t) {
                                 acc += sgd_grad_wrt_lr<opmath_t>(gp[t * n + j], up[t * n + j]);
                               }
                               dl[j] = acc;
                             }
                           });
          break;
        case LrLayout::kPerTaskElement:
          at::parallel_for(0, tasks * n, kGrainElements, [&](int64_t b, int64_t e) {
            for (int64_t k = b; k < e; ++k) {
              dl[k] = static_cast<opmath_t>(dl[k]) + sgd_grad_wrt_lr<opmath_t>(gp[k], up[k]);
            }
          });
          break;
      }
    });
    grad_grads.push_back(std::move(gg));
  }
  return {std::move(grad_grads), std::move(grad_lrs)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymeta, CPU, m) {
  m.impl("sgd_update", &sgd_update_cpu);
  m.impl("sgd_update_backward", &sgd_update_backward_cpu);
}

}  // namespace pymeta
