"""Argument checks shared by the public API: each error names the argument and says what was
expected versus what was received."""

from __future__ import annotations

import math

import torch


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, received {type(value).__name__}")
    return value


def check_floating(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, received dtype {value.dtype}")


def check_min_dim(name: str, value: torch.Tensor, min_dim: int, layout: str) -> None:
    if value.dim() < min_dim:
        raise ValueError(
            f"{name}: expected at least {min_dim} dimensions {layout}, "
            f"received shape {tuple(value.shape)}"
        )


def check_finite(name: str, value: torch.Tensor) -> None:
    # max |x| is finite exactly when every element is (max propagates NaN): one reduction where
    # isfinite(x).all() is several ops, which counts on the small sets of a drop-in adapt() call.
    if value.is_floating_point() and value.numel() and not math.isfinite(value.abs().max()):
        raise ValueError(f"{name}: expected finite values, received NaN or infinity")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, received {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, received {value}")
    return value


def check_same_device(name: str, value: torch.Tensor, device: torch.device, owner: str) -> None:
    if value.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (the device of {owner}), "
            f"received one on {value.device}"
        )


def support_as_batch(support_x, support_y, batched: bool):
    """Checks adapt()'s support set and gives it a task dimension: (T, K, ...) tensors.

    Validation is TaskBatch's (shapes, dtypes, devices, empty sets, NaN/inf), with the support
    set standing in for the query set.
    """
    from pymeta.task_batch import TaskBatch  # here: task_batch imports this module

    check_tensor("support_x", support_x)
    check_tensor("support_y", support_y)
    if not batched:
        support_x, support_y = support_x.unsqueeze(0), support_y.unsqueeze(0)
    TaskBatch(support_x, support_y, support_x, support_y)
    return support_x, support_y


def check_task_data(module, loss, x_name: str, x, y_name: str, y, batched: bool) -> None:
    """Inputs on the module's device with its dtype, and targets that the TaskLoss takes."""
    ref = next(iter(module.parameters()))
    check_same_device(x_name, x, ref.device, "the model's parameters")
    check_same_device(y_name, y, ref.device, "the model's parameters")
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{x_name}: expected dtype {ref.dtype} like the model's parameters, received {x.dtype}"
        )
    loss.check_targets(y_name, y, batched)
