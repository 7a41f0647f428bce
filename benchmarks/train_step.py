"""One full meta-training step on small networks (zero_grad, meta-loss, backward, Adam), the
way the peers' benchmark times it: ModelAwareMAML unfused and as one call
(``maml.compile_step(optimizer)``), pymeta.MAML, a torch.func vmap MAML, and, when JAX is
installed, JAX jit + vmap with optax Adam (one XLA thread), all in this one process on the same
data.

Usage::

    .venv/bin/python benchmarks/train_step.py [--threads 1] [--repeats 21]
        [--workloads sinusoid sinusoid-5 mlp-128]

Workloads, second order, Adam lr 1e-3:
- sinusoid: MLP 1-40-40-1 (ReLU), 25 tasks, 10 support and 10 query points, 1 inner step,
  lr 0.01, MSE;
- sinusoid-5: the same with 5 inner steps;
- mlp-128: the tutorial's classifier, MLP 10-128-10 (ReLU), 16 tasks, 25 support and 25 query
  examples of 10 classes, 5 inner steps, lr 0.1, cross-entropy.

``core_op_only`` is not a step: it times the compiled core's op alone (meta-loss and
meta-gradient, no checks, no update) on the same batch, to show its share of the one call;
``checks_only`` (the batch and model checks before the op) and ``outer_update_only`` (the Adam
op after it) time the rest of the one call, part by part.
Times are medians of rotated rounds (harness.rotated_timings, samples >= 50 ms); "x vs jax" is
JAX's time over the implementation's. JAX runs with ``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` (set before it is imported) when --threads is 1.
"""

from __future__ import annotations

import argparse
import os
import sys

WORKLOADS = {
    # name: (sizes, tasks, k_support, k_query, inner steps, inner lr, loss)
    "sinusoid": ((1, 40, 40, 1), 25, 10, 10, 1, 0.01, "mse"),
    "sinusoid-5": ((1, 40, 40, 1), 25, 10, 10, 5, 0.01, "mse"),
    "mlp-128": ((10, 128, 10), 16, 25, 25, 5, 0.1, "cross_entropy"),
}


def make_data(name: str):
    """numpy arrays (sx, sy, qx, qy): inputs (T, K, in), targets (T, K, out) or (T, K) classes."""
    import numpy as np

    sizes, tasks, ks, kq, _, _, loss = WORKLOADS[name]
    rng = np.random.default_rng(0)
    if loss == "mse":
        amp = rng.uniform(0.1, 5.0, (tasks, 1, 1))
        phase = rng.uniform(0, np.pi, (tasks, 1, 1))
        x = rng.uniform(-5, 5, (tasks, ks + kq, 1))
        y = amp * np.sin(x - phase)
    else:
        x = rng.standard_normal((tasks, ks + kq, sizes[0]))
        y = rng.integers(0, sizes[-1], (tasks, ks + kq))
    x = x.astype(np.float32)
    y = y.astype(np.float32) if loss == "mse" else y.astype(np.int64)
    return x[:, :ks], y[:, :ks], x[:, ks:], y[:, ks:]


