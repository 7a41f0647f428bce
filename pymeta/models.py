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


# Four 2x2 max-poolings, one per residual block: a smaller image leaves no pixel to pool.
RESNET12_MIN_IMAGE_SIZE = 16
RESNET12_LEAKY_SLOPE = 0.1


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    # No conv bias: batch norm's shift makes it redundant (its exact gradient is zero).
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
    ]


class ResidualBlock(nn.Module):
    """One ResNet-12 block: three 3x3 conv-BN layers, a 1x1 conv-BN shortcut, their sum, then
    LeakyReLU(0.1) and 2x2 max-pooling.

    Written the torchvision way (``out = body(x) + shortcut(x)``), so ``torch.fx`` tracing
    shows the residual add as one node.

    Input (N, in_channels, H, W) -> (N, out_channels, H // 2, W // 2).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        act = lambda: nn.LeakyReLU(RESNET12_LEAKY_SLOPE)  # noqa: E731
        self.body = nn.Sequential(
            *_conv_bn(in_channels, out_channels, 3),
            act(),
            *_conv_bn(out_channels, out_channels, 3),
            act(),
            *_conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1))
        # The third activation comes after the add (MetaOptNet's block).
        self.act = act()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.body(x)
        out = out + self.shortcut(x)
        return self.pool(self.act(out))


def resnet12(
    n_way: int,
    in_channels: int = 3,
    widths: tuple[int, int, int, int] = (64, 160, 320, 640),
    image_size: int = 84,
) -> nn.Sequential:
    """The ResNet-12 backbone of few-shot learning (MetaOptNet, Lee et al. 2019, and most later
    papers) with a linear head.

    Four ``ResidualBlock``s of ``widths`` channels, each halving the image; then a global
    average pool, Flatten and a Linear head to ``n_way`` logits. Batch norm keeps no running
    statistics, as in ``conv4``: MAML normalizes with the statistics of the batch at hand.
    Runs in ``pymeta.MAML`` and in ``pymeta.ModelAwareMAML`` (its graph reader follows the
    blocks' residual adds).

    Args:
        n_way: classes per task (output logits).
        in_channels: image channels (3 for miniImageNet).
        widths: output channels of the four blocks.
        image_size: input height and width; four poolings take it to image_size // 16 before
            the global average pool. The network itself accepts any size of at least 16.

    Input (N, in_channels, image_size, image_size) -> logits (N, n_way).
    """
    check_positive_int("n_way", n_way)
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    if (
        not isinstance(widths, (tuple, list))
        or len(widths) != 4
        or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths)
    ):
        raise ValueError(f"widths: expected 4 positive ints, received {widths!r}")
    if image_size < RESNET12_MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size: expected at least {RESNET12_MIN_IMAGE_SIZE} (four 2x2 poolings), "
            f"received {image_size}"
        )
    blocks = []
    channels = in_channels
    for width in widths:
        blocks.append(ResidualBlock(channels, width))
        channels = width
    return nn.Sequential(
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], n_way)
    )
