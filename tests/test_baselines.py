"""pymeta.baselines.Pretrained: the adapt contract, agreement with a hand-written SGD loop
(float64), pretraining, bad input, and the `--variant pretrained` command line."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import pymeta
from pymeta.__main__ import main
from pymeta.baselines import ClassBatches, Pretrained, pretrain

TOL = 1e-10


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(widths=(1, 16, 16, 1)):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).double()


def conv_net(classes=7):
    """A tiny conv4-like classifier with batch norm (batch statistics, as in conv4)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, classes),
    ).double()


class Scaled(nn.Module):
    """Output = 1 * head output: not the head's own tensor, so adapt reruns the network."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1.0


def regression_tasks(tasks=4, k=5, q=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return pymeta.TaskBatch(r(tasks, k, 1), r(tasks, k, 1), r(tasks, q, 1), r(tasks, q, 1))


def image_tasks(tasks=3, n_way=3, k=2, q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    labels = lambda n: torch.arange(n_way).repeat_interleave(n).expand(tasks, -1).contiguous()  # noqa: E731
    return pymeta.TaskBatch(
        r(tasks, n_way * k, 1, 8, 8), labels(k), r(tasks, n_way * q, 1, 8, 8), labels(q)
    )


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------- adapt contract
def test_adapt_shapes_single_and_batched_agree():
    batch = regression_tasks()
    pre = Pretrained(mlp(), inner_lr=0.1, inner_steps=3)
    adapted = pre.adapt(batch.support_x, batch.support_y)
    assert adapted.batched and adapted(batch.query_x).shape == (4, 6, 1)
    single = pre.adapt(batch.support_x[1], batch.support_y[1])
    assert not single.batched and single(batch.query_x[1]).shape == (6, 1)
    assert torch.allclose(single(batch.query_x[1]), adapted(batch.query_x)[1], atol=1e-12)


def test_adapt_leaves_the_pretrained_network_untouched_and_keeps_no_graph():
    batch = image_tasks()
    pre = Pretrained(conv_net(), loss="cross_entropy", inner_lr=0.5, inner_steps=4, head=3)
    before = snapshot(pre)
    adapted = pre.adapt(batch.support_x, batch.support_y)
    pred = adapted(batch.query_x)
    for key, value in pre.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in pre.parameters())
    assert not pred.requires_grad
    assert all(not p.requires_grad and p.grad_fn is None for p in adapted.params.values())


def test_head_is_replaced_per_task_for_classification():
    batch = image_tasks(tasks=3, n_way=3)
    pre = Pretrained(
        conv_net(classes=7),
        loss="cross_entropy",
        inner_lr=0.5,
        inner_steps=2,
        adapt_layers="head",
        head=3,
    )
    assert pre(batch.support_x[0]).shape == (6, 7)  # the pretrained network: 7 classes
    adapted = pre.adapt(batch.support_x, batch.support_y)
    assert sorted(adapted.params) == ["5.bias", "5.weight"]  # only the head is fine-tuned
    assert adapted.params["5.weight"].shape == (3, 3, 64)
    assert adapted(batch.query_x).shape == (3, 6, 3)
    # Zero-initialised: without fine-tuning every class would be equally likely; after it, the
    # tasks' heads differ because their support sets do.
    assert not torch.equal(adapted.params["5.weight"][0], adapted.params["5.weight"][1])


def test_head_factory_sets_the_starting_head():
    torch.manual_seed(1)
    start = nn.Linear(64, 3).double()
    pre = Pretrained(
        conv_net(), loss="cross_entropy", inner_lr=0.0, adapt_layers="head", head=lambda f: start
    )
    batch = image_tasks()
    adapted = pre.adapt(batch.support_x, batch.support_y)  # lr 0: the head stays at its start
    assert torch.equal(adapted.params["5.weight"][2], start.weight.detach())
    assert "head_weight" in pre.state_dict()


@pytest.mark.parametrize("adapt_layers", [None, "head"])
def test_fine_tuning_lowers_the_support_loss(adapt_layers):
    batch = image_tasks(tasks=4)
    pre = Pretrained(
        conv_net(),
        loss="cross_entropy",
        inner_lr=0.3,
        inner_steps=10,
        adapt_layers=adapt_layers,
        head=3,
    )
    once = pre.adapt(batch.support_x, batch.support_y, steps=1)
    many = pre.adapt(batch.support_x, batch.support_y)
    loss = lambda a: F.cross_entropy(  # noqa: E731
        a(batch.support_x).flatten(0, 1), batch.support_y.flatten()
    )
    assert loss(many) < 0.5 * loss(once) and loss(once) < math.log(3)  # log 3: the zero head

    reg = regression_tasks()
    pre = Pretrained(mlp(), inner_lr=0.05, inner_steps=20, adapt_layers=adapt_layers)
    mse = lambda a: F.mse_loss(a(reg.support_x), reg.support_y)  # noqa: E731
    assert mse(pre.adapt(reg.support_x, reg.support_y)) < 0.8 * F.mse_loss(
        pre(reg.support_x), reg.support_y
    )


# ---------------------------------------------------------------------------- exact agreement
def hand_sgd(net, names, start, x, y, loss_fn, lr, steps):
    """Plain per-task SGD on the named parameters, from ``start`` values."""
    params = {n: start[n].clone().requires_grad_() for n in names}
    for _ in range(steps):
        loss = loss_fn(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {
            n: (p - lr * g).detach().requires_grad_() for (n, p), g in zip(params.items(), grads)
        }
    return params


def test_adapt_matches_hand_written_sgd_regression_all_layers():
    batch, net = regression_tasks(), mlp()
    pre = Pretrained(net, inner_lr=0.07, inner_steps=4)
    adapted = pre.adapt(batch.support_x, batch.support_y)
    start = dict(net.named_parameters())
    for t in range(batch.num_tasks):
        params = hand_sgd(
            net, list(start), start, batch.support_x[t], batch.support_y[t], F.mse_loss, 0.07, 4
        )
        for n, p in params.items():
            assert (adapted.params[n][t] - p).abs().max() < TOL, n
        want = functional_call(net, params, (batch.query_x[t],))
        assert (adapted(batch.query_x)[t] - want).abs().max() < TOL


@pytest.mark.parametrize("wrap", [False, True], ids=["cached-features", "rerun-network"])
def test_adapt_matches_hand_written_sgd_new_head(wrap):
    batch, net = image_tasks(), conv_net()
    model = Scaled(net) if wrap else net
    prefix = "net." if wrap else ""
    pre = Pretrained(
        model, loss="cross_entropy", inner_lr=0.4, inner_steps=5, adapt_layers="head", head=3
    )
    adapted = pre.adapt(batch.support_x, batch.support_y)
    start = dict(model.named_parameters())
    start[prefix + "5.weight"] = torch.zeros(3, 64, dtype=torch.float64)
    start[prefix + "5.bias"] = torch.zeros(3, dtype=torch.float64)
    names = [prefix + "5.weight", prefix + "5.bias"]
    for t in range(batch.num_tasks):
        params = hand_sgd(
            model, names, start, batch.support_x[t], batch.support_y[t], F.cross_entropy, 0.4, 5
        )
        for n, p in params.items():
            assert (adapted.params[n][t] - p).abs().max() < TOL, n
        want = functional_call(model, params, (batch.query_x[t],))
        assert (adapted(batch.query_x)[t] - want).abs().max() < TOL


# ---------------------------------------------------------------------------- pretraining
def test_pretrain_loss_decreases_with_an_optimizer():
    pre = Pretrained(conv_net(classes=5), loss="cross_entropy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(5).repeat(4)
    opt = torch.optim.Adam(pre.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = pre.pretrain_loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pretraining_on_pooled_sinusoid_tasks_learns_the_mean_function():
    """Trained jointly on all tasks, the network predicts E[A sin(x - φ)] = -2 E[A] cos(x) / π,
    as the MAML paper's pretrained baseline does before fine-tuning."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    pre = Pretrained(net, inner_lr=0.01)
    tasks = pymeta.tasks.Sinusoid(k_support=5, k_query=10)
    opt = torch.optim.Adam(pre.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        opt.zero_grad()
        pre.pretrain_loss(tasks.sample(200, g)).backward()
        opt.step()
    x = torch.linspace(-4.0, 4.0, 81).unsqueeze(1)
    mean = -2 * 2.55 * torch.cos(x) / math.pi
    with torch.no_grad():
        assert (pre(x) - mean).abs().max() < 0.35  # measured 0.16; the mean's own peak is 1.62


def test_class_batches_label_each_example_by_its_class():
    examples = torch.arange(3 * 4, dtype=torch.float32).view(3, 4, 1)  # value = 4 * class + d
    x, y = ClassBatches(examples).sample(50, torch.Generator().manual_seed(0))
    assert x.shape == (50, 1) and y.dtype == torch.long
    assert torch.equal(x.view(-1).long() // 4, y)


def test_pretrain_resumes_exactly():
    examples = torch.randn(6, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(0)
        pre = Pretrained(conv_net(classes=6).float(), loss="cross_entropy")
        return pre, torch.optim.Adam(pre.parameters(), lr=1e-2)

    run = dict(batch_size=8, progress=False, log_every=1)
    straight, opt = fresh()
    h_straight = pretrain(
        straight, examples, opt, iterations=6, generator=torch.Generator().manual_seed(1), **run
    )
    split, opt = fresh()
    gen = torch.Generator().manual_seed(1)
    history = pretrain(split, examples, opt, iterations=3, generator=gen, **run)
    state = (snapshot(split), opt.state_dict(), gen.get_state())
    split, opt = fresh()  # as a resumed process would rebuild everything
    split.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    gen = torch.Generator()
    gen.set_state(state[2])
    history = pretrain(
        split, examples, opt, iterations=6, generator=gen, start_step=3, history=history, **run
    )
    for key, value in straight.state_dict().items():
        assert torch.equal(value, split.state_dict()[key]), key
    assert history.meta_loss == h_straight.meta_loss and history.step == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(inner_steps=0), ValueError, r"inner_steps: expected a positive int, received 0"),
        (dict(inner_lr=float("nan")), ValueError, r"inner_lr: expected a finite number >= 0"),
        (dict(inner_lr=-1.0), ValueError, r"inner_lr: expected a finite number >= 0"),
        (dict(loss="hinge"), ValueError, r"loss: expected one of \('mse', 'cross_entropy'\)"),
        (dict(adapt_layers="last"), ValueError, r"adapt_layers: expected one of \(None, 'head'\)"),
        (dict(head="five"), TypeError, r"head: expected None, an int \(n_way\) or a factory"),
        (dict(head=0), ValueError, r"head: expected a positive int, received 0"),
        (
            dict(head=lambda f: nn.Conv1d(f, 3, 1)),
            TypeError,
            r"head: expected the factory to return an nn.Linear, received Conv1d",
        ),
        (
            dict(head=lambda f: nn.Linear(f + 1, 3)),
            ValueError,
            r"head: expected an nn.Linear with in_features=8 .* received in_features=9",
        ),
        (dict(vectorize="yes"), ValueError, r"vectorize: expected one of"),
    ],
)
def test_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Pretrained(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)), **kwargs)


