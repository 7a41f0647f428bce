"""Standard networks of the MAML literature."""

from __future__ import annotations

from torch import nn

from pymeta._checks import check_positive_int

# Four 2x2 poolings: a smaller image leaves conv4 no pixel for its head.
CONV4_MIN_IMAGE_SIZE = 16


def conv4(
    n_way: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28
) -> nn.Sequential:
    """The 4-block few-shot classifier of MAML (Finn et al. 2017) and most of its successors.

    Each block is a 3x3 convolution (padding 1), batch norm, ReLU and 2x2 max-pooling; a Linear
    head maps the flattened features to ``n_way`` logits. Batch norm keeps no running
    statistics: MAML normalizes with the statistics of the batch at hand (transductive), and
    this also keeps the network vmap-friendly.

    Args:
        n_way: classes per task (output logits).
        in_channels: image channels (1 for Omniglot).
        hidden: channels of every convolution.
        image_size: input height and width; four poolings take it to image_size // 16.

    Input (N, in_channels, image_size, image_size) -> logits (N, n_way).
    """
    for name, value in (
        ("n_way", n_way),
        ("in_channels", in_channels),
        ("hidden", hidden),
        ("image_size", image_size),
    ):
        check_positive_int(name, value)
    if image_size < CONV4_MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size: expected at least {CONV4_MIN_IMAGE_SIZE} (four 2x2 poolings), "
            f"received {image_size}"
        )
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = hidden
    side = image_size
    for _ in range(4):
        side //= 2
    layers += [nn.Flatten(), nn.Linear(hidden * side * side, n_way)]
    return nn.Sequential(*layers)
