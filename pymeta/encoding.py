"""The model-aware core's codes and layer layouts, as the compiled core defines them.

C++ is the one definition (csrc/mlp_maml_math.h, csrc/mlp_net.h, csrc/seq_net.h, exported by
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
        "seq": {"kinds": {}, "fields": {}, "num_ints": 0, "ints_per_layer": 0,
                "batchnorm_ints": {}},
        "mlp": {"fields": {}, "ints_per_layer": 0},
        "activations": {}, "losses": {}, "lr_modes": {},
    }  # fmt: skip

# Layered core (seq_maml_loss): one layer is ints_per_layer ints,
# [kind, flag, adapted, input, input2, num_ints layer ints] at the positions in SEQ_FIELDS.
SEQ_KINDS: dict[str, int] = ENCODING["seq"]["kinds"]
SEQ_FIELDS: dict[str, int] = ENCODING["seq"]["fields"]
SEQ_NUM_INTS: int = ENCODING["seq"]["num_ints"]
SEQ_INTS_PER_LAYER: int = ENCODING["seq"]["ints_per_layer"]
BATCHNORM_INTS: dict[str, int] = ENCODING["seq"]["batchnorm_ints"]  # within the layer ints
# MLP core (mlp_maml_loss): one layer is ints_per_layer ints at the positions in MLP_FIELDS.
MLP_FIELDS: dict[str, int] = ENCODING["mlp"]["fields"]
MLP_INTS_PER_LAYER: int = ENCODING["mlp"]["ints_per_layer"]
ACTIVATIONS: dict[str, int] = ENCODING["activations"]
LOSSES: dict[str, int] = ENCODING["losses"]
LR_MODES: dict[str, int] = ENCODING["lr_modes"]


def seq_layer(kind: int, flag: int, adapted: bool, ints, inputs) -> list[int]:
    """One layer of the layered core's ``layers`` argument: SEQ_INTS_PER_LAYER ints.

    inputs: the one or two values it reads (0: the network input, l + 1: layer l's output)."""
    if len(ints) != SEQ_NUM_INTS:
        raise ValueError(f"ints: expected {SEQ_NUM_INTS} layer ints, received {len(ints)}")
    if len(inputs) not in (1, 2):
        raise ValueError(f"inputs: expected 1 or 2 values, received {len(inputs)}")
    row = [0] * SEQ_INTS_PER_LAYER
    row[SEQ_FIELDS["kind"]], row[SEQ_FIELDS["flag"]] = int(kind), int(flag)
    row[SEQ_FIELDS["adapted"]] = int(adapted)
    row[SEQ_FIELDS["input"]] = int(inputs[0])
    row[SEQ_FIELDS["input2"]] = int(inputs[1]) if len(inputs) == 2 else -1
    start = SEQ_FIELDS["ints"]
    row[start : start + SEQ_NUM_INTS] = [int(v) for v in ints]
    return row


def seq_rows(layers) -> list[list[int]]:
    """The layered core's flat ``layers`` ints, split into one list per layer."""
    n = SEQ_INTS_PER_LAYER
    return [list(layers[i : i + n]) for i in range(0, len(layers), n)]


def mlp_layer(activation: int, has_bias: bool, adapted: bool) -> list[int]:
    """One layer of the MLP core's ``layers`` argument: MLP_INTS_PER_LAYER ints."""
    row = [0] * MLP_INTS_PER_LAYER
    row[MLP_FIELDS["activation"]] = int(activation)
    row[MLP_FIELDS["has_bias"]] = int(has_bias)
    row[MLP_FIELDS["adapted"]] = int(adapted)
    return row
