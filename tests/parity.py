"""Ground truth for the parity tests: a plain per-task autograd MAML and a relative error."""

import torch
import torch.nn.functional as F
from torch.func import functional_call


def reference_meta_loss(model, batch, lrs, steps, first_order, loss_fn):
    """Mean query loss over tasks; lrs: one shared scalar tensor or one tensor per parameter
    (in named_parameters order). Gradients flow to the model's parameters and to lrs."""
    names = [n for n, _ in model.named_parameters()]
    losses = []
    for t in range(batch.num_tasks):
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = loss_fn(
                functional_call(model, params, (batch.support_x[t],)), batch.support_y[t]
            )
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {
                n: params[n]
                - (lrs[0] if len(lrs) == 1 else lrs[i]) * (g.detach() if first_order else g)
                for i, (n, g) in enumerate(zip(names, grads))
            }
        losses.append(
            loss_fn(functional_call(model, params, (batch.query_x[t],)), batch.query_y[t])
        )
    return torch.stack(losses).mean()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): the relative error used by the parity tests."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale)


def sinusoid_mse_before_after(maml, iterations=1500):
    """Meta-trains on sinusoids (Adam 1e-3, 25 tasks a step), then returns the query MSE on 200
    new tasks before adapting and after 10 adaptation steps."""
    import pymeta

    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    tasks = pymeta.tasks.Sinusoid(k_support=10, k_query=10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        opt.zero_grad()
        maml.meta_loss(tasks.sample(25, gen)).backward()
        opt.step()
    test = tasks.sample(200, torch.Generator().manual_seed(123))
    before = F.mse_loss(maml(test.query_x), test.query_y).item()
    adapted = maml.adapt(test.support_x, test.support_y, steps=10)
    after = F.mse_loss(adapted(test.query_x), test.query_y).item()
    return before, after
