"""Bad input gets a TypeError/ValueError that names the argument, with expected vs received."""

import pytest
import torch
from torch import nn

import pymeta


def ok_parts(tasks=3, k=4, q=5, dtype=torch.float32):
    return dict(
        support_x=torch.randn(tasks, k, 2, dtype=dtype),
        support_y=torch.randn(tasks, k, 1, dtype=dtype),
        query_x=torch.randn(tasks, q, 2, dtype=dtype),
        query_y=torch.randn(tasks, q, 1, dtype=dtype),
    )


def with_(**changes):
    parts = ok_parts()
    parts.update(changes)
    return parts


@pytest.mark.parametrize(
    "parts, exc, match",
    [
        (
            with_(query_x=torch.randn(2, 5, 2)),
            ValueError,
            r"query_x: expected 3 tasks .* received 2",
        ),
        (with_(support_y=torch.randn(4, 4, 1)), ValueError, r"support_y: expected 3 tasks"),
        (
            with_(support_y=torch.randn(3, 3, 1)),
            ValueError,
            r"support_y: expected 4 examples per task",
        ),
        (
            with_(query_x=torch.randn(3, 5, 7)),
            ValueError,
            r"query_x: expected per-example shape \(2,\)",
        ),
        (
            with_(query_y=torch.randn(3, 5, 2)),
            ValueError,
            r"query_y: expected per-example shape \(1,\)",
        ),
        (
            with_(support_x=torch.ones(3, 4, 2, dtype=torch.long)),
            TypeError,
            r"support_x: expected a floating-point .* torch.int64",
        ),
        (
            with_(support_x=torch.randn(3, 0, 2), support_y=torch.randn(3, 0, 1)),
            ValueError,
            r"support_x: expected a non-empty set",
        ),
        (
            with_(
                support_x=torch.randn(0, 4, 2),
                support_y=torch.randn(0, 4, 1),
                query_x=torch.randn(0, 5, 2),
                query_y=torch.randn(0, 5, 1),
            ),
            ValueError,
            r"at least one task",
        ),
        (
            with_(support_x=torch.randn(4, 2)),
            ValueError,
            r"support_x: expected 4 tasks|support_y: expected 4 tasks",
        ),
        (
            with_(support_x=torch.full((3, 4, 2), float("nan"))),
            ValueError,
            r"support_x: expected finite values",
        ),
        (
            with_(query_y=torch.full((3, 5, 1), float("inf"))),
            ValueError,
            r"query_y: expected finite values",
        ),
        (with_(support_x=[[1.0]]), TypeError, r"support_x: expected a torch.Tensor, received list"),
        (
            with_(query_y=torch.ones(3, 5, 1, dtype=torch.float64)),
            TypeError,
            r"query_y: expected dtype torch.float32",
        ),
        (with_(support_y=torch.randn(3)), ValueError, r"support_y: expected at least 2 dimensions"),
    ],
)
def test_task_batch_rejects(parts, exc, match):
    with pytest.raises(exc, match=match):
        pymeta.TaskBatch(**parts)


def net():
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(inner_steps=0), ValueError, r"inner_steps: expected a positive int, received 0"),
        (dict(inner_steps=-2), ValueError, r"inner_steps: expected a positive int, received -2"),
        (dict(inner_steps=1.5), TypeError, r"inner_steps: expected a positive int, received float"),
        (dict(inner_lr=float("nan")), ValueError, r"inner_lr: expected a finite number >= 0"),
        (dict(inner_lr=-0.1), ValueError, r"inner_lr: expected a finite number >= 0"),
        (dict(loss="hinge"), ValueError, r"loss: expected one of \('mse', 'cross_entropy'\)"),
        (dict(loss=3), TypeError, r"loss: expected a str or a callable"),
        (dict(learn_inner_lr="per_layer"), ValueError, r"learn_inner_lr: expected one of"),
        (dict(vectorize="yes"), ValueError, r"vectorize: expected one of"),
    ],
)
def test_maml_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pymeta.MAML(net(), **kwargs)


def test_maml_rejects_non_module_and_no_parameters():
    with pytest.raises(TypeError, match=r"model: expected an nn.Module, received function"):
        pymeta.MAML(lambda x: x)
    with pytest.raises(ValueError, match=r"model: expected at least one parameter"):
        pymeta.MAML(nn.ReLU())


