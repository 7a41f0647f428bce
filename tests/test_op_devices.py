"""Every torch.ops.pymeta op refuses tensor arguments on more than one device, naming the op and
the argument, expected versus received: CPU and meta tensors mixed in any position, through the
dispatcher (which sends any call with a meta tensor to the fake kernel) and straight into the
CPU kernels. All-meta calls still give outputs shaped like the CPU ones (FakeTensor,
torch.compile)."""

import re

import pytest
import torch
from torch import nn

import pymeta

F64 = torch.float64


def _sgd_lists(tasks=2):
    g = torch.Generator().manual_seed(0)
    shapes = [(tasks, 3, 2), (tasks, 3)]
    a = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    # Two per-param lrs: a scalar and a per-element one, so that lrs[1] is a position too.
    lrs = [torch.tensor(0.1, dtype=F64), torch.full(shapes[1][1:], 0.2, dtype=F64)]
    return a, b, lrs


def _core_case(kind):
    """A small ModelAwareMAML of the MLP or the layered core, with per-parameter learned rates
    (several lrs) and a batch of 2 tasks."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, example = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2),
        )  # fmt: skip
        example = (1, 4, 4)
    maml = pymeta.ModelAwareMAML(
        model.double(), loss="cross_entropy", learn_inner_lr="per_parameter"
    )
    g = torch.Generator().manual_seed(1)
    x = lambda n: torch.randn(2, n, *example, generator=g, dtype=F64)  # noqa: E731
    y = lambda n: torch.randint(0, 2, (2, n), generator=g)  # noqa: E731
    return maml, x(3), y(3), x(2), y(2)


def _case(op):
    """(op, positional args) of a valid CPU call."""
    if op == "sgd_update":
        return torch.ops.pymeta.sgd_update, list(_sgd_lists())
    if op == "sgd_update_backward":
        return torch.ops.pymeta.sgd_update_backward, [*_sgd_lists(), True]
    kind, what = op.split("_", 1)
    maml, sx, sy, qx, qy = _core_case(kind)
    params = [p.detach() for p in maml._params()]
    lrs = [lr.detach() for lr in maml.inner_lrs()]
    args = maml._core_args(sx, sy, qx, qy, params=params, lrs=lrs)
    if what == "maml_loss":
        return getattr(torch.ops.pymeta, op), [*args, True, True]
    # adapt: params, lrs, support_x, support_y, layers, layer_args, steps, lr_mode, loss
    return getattr(torch.ops.pymeta, op), [*args[:4], *args[6:8], 2, *args[9:11]]


OPS = ["sgd_update", "sgd_update_backward", "net_maml_loss", "net_adapt", "net_maml_loss",
       "net_adapt"]  # fmt: skip


def _positions(op, args):
    """(label, getter, setter) of every tensor argument, list elements one by one."""
    names = [a.name for a in op.default._schema.arguments]
    out = []
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            out.append((name, i, None))
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            out += [(f"{name}[{k}]", i, k) for k in range(len(value))]
    return out


def _at(args, i, k):
    return args[i] if k is None else args[i][k]


def _with(args, i, k, value):
    """A copy of args with argument i (element k of a list) replaced by value."""
    args = [list(a) if isinstance(a, list) else a for a in args]
    if k is None:
        args[i] = value
    else:
        args[i][k] = value
    return args


def _to(args, device):
    return [
        [t.to(device) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
        else a.to(device) if isinstance(a, torch.Tensor) else a
        for a in args
    ]  # fmt: skip


def _expected_message(op_name, positions, odd, odd_device, other_device):
    """The error for one argument on odd_device among others on other_device: the first
    argument sets the device, so a different first argument makes the second one the odd one."""
    first, second = positions[0][0], positions[1][0]
    if odd == first:
        odd, first, odd_device, other_device = second, first, other_device, odd_device
    return (
        f"pymeta::{op_name}: {re.escape(odd)}: expected device {other_device} like "
        f"{re.escape(first)}, received {odd_device}"
    )


def _outputs(out):
    """The tensors of an op's output, flattened."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in _outputs(part)]


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("odd_device, other_device", [("meta", "cpu"), ("cpu", "meta")])
def test_a_tensor_on_another_device_is_refused_in_every_position(op_name, odd_device, other_device):
    op, cpu_args = _case(op_name)
    args = _to(cpu_args, other_device)
    positions = _positions(op, args)
    assert len(positions) >= 3
    for label, i, k in positions:
        mixed = _with(args, i, k, _at(cpu_args, i, k).to(odd_device))
        match = _expected_message(op_name, positions, label, odd_device, other_device)
        with pytest.raises(ValueError, match=match):
            op(*mixed)


@pytest.mark.parametrize("op_name", OPS)
def test_the_cpu_kernels_check_devices_too(op_name):
    """Straight into the CPU kernel (below the dispatcher's choice of device), a meta tensor in
    any position is refused with the same message, before any data is read."""
    op, args = _case(op_name)
    positions = _positions(op, args)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    for label, i, k in positions:
        mixed = _with(args, i, k, _at(args, i, k).to("meta"))
        match = _expected_message(op_name, positions, label, "meta", "cpu")
        with pytest.raises(ValueError, match=match):
            op.default.redispatch(cpu, *mixed)


@pytest.mark.parametrize("op_name", OPS)
def test_all_meta_calls_give_outputs_shaped_like_the_cpu_ones(op_name):
    op, args = _case(op_name)
    want = _outputs(op(*args))
    got = _outputs(op(*_to(args, "meta")))
    assert [t.device.type for t in got] == ["meta"] * len(want)
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]


@pytest.mark.parametrize("op_name", OPS)
def test_fake_kernels_refuse_a_dtype_the_cpu_kernels_refuse(op_name):
    """A float32 tensor among float64 ones, in the second list (grads or lrs): the CPU kernel
    refuses it, and so must the fake kernel (it would otherwise trace a call that cannot run)."""
    op, args = _case(op_name)
    label, i, k = next(p for p in _positions(op, args) if p[1] == 1)
    mixed = _with(args, i, k, _at(args, i, k).float())
    with pytest.raises((TypeError, RuntimeError), match=re.escape(f"pymeta::{op_name}: ")):
        op(*mixed)
    with pytest.raises(TypeError, match=rf"pymeta::{op_name}: {re.escape(label)}: expected dtype"):
        op(*_to(mixed, "meta"))


def test_fake_kernels_refuse_non_integer_class_targets():
    op, args = _case("net_maml_loss")
    args[3] = args[3].double()  # support_y: cross-entropy takes int64 class indices
    with pytest.raises(TypeError, match=r"support_y: expected dtype torch.int64"):
        op(*_to(args, "meta"))


def test_fake_tensor_mode_traces_the_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op_name in OPS:
        op, args = _case(op_name)
        want = _outputs(op(*args))
        with FakeTensorMode() as mode:
            fake = [
                [mode.from_tensor(t) for t in a] if isinstance(a, list) and a
                and isinstance(a[0], torch.Tensor)
                else mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in args
            ]  # fmt: skip
            got = _outputs(op(*fake))
        assert [(t.shape, t.dtype, t.device) for t in got] == [
            (t.shape, t.dtype, t.device) for t in want
        ]
