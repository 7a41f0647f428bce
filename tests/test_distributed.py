"""Meta-training on several processes (pymeta.distributed): 2 ranks with gloo on 127.0.0.1 must
give exactly what one process gives with the whole meta-batch (float64), for both variants, the
baseline's pretraining, uneven splits, learned rates and per-step batch norm statistics; a rank
that dies makes the other fail with an error, not hang."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pymeta
from pymeta.distributed import DistributedMeta, shard, shard_tasks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is absent")
STEPS = 3  # optimizer steps compared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlp():
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def conv_bn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 3),
    )  # fmt: skip


def make_learner(case: str) -> tuple[nn.Module, object]:
    """(learner, task sampler) of one case, float64, seeded."""
    torch.manual_seed(0)
    if case.startswith("sinusoid"):
        tasks = pymeta.tasks.Sinusoid(k_support=5, k_query=5, dtype=torch.float64)
    else:
        images = torch.randn(6, 8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        tasks = pymeta.tasks.FewShot(images.double(), n_way=3, k_shot=1, k_query=2)
    if case == "sinusoid-maml":
        learner = pymeta.MAML(mlp().double(), inner_lr=0.05, inner_steps=2, learn_inner_lr=True)
    elif case == "sinusoid-aware":
        learner = pymeta.ModelAwareMAML(
            mlp().double(), inner_lr=0.05, inner_steps=2, lr_mode="per_parameter",
            learn_inner_lr=True,
        )  # fmt: skip
    elif case == "sinusoid-pretrained":
        learner = pymeta.baselines.Pretrained(mlp().double(), loss="mse")
    elif case == "conv-maml":
        learner = pymeta.MAML(conv_bn().double(), inner_lr=0.1, loss="cross_entropy")
    elif case == "conv-aware":
        learner = pymeta.ModelAwareMAML(
            conv_bn().double(), inner_lr=0.1, inner_steps=2, loss="cross_entropy",
            lr_mode="per_layer_step", learn_inner_lr=True, multi_step_loss=True,
            per_step_bn=True, track_bn_stats=True,
        )  # fmt: skip
    else:
        raise KeyError(case)
    return learner, tasks


def train(case: str, meta_batch: int, shard_arg=None, wrap=False) -> dict:
    """STEPS optimizer steps; returns the losses, the last gradients and the final state."""
    learner, tasks = make_learner(case)
    model = DistributedMeta(learner) if wrap else learner
    # SGD with momentum: linear in the gradients, so rounding stays rounding (Adam divides the
    # rounding noise of a zero gradient, a conv bias before batch norm, by its own size).
    opt = torch.optim.SGD(learner.parameters(), lr=1e-2, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    pretrain = case.endswith("pretrained")
    losses, grads = [], []
    for _ in range(STEPS):
        batch = tasks.sample(meta_batch, gen, shard=shard_arg)
        opt.zero_grad()
        loss = model.pretrain_loss(batch) if pretrain else model.meta_loss(batch)
        loss.backward()
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in learner.parameters()
        ]
        opt.step()
        losses.append(loss.detach())
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    return {"losses": torch.stack(losses), "grads": grads, "state": state}


def accuracy() -> tuple[float, float]:
    """Few-shot accuracy and CI of the conv learner on 7 tasks in batches of 3 (the last batch
    of 1 is not split over 2 ranks)."""
    from pymeta.evaluation import few_shot_accuracy

    learner, tasks = make_learner("conv-aware")
    return few_shot_accuracy(learner, tasks, 7, batch_size=3, seed=2)


def _worker(rank: int, world: int, port: int, out: str, job: str, args: tuple) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        if job == "train":
            case, meta_batch = args
            result = train(case, meta_batch, shard_arg=shard(), wrap=True)
        elif job == "one_rank":
            result = one_rank()
        elif job == "accuracy":
            result = {"accuracy": accuracy()}
        elif job == "die":
            learner, tasks = make_learner("sinusoid-maml")
            model = DistributedMeta(learner)
            if rank == 1:
                os._exit(3)  # a rank that dies before the all-reduce
            start = time.perf_counter()
            try:
                model.meta_loss(tasks.sample(4, torch.Generator().manual_seed(0), shard=shard()))
                result = {"error": None}
            except Exception as error:  # noqa: BLE001 - the error is the result
                result = {"error": f"{type(error).__name__}: {error}"}
            result["seconds"] = time.perf_counter() - start
        torch.save(result, f"{out}.{rank}")
    finally:
        if dist.is_initialized() and job != "die":
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()
    # The result is on disk: leave without the interpreter's teardown, where torch's gloo
    # threads can still abort a finished process (SIGABRT, "terminate called without an active
    # exception"; seen once in .ci/run, on a rank that had written a correct result). An error
    # above propagates instead, with its traceback and a non-zero exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(tmp_path, job: str, args: tuple, world: int = 2, join_timeout: float = 120.0):
    """Runs _worker on `world` spawned processes (plain processes: torch's spawn helper would
    kill the others when one exits, and the dying-rank test needs them to go on); returns
    their results (None for a rank that wrote none)."""
    out = str(tmp_path / "result")
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, out, job, args)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + join_timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"{job}: ranks {hung} still running after {join_timeout} s (a hang)"
    if job != "die":
        assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]
    results = []
    for r in range(world):
        path = f"{out}.{r}"
        results.append(torch.load(path, weights_only=True) if os.path.exists(path) else None)
    return results


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


CASES = ["sinusoid-maml", "sinusoid-aware", "sinusoid-pretrained", "conv-maml", "conv-aware"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("meta_batch", [4, 5])  # 5 tasks over 2 ranks: 3 and 2
def test_two_ranks_equal_one_process(tmp_path, case, meta_batch):
    want = train(case, meta_batch)
    got = run_ranks(tmp_path, "train", (case, meta_batch))
    for rank, result in enumerate(got):
        assert result is not None, f"rank {rank} wrote no result"
        assert rel(result["losses"], want["losses"]) < 1e-12, rank
        scale = max(float(g.abs().max()) for g in want["grads"])
        assert scale > 0
        for g, w in zip(result["grads"], want["grads"]):
            assert float((g - w).abs().max()) <= 1e-12 * scale, rank
        assert result["state"].keys() == want["state"].keys()
        for k, v in want["state"].items():
            if v.is_floating_point():
                assert rel(result["state"][k], v) < 1e-11, (rank, k)
            else:
                assert torch.equal(result["state"][k], v), (rank, k)
    if case == "conv-aware":  # the running statistics moved, and agree
        assert int(want["state"]["bn_running_stats.num_batches_tracked"]) == STEPS


def test_a_rank_that_dies_makes_the_other_fail_not_hang(tmp_path):
    results = run_ranks(tmp_path, "die", (), join_timeout=90)
    survivor = results[0]
    assert survivor is not None, "rank 0 wrote no result"
    assert survivor["error"] is not None, "rank 0's all-reduce succeeded without its peer"
    assert survivor["seconds"] < 60, survivor


def test_shard_splits_without_overlap_or_repeats():
    for n in (1, 2, 5, 9, 32):
        for size in (1, 2, 3, 4):
            parts = [shard(n, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match=r"shard: 1 tasks leave rank 1 of 2 without one"):
        shard_tasks(1, (1, 2))
    with pytest.raises(ValueError, match=r"shard: expected \(rank, size\)"):
        shard_tasks(4, (2, 2))


@pytest.mark.parametrize("sampler", ["sinusoid", "few_shot"])
def test_sampler_shards_are_the_single_process_tasks(sampler):
    _, tasks = make_learner("sinusoid-maml" if sampler == "sinusoid" else "conv-maml")
    whole = tasks.sample(7, torch.Generator().manual_seed(3))
    for size in (2, 3):
        parts = [
            tasks.sample(7, torch.Generator().manual_seed(3), shard=(r, size)) for r in range(size)
        ]
        for name in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name))


def test_the_dataloader_path_splits_with_a_shard_sampler():
    """FewShot's items are seeded by index: a DataLoader over each rank's shard of the indices
    gives the single process's tasks, once each."""
    _, tasks = make_learner("conv-maml")
    loader = lambda idx: torch.utils.data.DataLoader(  # noqa: E731
        tasks, batch_size=3, sampler=idx, collate_fn=pymeta.tasks.FewShot.collate
    )
    whole = torch.cat([b.support_x for b in loader(list(range(len(tasks))))])
    parts = [
        torch.cat([b.support_x for b in loader(list(shard(len(tasks), r, 2)))]) for r in range(2)
    ]
    assert torch.equal(torch.cat(parts), whole)