def test_cross_entropy_needs_int64_labels():
    maml = pymeta.MAML(nn.Linear(2, 3), loss="cross_entropy")
    parts = ok_parts()
    parts["support_y"] = torch.zeros(3, 4, dtype=torch.int32)
    parts["query_y"] = torch.zeros(3, 5, dtype=torch.int32)
    with pytest.raises(
        TypeError,
        match=r"batch.support_y: cross_entropy expects int64 class indices, received dtype "
        r"torch.int32",
    ):
        maml.meta_loss(pymeta.TaskBatch(**parts))
    parts["support_y"] = torch.zeros(3, 4, 1, dtype=torch.long)
    parts["query_y"] = torch.zeros(3, 5, 1, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"batch.support_y: cross_entropy expects class indices of shape \(T, K\)"
    ):
        maml.meta_loss(pymeta.TaskBatch(**parts))


def test_mse_needs_matching_output_shape_and_float_targets():
    maml = pymeta.MAML(nn.Linear(2, 3))
    with pytest.raises(
        ValueError, match=r"mse expects the model's output shape \(3, 4, 3\), received \(3, 4, 1\)"
    ):
        maml.meta_loss(pymeta.TaskBatch(**ok_parts()))
    parts = ok_parts()
    parts["support_y"] = torch.zeros(3, 4, 1, dtype=torch.long)
    parts["query_y"] = torch.zeros(3, 5, 1, dtype=torch.long)
    with pytest.raises(TypeError, match=r"batch.support_y: mse expects floating-point targets"):
        pymeta.MAML(nn.Linear(2, 1)).meta_loss(pymeta.TaskBatch(**parts))


def test_data_dtype_must_match_model():
    maml = pymeta.MAML(net())
    with pytest.raises(
        TypeError,
        match=r"batch.support_x: expected dtype torch.float32 like the model's parameters, "
        r"received torch.float64",
    ):
        maml.meta_loss(pymeta.TaskBatch(**ok_parts(dtype=torch.float64)))


def test_device_mismatch_between_model_and_data():
    maml = pymeta.MAML(net().to("meta"))
    with pytest.raises(
        ValueError, match=r"batch.support_x: expected a tensor on meta .* received one on cpu"
    ):
        maml.meta_loss(pymeta.TaskBatch(**ok_parts()))


def test_meta_loss_needs_a_task_batch():
    with pytest.raises(TypeError, match=r"batch: expected a pymeta.TaskBatch, received dict"):
        pymeta.MAML(net()).meta_loss(ok_parts())


def test_adapt_rejects():
    maml = pymeta.MAML(net())
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    with pytest.raises(ValueError, match=r"steps: expected a positive int, received 0"):
        maml.adapt(x, y, steps=0)
    with pytest.raises(
        ValueError,
        match=r"support_x: expected \(K, \.\.\.\) with 2 dims or \(T, K, \.\.\.\) with 3 dims",
    ):
        maml.adapt(torch.randn(2, 3, 4, 2), y)
    with pytest.raises(ValueError, match=r"support_x: expected a non-empty set"):
        maml.adapt(torch.randn(0, 2), torch.randn(0, 1))
    with pytest.raises(TypeError, match=r"support_y: expected a torch.Tensor"):
        maml.adapt(x, [1.0])
    adapted = maml.adapt(x, y)
    with pytest.raises(ValueError, match=r"x: expected 2 tasks in dimension 0"):
        pymeta.MAML(net()).adapt(
            x.unsqueeze(0).expand(2, -1, -1), y.unsqueeze(0).expand(2, -1, -1)
        )(torch.randn(3, 4, 2))
    assert adapted(torch.randn(7, 2)).shape == (7, 1)


def test_adapt_without_a_known_input_layout_asks_for_batched():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return (x * self.w).sum(-1, keepdim=True)

    maml = pymeta.MAML(Custom())
    with pytest.raises(
        ValueError, match=r"batched: cannot tell whether support_x carries a task dimension"
    ):
        maml.adapt(torch.randn(4, 2), torch.randn(4, 1))
    assert maml.adapt(torch.randn(4, 2), torch.randn(4, 1), batched=False)(
        torch.randn(3, 2)
    ).shape == (3, 1)


def test_learner_adapt_rejects_non_scalar_loss():
    learner = pymeta.MAML(net()).clone()
    with pytest.raises(ValueError, match=r"loss: expected a scalar, received shape \(4, 1\)"):
        learner.adapt(learner(torch.randn(4, 2)))


def test_sinusoid_rejects():
    with pytest.raises(ValueError, match=r"k_support: expected a positive int, received 0"):
        pymeta.tasks.Sinusoid(k_support=0)
    with pytest.raises(ValueError, match=r"amplitude: expected \(low, high\) with low <= high"):
        pymeta.tasks.Sinusoid(amplitude=(5.0, 0.1))
    with pytest.raises(ValueError, match=r"num_tasks: expected a positive int, received 0"):
        pymeta.tasks.Sinusoid().sample(0)
