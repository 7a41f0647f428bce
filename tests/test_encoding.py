"""The model-aware core's encoding (layer kinds, activation, loss and lr mode codes, layer layouts)
is defined once, in C++, and exported by pymeta._C.encoding(): the Python readers use exactly
those values, a network of every layer kind round-trips through the op, and a wrong code is
caught (refused by the op's parser, or a result that no longer matches autograd)."""

import pytest
import torch
import torch.nn.functional as F
from parity import lr_lookup, reference_loss, rel_err
from torch import nn

import pymeta
from pymeta import _C, losses
from pymeta.model_aware import LR_MODES, encoding, net_spec

TOL = 1e-10


class EveryKind(nn.Module):
    """One layer of every kind the layered core runs, with a residual add and a concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False),
            nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.branch = nn.Conv2d(3, 3, 1)
        self.tail = nn.Sequential(
            nn.Conv2d(6, 4, 3), nn.Tanh(), nn.AvgPool2d(2, stride=1), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(4, 3),
        )  # fmt: skip

    def forward(self, x):
        h = self.stem(x)
        return self.tail(torch.cat([h + self.branch(h), h], 1))


def every_kind_net():
    """(model, example shape)."""
    torch.manual_seed(0)
    return EveryKind().double(), (1, 8, 8)


def batch_for(example, tasks=2, k=4, q=5, classes=3):
    g = torch.Generator().manual_seed(1)
    x = lambda n: torch.randn(tasks, n, *example, generator=g, dtype=torch.float64)  # noqa: E731
    y = lambda n: torch.randint(0, classes, (tasks, n), generator=g)  # noqa: E731
    return pymeta.TaskBatch(x(k), y(k), x(q), y(q))


def meta_loss_error(model, example) -> float:
    maml = pymeta.ModelAwareMAML(model, inner_steps=2, inner_lr=0.3, loss="cross_entropy")
    batch = batch_for(example)
    got = maml.meta_loss(batch)
    return rel_err(got, reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy))


def test_python_tables_are_the_exported_ones():
    exported = _C.encoding()
    assert encoding.ENCODING == exported
    assert net_spec.KINDS == exported["net"]["kinds"]
    assert sorted(net_spec.ACTIVATION_CODES.values()) == sorted(
        code for name, code in exported["activations"].items() if name != "none"
    )
    assert set(LR_MODES) == set(exported["lr_modes"])
    assert set(losses.LOSS_NAMES) == set(exported["losses"])
    net = exported["net"]
    assert net["ints_per_layer"] == len(net["fields"]) - 1 + net["num_ints"]
    # Codes are dense from 0: the op's parsers accept [0, count).
    for table in (net["kinds"], exported["activations"], exported["losses"], exported["lr_modes"]):
        assert sorted(table.values()) == list(range(len(table)))


def test_every_kind_round_trips_through_the_op():
    model, example = every_kind_net()
    spec = net_spec.NetSpec.from_module(model)
    ints, args = spec.core_layers(spec.resolve_adapted(None))
    rows = encoding.layer_rows(ints)
    kind = encoding.FIELDS["kind"]
    assert {row[kind] for row in rows} == set(encoding.KINDS.values())
    assert all(len(row) == encoding.INTS_PER_LAYER for row in rows) and len(args) == len(rows)
    assert meta_loss_error(model, example) < TOL


def test_fake_kernel_reads_the_layout_like_the_op():
    """The fake kernel's batch norm channels (read with the encoding module) match the op's."""
    model, example = every_kind_net()
    maml = pymeta.ModelAwareMAML(model, inner_steps=2, loss="cross_entropy")
    batch = batch_for(example)
    args = maml._core_args(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    real = maml._loss_op(*args, True, False)[4]
    meta_args = [  # params and lrs are lists of tensors
        [t.to("meta") for t in a] if i < 2 else a.to("meta") if torch.is_tensor(a) else a
        for i, a in enumerate(args)
    ]
    fake = maml._loss_op(*meta_args, True, False)[4]
    assert fake.device.type == "meta" and fake.shape == real.shape == (2, 3, 2, 3)


def test_swapped_kind_codes_are_caught(monkeypatch):
    """Valid but wrong codes (max and average pooling swapped) give a wrong loss, so the
    round-trip check above can fail."""
    kinds = dict(net_spec.KINDS)
    monkeypatch.setitem(net_spec.KINDS, "maxpool", kinds["avgpool"])
    monkeypatch.setitem(net_spec.KINDS, "avgpool", kinds["maxpool"])
    assert meta_loss_error(*every_kind_net()) > 1e-3


@pytest.mark.parametrize("table", ["kind", "activation", "mlp_activation", "lr_mode", "loss"])
def test_out_of_range_codes_are_refused_by_the_op(table):
    model, example = every_kind_net()
    if table == "mlp_activation":
        model = nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        example = (64,)
    maml = pymeta.ModelAwareMAML(model, inner_steps=1, loss="cross_entropy")
    batch = batch_for(example)
    args = list(maml._core_args(batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    layers = list(args[6])
    if table == "kind":  # the Flatten layer's kind
        row = len(encoding.layer_rows(layers)) - 2
        layers[row * encoding.INTS_PER_LAYER + encoding.FIELDS["kind"]] = len(encoding.KINDS)
        match = "unknown kind"
    elif table == "activation":  # the ReLU layer's flag
        layers[2 * encoding.INTS_PER_LAYER + encoding.FIELDS["flag"]] = len(encoding.ACTIVATIONS)
        match = "unknown activation code"
    elif table == "mlp_activation":  # the Tanh layer's flag, on the MLP fast path
        assert maml.core_kind == "mlp"
        layers[encoding.INTS_PER_LAYER + encoding.FIELDS["flag"]] = len(encoding.ACTIVATIONS)
        match = "unknown activation code"
    elif table == "lr_mode":
        args[9] = len(encoding.LR_MODES)
        match = "lr_mode must be"
    else:
        args[10] = len(encoding.LOSSES)
        match = "loss must be"
    args[6] = layers
    with pytest.raises(RuntimeError, match=match):
        maml._loss_op(*args, True, False)


def test_layer_helpers_place_fields_where_the_export_says():
    row = encoding.layer_row(5, 1, True, range(10, 10 + encoding.NUM_INTS), (3, 2))
    fields = encoding.FIELDS
    assert (row[fields["kind"]], row[fields["flag"]], row[fields["adapted"]]) == (5, 1, 1)
    assert (row[fields["input"]], row[fields["input2"]]) == (3, 2)
    assert encoding.layer_row(0, 0, False, [0] * encoding.NUM_INTS, (4,))[fields["input2"]] == -1
    assert row[fields["ints"] :][: encoding.NUM_INTS] == list(range(10, 16))
    with pytest.raises(ValueError, match="ints: expected 6 layer ints, received 2"):
        encoding.layer_row(0, 0, False, (1, 2), (0,))


@pytest.mark.parametrize(
    "table, pairs",
    [
        ("batchnorm_ints", ()),
        ("conv_ints", ("stride", "padding")),
        ("pool_ints", ("kernel", "stride", "padding")),
    ],
)
def test_layer_int_positions_fit_and_do_not_overlap(table, pairs):
    """Each named layer int (an (h, w) pair takes two) lies inside the layer ints, apart from the
    others; layer_ints places values there, as the op reads them."""
    positions = _C.encoding()["net"][table]
    taken = []
    for name, start in positions.items():
        taken += [start, start + 1] if name in pairs else [start]
    assert len(taken) == len(set(taken)) and all(0 <= i < encoding.NUM_INTS for i in taken)
    values = {name: (7 + i, 20 + i) if name in pairs else 7 + i for i, name in enumerate(positions)}
    ints = encoding.layer_ints(positions, **values)
    for name, value in values.items():
        got = ints[positions[name] : positions[name] + (2 if name in pairs else 1)]
        assert got == (value if name in pairs else (value,))
