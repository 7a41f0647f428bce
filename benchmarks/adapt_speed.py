"""Time fast adaptation for inference: ``adapt(support_x, support_y)`` with no graph.

Usage::

    .venv/bin/python benchmarks/adapt_speed.py [--threads N] [--repeats R]

Compares ``pymeta.ModelAwareMAML.adapt`` (inner loop in the compiled core), ``pymeta.MAML.adapt``
(task-batched autograd) and a plain per-task ``torch.autograd.grad`` loop without
``create_graph``, on sinusoid (25 tasks, 10 steps) and wide-mlp (32 tasks, 5 steps). Timing is
the rotated-rounds scheme of ``harness.rotated_timings``; a call is one adaptation of the whole
meta-batch's support sets (predicting on the query sets is not timed). Then one sinusoid task
alone, adapted as a drop-in call on (K, ...) tensors, with 10 steps and with 1 (its floor).
"""

from __future__ import annotations

import argparse
import sys

import torch
from baselines import _LOSSES
from harness import rotated_timings
from torch.func import functional_call
from workloads import make_workload

import pymeta

# (workload, inner steps, tasks): few-shot regression adapted for longer than it was
# meta-trained, and the wide classifier at its meta-training steps, on the whole meta-batch
# (tasks None); then one sinusoid task as a drop-in adapt(support_x (K, 1), ...) call, with 10
# steps and with 1 step (the call's floor: what it costs beside the steps).
CASES = (("sinusoid", 10, None), ("wide-mlp", 5, None), ("sinusoid", 10, 1), ("sinusoid", 1, 1))


def _pymeta_adapter(cls):
    def make(workload, steps: int):
        maml = cls(workload.model, **workload.maml_kwargs)
        batch = workload.batch
        if batch.num_tasks == 1:  # one task, as a drop-in call: (K, ...) tensors
            sx, sy = batch.support_x[0], batch.support_y[0]

            def adapt_one():
                adapted = maml.adapt(sx, sy, steps=steps, batched=False)
                return lambda query_x: adapted(query_x[0]).unsqueeze(0)

            return adapt_one
        return lambda: maml.adapt(batch.support_x, batch.support_y, steps=steps)

    return make


def _autograd_loop(workload, steps: int):
    """The plain loop a user would write: one task at a time, detached SGD steps."""
    model, batch = workload.model, workload.batch
    loss_fn = _LOSSES[workload.maml_kwargs["loss"]]
    lr = workload.maml_kwargs["inner_lr"]
    meta_params = {n: p.detach() for n, p in model.named_parameters()}

    def adapt():
        adapted = []
        for t in range(batch.num_tasks):
            params = meta_params
            for _ in range(steps):
                params = {n: p.requires_grad_() for n, p in params.items()}
                pred = functional_call(model, params, (batch.support_x[t],))
                loss = loss_fn(pred, batch.support_y[t])
                grads = torch.autograd.grad(loss, list(params.values()))  # no create_graph
                params = {n: p.detach() - lr * g for (n, p), g in zip(params.items(), grads)}
            adapted.append(params)

        def predict(query_x):  # (T, Q, ...) -> (T, Q, ...), like pymeta's AdaptedModel
            with torch.no_grad():
                preds = [functional_call(model, p, (x,)) for p, x in zip(adapted, query_x)]
            return torch.stack(preds)

        return predict

    return adapt


# name -> factory(workload, steps) -> adapt(): returns a callable predicting on (T, Q, ...).
ADAPTERS = {
    "pymeta_aware": _pymeta_adapter(pymeta.ModelAwareMAML),
    "pymeta": _pymeta_adapter(pymeta.MAML),
    "autograd_loop": _autograd_loop,
}


def measure(
    workload_name: str, steps: int, tasks: int | None, repeats: int, min_sample_s: float
) -> dict:
    workload = make_workload(workload_name)
    if tasks is not None:
        b = workload.batch
        workload.batch = pymeta.TaskBatch(
            b.support_x[:tasks], b.support_y[:tasks], b.query_x[:tasks], b.query_y[:tasks]
        )
    fns = {name: make(workload, steps) for name, make in ADAPTERS.items()}
    # The first call initializes lazily; its predictions also check the three agree.
    preds = {name: fn()(workload.batch.query_x) for name, fn in fns.items()}
    ref = preds["autograd_loop"]
    for name, pred in preds.items():
        err = ((pred - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-4:  # float32: only a real disagreement is this large
            message = f"WARNING: {workload_name}: {name} predictions differ by {err:.2g}"
            print(message, file=sys.stderr)
    return rotated_timings(fns, repeats, min_sample_s)


def markdown_table(all_results: dict) -> str:
    lines = [
        "| workload | tasks | steps | implementation | median ms | IQR ms "
        "| x faster vs autograd_loop | x faster vs pymeta MAML |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for (workload_name, tasks, steps), results in all_results.items():
        for name, res in results.items():
            vs_loop = results["autograd_loop"]["median"] / res["median"]
            vs_pymeta = results["pymeta"]["median"] / res["median"]
            lines.append(
                f"| {workload_name} | {tasks} | {steps} | {name} | {res['median'] * 1e3:.3f} "
                f"| {res['iqr'] * 1e3:.3f} | {vs_loop:.2f}x | {vs_pymeta:.2f}x |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds (default 21)")
    parser.add_argument(
        "--min-sample-ms", type=float, default=20.0, help="minimum duration of one sample"
    )
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats: expected at least 2")
    torch.set_num_threads(args.threads)

    all_results = {}
    for workload_name, steps, tasks in CASES:
        print(f"measuring adapt on {workload_name}, {steps} steps ...", file=sys.stderr)
        results = measure(workload_name, steps, tasks, args.repeats, args.min_sample_ms / 1e3)
        tasks = tasks or make_workload(workload_name).batch.num_tasks
        all_results[workload_name, tasks, steps] = results
    print(
        f"adapt(): torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{args.repeats} rounds, samples >= {args.min_sample_ms:g} ms\n"
    )
    print(markdown_table(all_results))


if __name__ == "__main__":
    main()
