// The model-aware core's call checks and learning-rate layout (net/problem.h).
#include "net/problem.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros_like.h>

#include "op_checks.h"

namespace pymeta {
namespace {

void check_data(const char* op, const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.dim() >= 3 && x.size(1) > 0, op, ": ", name, " must have shape [T, K>0, ...], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ", ref.scalar_type(),
              " like the params, got ", x.scalar_type());
}

void check_labels(const char* op, const char* name, const at::Tensor& y, const at::Tensor& x, LossKind loss) {
  TORCH_CHECK(y.dim() >= 2 && y.size(0) == x.size(0) && y.size(1) == x.size(1), op, ": ", name,
              " must start with the inputs' [T, K] = [", x.size(0), ", ", x.size(1), "], got ", y.sizes());
  if (loss == LossKind::kMse) {
    TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ", x.scalar_type(),
                " for MSE, got ", y.scalar_type());
  } else {
    TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kLong, op, ": ", name,
                " must be [T, K] int64 class indices for cross-entropy, got ", y.scalar_type(), " ", y.sizes());
    // -100 is cross-entropy's ignore index in PyTorch; here, as in the Python API, it is refused.
    if (y.numel() > 0) {
      const int64_t lo = y.min().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0, op, ": ", name, ": expected class indices >= 0, received ", lo);
    }
  }
}

}  // namespace

NetProblem make_problem(const char* op, at::TensorList params, at::TensorList lrs, const at::Tensor& sx,
                        const at::Tensor& sy, const at::Tensor* qx, const at::Tensor* qy, at::IntArrayRef layers,
                        at::ArrayRef<double> layer_args, int64_t steps, int64_t lr_mode, int64_t loss) {
  OneDevice(op).list("params", params).list("lrs", lrs).arg("support_x", sx).arg("support_y", sy)
      .arg("query_x", qx != nullptr ? *qx : at::Tensor()).arg("query_y", qy != nullptr ? *qy : at::Tensor());
  TORCH_CHECK(steps >= 1, op, ": expected at least one inner step, got ", steps);
  TORCH_CHECK(!params.empty(), op, ": expected params");
  NetProblem pb{parse_net(op, params, layers, layer_args, steps)};
  TORCH_CHECK(loss >= 0 && loss < kNumLossKinds, op, ": loss must be 0 (MSE) or 1 (cross-entropy), got ", loss);
  TORCH_CHECK(lr_mode >= 0 && lr_mode < kNumLrModes, op, ": lr_mode must be 0, 1 or 2, got ", lr_mode);
  pb.loss = static_cast<LossKind>(loss);
  pb.lr_mode = static_cast<LrMode>(lr_mode);
  pb.steps = steps;
  const at::Tensor& ref = params[0];
  TORCH_CHECK(at::isFloatingType(ref.scalar_type()), op, ": params must be floating point, got ",
              ref.scalar_type());
  check_data(op, "support_x", sx, ref);
  check_labels(op, "support_y", sy, sx, pb.loss);
  pb.tasks = sx.size(0);
  if (qx != nullptr) {
    check_data(op, "query_x", *qx, ref);
    TORCH_CHECK(qx->size(0) == pb.tasks && qx->sizes().slice(2) == sx.sizes().slice(2), op,
                ": query_x must have shape [", pb.tasks, ", Q, ", sx.sizes().slice(2), "] like support_x, got ",
                qx->sizes());
    check_labels(op, "query_y", *qy, *qx, pb.loss);
  }
  pb.adapted.assign(params.size(), false);
  std::vector<int64_t> adapted_params;
  for_each_adapted_param(pb, [&](const NetLayer&, int64_t p, int64_t) {
    pb.adapted[p] = true;
    adapted_params.push_back(p);
  });
  if (pb.lr_mode == LrMode::kScalar) {
    TORCH_CHECK(lrs.size() == 1 && lrs[0].dim() == 0, op, ": lr_mode 0 takes one 0-dim lr");
  } else if (pb.lr_mode == LrMode::kPerLayerStep) {
    TORCH_CHECK(lrs.size() == 1 && lrs[0].dim() == 2 && lrs[0].size(0) == steps &&
                    lrs[0].size(1) == pb.net.num_adapted,
                op, ": lr_mode 1 takes one lr of shape [", steps, ", ", pb.net.num_adapted, "]");
  } else {
    TORCH_CHECK(lrs.size() == adapted_params.size(), op, ": lr_mode 2 expects ", adapted_params.size(),
                " lrs (one per adapted param), got ", lrs.size());
    for (size_t k = 0; k < lrs.size(); ++k) {
      TORCH_CHECK(lrs[k].sizes() == params[adapted_params[k]].sizes(), op, ": lrs[", k, "] must have shape ",
                  params[adapted_params[k]].sizes(), ", got ", lrs[k].sizes());
    }
  }
  for (const auto& lr : lrs) {
    TORCH_CHECK(lr.scalar_type() == ref.scalar_type(), op, ": lrs: expected dtype ", ref.scalar_type(),
                " like the params, received ", lr.scalar_type());
  }
  return pb;
}

std::vector<Params> expand_lrs(const NetProblem& pb, at::TensorList params, at::TensorList lrs) {
  std::vector<Params> rows(lr_rows(pb), Params(params.size()));
  for_each_adapted_param(pb, [&](const NetLayer& L, int64_t p, int64_t k) {
    for (int64_t j = 0; j < lr_rows(pb); ++j) {
      if (pb.lr_mode == LrMode::kScalar) rows[j][p] = lrs[0];
      if (pb.lr_mode == LrMode::kPerLayerStep) rows[j][p] = lrs[0][j][L.adapted_index];
      if (pb.lr_mode == LrMode::kPerParameter) rows[j][p] = lrs[k];
    }
  });
  return rows;
}

std::vector<at::Tensor> reduce_lr_grads(const NetProblem& pb, at::TensorList lrs, const std::vector<Params>& d) {
  std::vector<at::Tensor> out;
  for (const auto& lr : lrs) out.push_back(at::zeros_like(lr));
  for_each_adapted_param(pb, [&](const NetLayer& L, int64_t p, int64_t k) {
    for (int64_t j = 0; j < lr_rows(pb); ++j) {
      const at::Tensor& g = d[j][p];
      if (!g.defined()) continue;
      if (pb.lr_mode == LrMode::kScalar) out[0].add_(g.sum());
      if (pb.lr_mode == LrMode::kPerLayerStep) out[0][j][L.adapted_index].add_(g.sum());
      if (pb.lr_mode == LrMode::kPerParameter) out[k].add_(g);
    }
  });
  return out;
}


}  // namespace pymeta