def one_rank() -> dict:
    """In a group of one: the wrapper's loss and gradients against the learner's own, and the
    error for a batch that is not a TaskBatch."""
    learner, tasks = make_learner("conv-aware")
    model = DistributedMeta(learner)
    batch = tasks.sample(3, torch.Generator().manual_seed(0))
    loss = model.meta_loss(batch)
    loss.backward()
    got = [p.grad.clone() for p in learner.parameters() if p.grad is not None]
    learner.zero_grad()
    want_loss = learner.meta_loss(batch)
    want_loss.backward()
    want = [p.grad.clone() for p in learner.parameters() if p.grad is not None]
    try:
        model.meta_loss((batch.support_x, batch.support_y))
        error = None
    except TypeError as err:
        error = str(err)
    return {"loss": [loss.detach(), want_loss.detach()], "grads": [got, want], "error": error}


def test_distributed_meta_with_one_rank_equals_the_learner_and_names_a_bad_batch(tmp_path):
    (result,) = run_ranks(tmp_path, "one_rank", (), world=1)
    assert rel(*result["loss"]) < 1e-14
    got, want = result["grads"]
    assert len(got) == len(want) > 0
    assert all(rel(g, w) < 1e-14 for g, w in zip(got, want))
    assert result["error"] == "batch: expected a TaskBatch, received tuple"