def torch_steps(name: str) -> dict:
    """name -> a callable running one full meta-training step, for each PyTorch implementation."""
    import torch
    from baselines import TorchFuncMAML
    from torch import nn

    import pymeta

    sizes, _, _, _, steps, lr, loss = WORKLOADS[name]
    batch = pymeta.TaskBatch(*(torch.from_numpy(a) for a in make_data(name)))

    def mlp():
        torch.manual_seed(0)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def unfused(learner):
        params = learner.model.parameters() if hasattr(learner, "model") else learner.parameters()
        opt = torch.optim.Adam(params, lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            learner.meta_loss(batch).backward()
            opt.step()

        return step

    def core_only(learner, batch):
        args = learner._core_args(*learner._checked_batch(batch))

        def call():
            with torch.no_grad():
                torch.ops.pymeta.net_maml_loss(*args, True, False)

        return call

    def checks_only(learner, batch):
        def call():
            learner._core_args(*learner._checked_batch(batch))

        return call

    def update_only(learner, batch):
        # The one call's outer update alone (Adam on every parameter), on a learner of its own
        # so that the other rows' parameters do not move.
        step = learner.compile_step(torch.optim.Adam(learner.parameters(), lr=1e-3))
        params = list(learner.parameters())
        with torch.no_grad():
            args = learner._core_args(*learner._checked_batch(batch))
            grads = list(torch.ops.pymeta.net_maml_loss(*args, True, False)[1])

        def call():
            with torch.no_grad():
                step._update(step.optimizer.param_groups[0], params, grads)

        return call

    kwargs = dict(inner_lr=lr, inner_steps=steps, loss=loss)
    aware = pymeta.ModelAwareMAML(mlp(), **kwargs)
    compiled_learner = pymeta.ModelAwareMAML(mlp(), **kwargs)
    compiled = compiled_learner.compile_step(
        torch.optim.Adam(compiled_learner.parameters(), lr=1e-3)
    )
    return {
        "pymeta_aware_compiled": lambda: compiled(batch),
        # Not a training step: the core op alone (loss and meta-gradient, no update), to show
        # how much of the one call it is.
        "core_op_only": core_only(compiled_learner, batch),
        # The rest of the one call, part by part: the argument and model checks before the op,
        # and the outer update after it.
        "checks_only": checks_only(compiled_learner, batch),
        "outer_update_only": update_only(pymeta.ModelAwareMAML(mlp(), **kwargs), batch),
        "pymeta_aware": unfused(aware),
        "pymeta": unfused(pymeta.MAML(mlp(), **kwargs)),
        "torch_func": unfused(TorchFuncMAML(mlp(), **kwargs)),
    }


def jax_step(name: str):
    """JAX jit + vmap MAML with optax Adam: a callable running one full step, or None."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    sizes, _, _, _, steps, lr, loss = WORKLOADS[name]
    key = jax.random.PRNGKey(0)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, k1, k2 = jax.random.split(key, 3)
        bound = 1 / a**0.5  # nn.Linear's default initialisation range
        params.append((jax.random.uniform(k1, (a, b), minval=-bound, maxval=bound),
                       jax.random.uniform(k2, (b,), minval=-bound, maxval=bound)))  # fmt: skip

    def forward(p, x):
        for i, (w, b) in enumerate(p):
            x = x @ w + b
            if i < len(p) - 1:
                x = jax.nn.relu(x)
        return x

    def loss_fn(p, x, y):
        out = forward(p, x)
        if loss == "mse":
            return jnp.mean((out - y) ** 2)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))

    def task_loss(p, sx, sy, qx, qy):
        for _ in range(steps):
            g = jax.grad(loss_fn)(p, sx, sy)
            p = jax.tree_util.tree_map(lambda w, gw: w - lr * gw, p, g)
        return loss_fn(p, qx, qy)

    def meta_loss(p, data):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, *data))

    opt = optax.adam(1e-3)
    state = {"params": params, "opt": opt.init(params)}

    @jax.jit
    def train_step(p, opt_state, data):
        value, grads = jax.value_and_grad(meta_loss)(p, data)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    data = tuple(jnp.asarray(a) for a in make_data(name))

    def step():
        state["params"], state["opt"], value = train_step(state["params"], state["opt"], data)
        value.block_until_ready()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args(argv)
    if args.threads == 1:  # before JAX is imported
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    import torch
    from harness import rotated_timings

    torch.set_num_threads(args.threads)
    threads = f"{args.threads} thread(s)"
    print(f"full meta-training step, second order, {threads}, torch {torch.__version__}")
    print("| workload | implementation | median ms | IQR ms | x vs jax | x vs pymeta_aware |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.workloads:
        fns = torch_steps(name)
        jax_fn = jax_step(name)
        if jax_fn is not None:
            fns["jax"] = jax_fn
        for fn in fns.values():
            for _ in range(3):
                fn()  # warm-up (JAX compiles here)
        times = rotated_timings(fns, args.repeats, 0.05)
        jax_ms = times["jax"]["median"] * 1e3 if "jax" in times else None
        aware_ms = times["pymeta_aware"]["median"] * 1e3
        for impl, t in times.items():
            ms = t["median"] * 1e3
            vs_jax = f"{jax_ms / ms:.2f}x" if jax_ms else "-"
            print(
                f"| {name} | {impl} | {ms:.3f} | {t['iqr'] * 1e3:.3f} | {vs_jax} | "
                f"{aware_ms / ms:.2f}x |"
            )
            sys.stdout.flush()
    if "jax" not in fns:
        print("(JAX is not installed: pip install 'jax[cpu]' optax to time it too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