def test_constructor_rejects_non_modules_and_headless_models():
    with pytest.raises(TypeError, match=r"model: expected an nn.Module, received function"):
        Pretrained(lambda x: x)
    with pytest.raises(ValueError, match=r"model: head needs an nn.Linear \(the head\)"):
        Pretrained(nn.Conv1d(1, 2, 1), head=3)
    with pytest.raises(ValueError, match=r"model: adapt_layers='head' needs an nn.Linear"):
        Pretrained(nn.Conv1d(1, 2, 1), adapt_layers="head")


def test_pretrain_loss_rejects():
    reg = Pretrained(nn.Linear(2, 1))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, received list"):
        reg.pretrain_loss([[1.0, 2.0]], torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"y: expected 4 examples like x .* received 3"):
        reg.pretrain_loss(torch.randn(4, 2), torch.randn(3, 1))
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        reg.pretrain_loss(torch.ones(4, 2, dtype=torch.long), torch.randn(4, 1))
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 like the model's"):
        reg.pretrain_loss(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1))
    with pytest.raises(
        ValueError,
        match=r"y: mse expects the model's output shape \(4, 1\), received \(4,\)",
    ):
        reg.pretrain_loss(torch.randn(4, 2), torch.randn(4))
    with pytest.raises(ValueError, match=r"x: expected finite values"):
        reg.pretrain_loss(torch.full((4, 2), float("nan")), torch.randn(4, 1))
    with pytest.raises(TypeError, match=r"y: expected None when x is a TaskBatch"):
        reg.pretrain_loss(regression_tasks().to(dtype=torch.float32), torch.zeros(1))
    clf = Pretrained(nn.Linear(2, 3), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"y: expected class indices in \[0, 3\) .* \[0, 5\]"):
        clf.pretrain_loss(torch.randn(4, 2), torch.tensor([0, 1, 2, 5]))
    with pytest.raises(TypeError, match=r"y: cross_entropy expects int64 class indices"):
        clf.pretrain_loss(torch.randn(4, 2), torch.zeros(4))