def test_distributed_meta_needs_an_initialised_process_group():
    learner, _ = make_learner("sinusoid-maml")
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialised"):
        DistributedMeta(learner)


# ----------------------------------------------------------------------------- the CLI
CLI = "--meta-batch 5 --test-tasks 20 --query-points 20 --log-every 1 --no-progress".split()


def cli(ranks: int, checkpoint, iterations: int, *extra: str, benchmark="sinusoid") -> str:
    """`python -m pymeta train <benchmark> ...` on `ranks` processes (torchrun for more than
    one); returns its stdout."""
    import subprocess
    import sys

    argv = ["train", benchmark, "--checkpoint", str(checkpoint), "--iterations", str(iterations)]
    argv += [*(CLI if benchmark == "sinusoid" else []), *extra]
    if ranks == 1:
        cmd = [sys.executable, "-m", "pymeta", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "pymeta", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def model_state(path, benchmark="sinusoid") -> dict:
    from pymeta.checkpoints import load_checkpoint

    return load_checkpoint(path, benchmark)["maml"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # float32, and two ranks sum their halves in another order than one process
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("variant", ["agnostic", "aware", "pretrained"])
def test_cli_under_two_ranks_and_resumed_under_one_equals_one_process(tmp_path, variant):
    one = tmp_path / "one.pt"
    out = cli(1, one, 6, "--variant", variant)
    two = tmp_path / "two.pt"
    out_two = cli(2, two, 6, "--variant", variant)
    assert_same_state(model_state(two), model_state(one))
    assert out_two.count("trained 6 ") == 1  # rank 0 alone prints
    # 2 ranks for 3 steps, then resumed under 1 rank to 6; and the reverse.
    mixed = tmp_path / "mixed.pt"
    cli(2, mixed, 3, "--variant", variant)
    cli(1, mixed, 6, "--variant", variant, "--resume")
    assert_same_state(model_state(mixed), model_state(one))
    reverse = tmp_path / "reverse.pt"
    cli(1, reverse, 3, "--variant", variant)
    cli(2, reverse, 6, "--variant", variant, "--resume")
    assert_same_state(model_state(reverse), model_state(one))
    assert "test:" in out and "test:" in out_two


def test_evaluation_split_over_ranks_equals_one_process(tmp_path):
    want = accuracy()
    for result in run_ranks(tmp_path, "accuracy", ()):
        assert result is not None
        assert result["accuracy"] == want


def test_omniglot_cli_under_two_ranks_equals_one_process(tiny_root, tmp_path):
    """Meta-training with validation split over the ranks, then the test accuracy, split too."""
    args = ["--root", str(tiny_root), "--cache-dir", str(tmp_path / "cache"), "--hidden", "4",
            "--image-size", "16", "--n-way", "2", "--k-query", "2", "--meta-batch", "3",
            "--val-every", "2", "--val-tasks", "5", "--test-tasks", "6", "--test-query", "2",
            "--log-every", "1", "--no-progress", "--variant", "aware"]  # fmt: skip
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    out_one = cli(1, one, 4, *args, benchmark="omniglot")
    out_two = cli(2, two, 4, *args, benchmark="omniglot")
    # conv4's convolution biases feed batch norm: their exact gradient is 0, and Adam turns the
    # rounding noise of each run into steps of its own; every other parameter must agree.
    conv = pymeta.models.conv4(2, hidden=4, image_size=16)
    noise = {f"module.{n}.bias" for n, m in conv.named_modules() if isinstance(m, nn.Conv2d)}
    a, b = model_state(two, "omniglot"), model_state(one, "omniglot")
    assert noise and noise <= a.keys()
    assert_same_state({k: v for k, v in a.items() if k not in noise},
                      {k: v for k, v in b.items() if k not in noise})  # fmt: skip
    test_line = lambda out: [line for line in out.splitlines() if line.startswith("test:")]  # noqa: E731
    assert test_line(out_two) == test_line(out_one) and len(test_line(out_one)) == 1
