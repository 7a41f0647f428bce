"""The model-aware core's codes and layer layout, as the compiled core defines them.

C++ is the one definition (csrc/net/codes.h, csrc/net/net.h, exported by
``pymeta._C.encoding()``); this module only gives its values names. Without the compiled core
every table is empty: pymeta still imports (with the warning of ``pymeta._ops``), and
ModelAwareMAML, the only reader, refuses to run.
"""

from __future__ import annotations

try:
    from pymeta._C import encoding as _exported
except ImportError:  # pragma: no cover - broken installs; pymeta._ops warns about them
    _exported = None

if _exported is not None:
    ENCODING: dict = _exported()
else:  # pragma: no cover
    ENCODING = {
        "net": {"kinds": {}, "fields": {}, "num_ints": 0, "ints_per_layer": 0,
                "batchnorm_ints": {}, "conv_ints": {}, "pool_ints": {}},
        "activations": {}, "losses": {}, "lr_modes": {},
    }  # fmt: skip

# One layer of net_maml_loss's `layers` is INTS_PER_LAYER ints:
# [kind, flag, adapted, input, input2, NUM_INTS layer ints] at the positions in FIELDS.
KINDS: dict[str, int] = ENCODING["net"]["kinds"]
FIELDS: dict[str, int] = ENCODING["net"]["fields"]
NUM_INTS: int = ENCODING["net"]["num_ints"]
INTS_PER_LAYER: int = ENCODING["net"]["ints_per_layer"]
# Positions within the layer ints; an (h, w) pair takes two from its position.
BATCHNORM_INTS: dict[str, int] = ENCODING["net"]["batchnorm_ints"]
CONV_INTS: dict[str, int] = ENCODING["net"]["conv_ints"]
POOL_INTS: dict[str, int] = ENCODING["net"]["pool_ints"]
ACTIVATIONS: dict[str, int] = ENCODING["activations"]
LOSSES: dict[str, int] = ENCODING["losses"]
LR_MODES: dict[str, int] = ENCODING["lr_modes"]


def layer_ints(positions: dict[str, int], **values) -> tuple[int, ...]:
    """NUM_INTS layer ints, zero but for each named value at its place in ``positions``
    (BATCHNORM_INTS, CONV_INTS or POOL_INTS): an int, or an (h, w) pair filling two ints."""
    ints = [0] * NUM_INTS
    for name, value in values.items():
        items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        start = positions[name]
        ints[start : start + len(items)] = [int(v) for v in items]
    return tuple(ints)


def layer_row(kind: int, flag: int, adapted: bool, ints, inputs) -> list[int]:
    """One layer of the core's ``layers`` argument: INTS_PER_LAYER ints.

    inputs: the one or two values it reads (0: the network input, l + 1: layer l's output)."""
    if len(ints) != NUM_INTS:
        raise ValueError(f"ints: expected {NUM_INTS} layer ints, received {len(ints)}")
    if len(inputs) not in (1, 2):
        raise ValueError(f"inputs: expected 1 or 2 values, received {len(inputs)}")
    row = [0] * INTS_PER_LAYER
    row[FIELDS["kind"]], row[FIELDS["flag"]] = int(kind), int(flag)
    row[FIELDS["adapted"]] = int(adapted)
    row[FIELDS["input"]] = int(inputs[0])
    row[FIELDS["input2"]] = int(inputs[1]) if len(inputs) == 2 else -1
    start = FIELDS["ints"]
    row[start : start + NUM_INTS] = [int(v) for v in ints]
    return row


def layer_rows(layers) -> list[list[int]]:
    """The core's flat ``layers`` ints, split into one list per layer."""
    n = INTS_PER_LAYER
    return [list(layers[i : i + n]) for i in range(0, len(layers), n)]