def test_adapt_rejects():
    pre = Pretrained(nn.Linear(2, 3), loss="cross_entropy", adapt_layers="head", head=2)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"steps: expected a positive int, received 0"):
        pre.adapt(x, y, steps=0)
    with pytest.raises(
        ValueError,
        match=r"support_y: expected class indices in \[0, 2\) "
        r"\(2 classes: the new head\), received values in \[0, 2\]",
    ):
        pre.adapt(x, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(TypeError, match=r"support_x: expected dtype torch.float32"):
        pre.adapt(x.double(), y)
    with pytest.raises(ValueError, match=r"support_x: expected a non-empty set"):
        pre.adapt(torch.randn(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match=r"support_y: expected a torch.Tensor, received list"):
        pre.adapt(x, [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"x: expected 1 tasks in dimension 0"):
        pre.adapt(x.unsqueeze(0), y.unsqueeze(0), batched=True)(torch.randn(2, 3, 2))


def test_pretrain_rejects():
    examples = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"model: expected loss 'cross_entropy' .* received 'mse'"):
        pretrain(
            Pretrained(nn.Linear(4, 3)),
            examples,
            None,
            iterations=1,
            batch_size=2,
            generator=torch.Generator(),
        )
    with pytest.raises(TypeError, match=r"model: expected a pymeta.baselines.Pretrained"):
        pretrain(
            nn.Linear(4, 3), examples, None, iterations=1, batch_size=2, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match=r"examples: expected at least 3 dimensions"):
        ClassBatches(torch.randn(3, 4))


# ---------------------------------------------------------------------------- command line
COMMON = (
    "--hidden 4 --image-size 16 --n-way 2 --k-query 2 --batch-size 8 --val-every 2 "
    "--val-tasks 3 --test-tasks 6 --test-query 2 --log-every 1 --no-progress --inner-steps 5"
).split()


def run_cli(command, root, cache, checkpoint, *extra):
    args = [command, "omniglot", "--root", str(root), "--cache-dir", str(cache)]
    return main(args + ["--checkpoint", str(checkpoint), *extra])


def train_pretrained(root, cache, checkpoint, iterations, *extra):
    return run_cli(
        "train",
        root,
        cache,
        checkpoint,
        "--variant",
        "pretrained",
        "--iterations",
        str(iterations),
        *COMMON,
        *extra,
    )


def test_cli_pretrained_variant_trains_reports_and_evaluates(tiny_root, tmp_path, capsys):
    cache, ckpt, png = tmp_path / "cache", tmp_path / "pre.pt", tmp_path / "curves.png"
    assert train_pretrained(tiny_root, cache, ckpt, 4, "--plot", str(png)) == 0
    out = capsys.readouterr().out
    report = (
        r"test: 2-way 1-shot, 6 tasks of held-out characters, 2 queries per class, "
        r"5 adaptation step\(s\): "
        r"accuracy \d+\.\d\d% ± \d+\.\d\d% \(95% CI\)"
    )
    assert "validation accuracy" in out and "trained 4 steps" in out
    assert len(re.findall(report, out)) == 1
    blob = torch.load(ckpt, weights_only=True)
    # conv4 with one logit per training class (characters x 4 rotations).
    ds = pymeta.datasets.Omniglot(tiny_root, image_size=16, cache_dir=cache)
    classes = ds.split("train", rotations=True).shape[0]
    assert blob["config"]["classes"] == classes == 4 * len(ds.split_names("train"))
    assert blob["maml"]["module.17.weight"].shape == (classes, 4)
    assert png.stat().st_size > 1000
    eval_args = ["--test-tasks", "6", "--test-query", "2", "--eval-steps", "3"]
    assert run_cli("eval", tiny_root, cache, ckpt, *eval_args) == 0
    out = capsys.readouterr().out
    assert "step 4, conv4, pretrained baseline" in out and "3 adaptation step(s)" in out


def test_cli_pretrained_resumes_exactly(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    train_pretrained(tiny_root, cache, straight, 6, "--checkpoint-every", "3")
    train_pretrained(tiny_root, cache, split, 3, "--checkpoint-every", "3")
    train_pretrained(tiny_root, cache, split, 6, "--checkpoint-every", "3", "--resume")
    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    assert a["step"] == b["step"] == 6
    for key, value in a["maml"].items():
        assert torch.equal(value, b["maml"][key]), key
    assert a["history"]["meta_loss"] == b["history"]["meta_loss"]
    with pytest.raises(SystemExit, match=r"--resume: .* other settings: \['batch_size'\]"):
        train_pretrained(tiny_root, cache, split, 8, "--resume", "--batch-size", "4")


def test_cli_baseline_and_maml_are_tested_on_the_same_tasks(tiny_root, tmp_path, monkeypatch):
    import pymeta.evaluation

    original, seen = pymeta.evaluation.few_shot_accuracy, []

    def spy(model, tasks, num_tasks, steps=None, batch_size=50, seed=0):
        seen.append(
            (type(model).__name__, tasks.examples, tasks.k_shot, tasks.k_query, num_tasks, seed)
        )
        return original(model, tasks, num_tasks, steps=steps, batch_size=batch_size, seed=seed)

    monkeypatch.setattr(pymeta.evaluation, "few_shot_accuracy", spy)
    cache = tmp_path / "cache"
    quiet = ["--val-every", "0", "--test-tasks", "6", "--test-query", "2", "--no-progress"]
    train_pretrained(tiny_root, cache, tmp_path / "pre.pt", 2, *quiet)
    maml_args = ["--iterations", "2", "--hidden", "4", "--image-size", "16", "--n-way", "2"]
    # MAML trains with 1 query example per class, and is tested like the baseline, with 2.
    run_cli("train", tiny_root, cache, tmp_path / "maml.pt", *maml_args, "--k-query", "1", *quiet)
    tests = [call for call in seen if call[4] == 6]  # the final test-set reports
    assert [call[0] for call in tests] == ["Pretrained", "MAML"]
    (_, a, *rest_a), (_, b, *rest_b) = tests
    assert torch.equal(a, b) and rest_a == rest_b and rest_a[1] == 2
    pre = torch.load(tmp_path / "pre.pt", weights_only=True)["config"]
    maml = torch.load(tmp_path / "maml.pt", weights_only=True)["config"]
    assert (maml["inner_lr"], maml["inner_steps"]) == (0.4, 1) and "batch_size" not in maml
    assert pre["inner_lr"] == 0.05 and "meta_batch" not in pre


def test_adapting_on_classes_beyond_the_models_outputs_names_support_y():
    # Without a fresh head the model's own outputs are the classes: the error names the
    # argument (it said "targets").
    pre = Pretrained(nn.Sequential(nn.Linear(4, 3)), loss="cross_entropy", inner_lr=0.1)
    x, y = torch.randn(2, 5, 4), torch.tensor([[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match=r"support_y: expected class indices in \[0, 3\)"):
        pre.adapt(x, y)
