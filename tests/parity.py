"""Ground truth for the parity tests: a plain per-task autograd MAML and a relative error."""

import torch
import torch.nn.functional as F
from torch.func import functional_call


def reference_meta_loss(model, batch, lrs, steps, first_order, loss_fn, forward=None):
    """Mean query loss over tasks; lrs: one shared scalar tensor or one tensor per parameter
    (in named_parameters order). Gradients flow to the model's parameters and to lrs.

    ``forward(params, x)`` runs the network with a dict of parameters (named_parameters names);
    the default is ``functional_call``. Tests of shared modules pass a hand-written one, so that
    the reference does not depend on how functional_call treats them."""
    names = [n for n, _ in model.named_parameters()]
    if forward is None:
        forward = lambda params, x: functional_call(model, params, (x,))  # noqa: E731
    losses = []
    for t in range(batch.num_tasks):
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = loss_fn(forward(params, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {
                n: params[n]
                - (lrs[0] if len(lrs) == 1 else lrs[i]) * (g.detach() if first_order else g)
                for i, (n, g) in enumerate(zip(names, grads))
            }
        losses.append(loss_fn(forward(params, batch.query_x[t]), batch.query_y[t]))
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


def reference_loss(maml, batch, lr_of, loss_fn):
    """Plain per-task autograd MAML with a per-(step, param) learning rate, frozen layers,
    weighted multi-step query losses and per-step batch norm weights: the ground truth for the
    options of a pymeta.ModelAwareMAML."""
    model = maml.module
    adapted_names = {
        name
        for layer, adapted in zip(maml._param_layers(), maml.adapted)
        if adapted
        for name in (layer.weight_name, layer.bias_name)
        if name
    }

    def at_step(params, j):  # per-step batch norm: row j at inner step j
        rows = {n: maml.bn_steps[i][j] for n, i in maml._step_bn_index.items()}
        return {**params, **rows}

    total = 0
    for t in range(batch.num_tasks):
        params = dict(model.named_parameters())
        for j in range(maml.inner_steps):
            names = [n for n in params if n in adapted_names]
            loss = loss_fn(
                functional_call(model, at_step(params, j), (batch.support_x[t],)),
                batch.support_y[t],
            )
            grads = torch.autograd.grad(
                loss, [params[n] for n in names], create_graph=not maml.first_order
            )
            for n, g in zip(names, grads):
                params[n] = params[n] - lr_of(j, n) * (g.detach() if maml.first_order else g)
            w = maml.step_weights[j]
            if w:
                total = total + w * loss_fn(
                    functional_call(model, at_step(params, j + 1), (batch.query_x[t],)),
                    batch.query_y[t],
                )
    return total / batch.num_tasks


def lr_lookup(maml):
    """lr_of(step, param name) for the maml's lr_mode."""
    lrs = maml.inner_lrs()
    index, k, layer_of = {}, 0, {}
    layers = maml._param_layers()
    for i, (layer, adapted) in enumerate(zip(layers, maml.adapted)):
        if not adapted:
            continue
        for name in (layer.weight_name, layer.bias_name):
            if name:
                index[name] = k
                layer_of[name] = sum(maml.adapted[:i])
                k += 1
    if maml.lr_mode == "scalar":
        return lambda j, n: lrs[0]
    if maml.lr_mode == "per_layer_step":
        return lambda j, n: lrs[0][j, layer_of[n]]
    return lambda j, n: lrs[index[n]]


def randomize_lrs(maml, seed=0, low=0.02, width=0.1):
    """Fills every inner rate of a ModelAwareMAML with distinct values in [low, low + width)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lr in maml.inner_lrs():
            lr.copy_(low + width * torch.rand(lr.shape, generator=g, dtype=lr.dtype))
