"""float32 accuracy of ModelAwareMAML's convolutional core (issue 11, defect 11): its
second-order meta-gradient is as close to the float64 value as a per-task autograd loop's.

The network is one omniglot-shaped conv block with a smooth activation and average pooling
(conv -> batch norm -> tanh -> avg pool -> linear, 28 x 28 images, 5-way 1-shot, 15 queries per
class). ReLU and max pooling would make the meta-gradient discontinuous: a near-tie that float32
decides differently from float64 (a ReLU input at -1e-8, two maxima 1e-7 apart) moves it by up to
1e-3 in conv4 with no arithmetic at fault, so with them the comparison measures luck, not
rounding. Here it measures rounding only, and batch norm over 75 x 28 x 28 values per channel is
where the core once lost accuracy: ATen's channels-last kernel sums in float32, row after row.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from parity import reference_meta_loss
from torch import nn

import pymeta

INNER_LR = 0.4


def conv_block_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Tanh(),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 5),
    )


def omniglot_batch(seed: int, dtype: torch.dtype, tasks: int = 2, queries: int = 15):
    """5-way 1-shot tasks of (1, 28, 28) images uniform in [0, 1] (benchmarks/omniglot_step.py):
    support_x (T, 5, 1, 28, 28), query_x (T, 5 * queries, 1, 28, 28)."""
    g = torch.Generator().manual_seed(seed)
    x = lambda k: torch.rand(tasks, 5 * k, 1, 28, 28, generator=g, dtype=dtype)  # noqa: E731
    y = lambda k: torch.arange(5).repeat_interleave(k).expand(tasks, -1).contiguous()  # noqa: E731
    return pymeta.TaskBatch(x(1), y(1), x(queries), y(queries))


def meta_grads(loss_of, model: nn.Module) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss_of(model), list(model.parameters()))
    return [g.double() for g in grads]


def loop_loss(batch):
    lr = torch.tensor(INNER_LR, dtype=batch.support_x.dtype)
    return lambda m: reference_meta_loss(m, batch, [lr], 1, False, F.cross_entropy)


def aware_loss(batch):
    def loss(model):
        maml = pymeta.ModelAwareMAML(model, inner_lr=INNER_LR, loss="cross_entropy")
        return maml.meta_loss(batch)

    return loss


@pytest.mark.parametrize("seed", range(6))
def test_float32_meta_gradient_as_accurate_as_the_per_task_loop(seed):
    model32 = conv_block_net(seed)
    model64 = copy.deepcopy(model32).double()
    batch32 = omniglot_batch(seed, torch.float32)
    batch64 = pymeta.TaskBatch(
        batch32.support_x.double(), batch32.support_y, batch32.query_x.double(), batch32.query_y
    )
    truth = meta_grads(loop_loss(batch64), model64)
    # Relative to the largest gradient: the convolution bias in front of batch norm has an exact
    # gradient of zero.
    scale = max(float(t.abs().max()) for t in truth)

    def error(grads):
        return max(float((g - t).abs().max()) for g, t in zip(grads, truth)) / scale

    loop = error(meta_grads(loop_loss(batch32), model32))
    aware = error(meta_grads(aware_loss(batch32), model32))
    assert loop < 1e-3  # float32 rounding, not a broken reference
    # Measured over seeds 0-7: 0.9x-1.2x the loop's error; 0.5x-3.4x before the core's batch norm
    # summed in double.
    assert aware <= 1.5 * loop, (aware, loop)
