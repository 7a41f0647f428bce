"""The sinusoid demo: a short MAML meta-training run that shows adaptation working."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pymeta.maml import MAML
from pymeta.tasks import Sinusoid


def sinusoid_mlp() -> nn.Module:
    """The MAML paper's regression network: 1-40-40-1 with ReLU."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


@torch.no_grad()
def evaluate(
    maml: MAML, tasks: Sinusoid, num_tasks: int, steps: tuple[int, ...], seed: int
) -> dict:
    """Query MSE before adaptation and after each number of inner steps, on fresh tasks."""
    batch = tasks.sample(num_tasks, torch.Generator().manual_seed(seed))
    result = {0: F.mse_loss(maml(batch.query_x), batch.query_y).item()}
    for s in steps:
        result[s] = F.mse_loss(
            maml.adapt(batch.support_x, batch.support_y, steps=s)(batch.query_x), batch.query_y
        ).item()
    return result


def plain_loop_meta_loss(model: nn.Module, batch, lr: float) -> torch.Tensor:
    """MAML as a user writes it by hand: per task, one inner step by autograd with
    create_graph=True (second order), then the query loss; the mean over tasks."""
    names, params = zip(*model.named_parameters())
    losses = []
    for t in range(batch.num_tasks):
        out = torch.func.functional_call(model, dict(zip(names, params)), (batch.support_x[t],))
        grads = torch.autograd.grad(F.mse_loss(out, batch.support_y[t]), params, create_graph=True)
        adapted = {n: p - lr * g for n, p, g in zip(names, params, grads)}
        query = torch.func.functional_call(model, adapted, (batch.query_x[t],))
        losses.append(F.mse_loss(query, batch.query_y[t]))
    return torch.stack(losses).mean()


def run_demo(
    iterations: int = 3000, meta_batch: int = 25, seed: int = 0, progress: bool = True
) -> dict:
    """Meta-trains the same sinusoid network (paper settings, fewer iterations) with both
    variants, prints their meta-step times beside a plain autograd loop's, and the query MSE
    before and after adaptation."""
    from pymeta.model_aware import ModelAwareMAML

    tasks = Sinusoid(k_support=10, k_query=10)
    torch.manual_seed(seed)
    init = sinusoid_mlp()
    start = evaluate(MAML(init, inner_lr=0.01), tasks, 500, (1, 10), seed + 1)

    def copy_of_init() -> nn.Module:
        model = sinusoid_mlp()
        model.load_state_dict(init.state_dict())
        return model

    # The plain loop is only timed (a few steps): training it would take the longest.
    loop_model = copy_of_init()
    loop_opt = torch.optim.Adam(loop_model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    timed = min(iterations, 20)
    for i in range(timed + 2):  # 2 warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        loop_opt.zero_grad(set_to_none=True)
        plain_loop_meta_loss(loop_model, tasks.sample(meta_batch, gen), 0.01).backward()
        loop_opt.step()
    loop_ms = 1e3 * (time.perf_counter() - t0) / timed

    results = {}
    for name in ("pymeta.MAML", "pymeta.ModelAwareMAML"):
        if name == "pymeta.MAML":
            learner = MAML(copy_of_init(), inner_lr=0.01, inner_steps=1, loss="mse")
            opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

            def step(batch, learner=learner, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = learner.meta_loss(batch)
                loss.backward()
                opt.step()
                return loss
        else:
            learner = ModelAwareMAML(copy_of_init(), inner_lr=0.01, inner_steps=1, loss="mse")
            step = learner.compile_step(torch.optim.Adam(learner.parameters(), lr=1e-3))
        gen = torch.Generator().manual_seed(seed)  # both see the same tasks
        bar = tqdm(range(iterations), desc=name, disable=not progress, mininterval=0.5)
        running = None
        t0 = time.perf_counter()
        for it in bar:
            value = step(tasks.sample(meta_batch, gen)).item()
            running = value if running is None else 0.98 * running + 0.02 * value
            if it % 50 == 0:
                bar.set_postfix(meta_loss=f"{running:.3f}", refresh=False)
        elapsed = time.perf_counter() - t0
        results[name] = {
            "seconds": elapsed,
            "ms_per_step": 1e3 * elapsed / iterations,
            "mse": evaluate(learner, tasks, 500, (1, 10), seed + 1),
        }
    print(
        f"meta-training step (sinusoid 1-40-40-1, {meta_batch} tasks, 1 inner step, second "
        f"order, Adam; {torch.get_num_threads()} thread(s)):"
    )
    print(f"  {'plain autograd loop (per task)':<48} {loop_ms:>8.2f} ms   1.0x")
    for name, r in results.items():
        label = name + (" (one call: compile_step)" if "Aware" in name else "")
        print(f"  {label:<48} {r['ms_per_step']:>8.2f} ms {loop_ms / r['ms_per_step']:>5.1f}x")
    print(f"meta-trained {iterations} iterations with each variant")
    print("query MSE on 500 new tasks (K=10)   before adapting   after 1 step   after 10 steps")
    rows = [("untrained init", start)]
    rows += [(f"meta-learned, {n}", r["mse"]) for n, r in results.items()]
    for name, r in rows:
        print(f"  {name:<37} {r[0]:>11.3f} {r[1]:>14.3f} {r[10]:>16.3f}")
    return {"before_training": start, "plain_loop_ms_per_step": loop_ms, **results}
