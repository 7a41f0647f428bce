"""`python -m pymeta train omniglot` / `eval omniglot`: few-shot classification on Omniglot.

``--variant agnostic|aware`` meta-trains the network (``--model conv4|resnet12``) with MAML;
``--variant pretrained`` is the baseline without meta-learning (pymeta.baselines.Pretrained): the
network trained to classify all training classes, then a fresh linear head fine-tuned on each test
task's support set. Both are tested on the same seeded test tasks and reported the same way.
Both networks run in every variant.

Every flag is checked before any data is decoded. ``--root`` defaults to ``$PYMETA_OMNIGLOT``,
else ``shared/data/omniglot`` beside the repository (never relative to the current folder).
Checkpoints are pymeta.training's safe files (plain data, ``weights_only=True``, SHA-256 checked,
tagged ``benchmark: "omniglot"``): ``--resume`` needs the checkpoint to exist,
``--resume-if-exists`` starts from scratch when it does not.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

BENCHMARK = "omniglot"
VARIANTS = ("agnostic", "aware", "pretrained")
MODELS = ("conv4", "resnet12")
# Checkpoints written before --model existed hold conv4 and no "model" key.
DEFAULT_MODEL = "conv4"
CONV4_HIDDEN = 64
RESNET12_WIDTHS = (64, 160, 320, 640)
# (inner_lr, inner_steps) when not given: MAML's inner loop, or the baseline's head fine-tuning
# (chosen on validation tasks: lower rates or more steps change little).
ADAPT_DEFAULTS = {"maml": (0.4, 1), "pretrained": (0.05, 100)}


def default_root() -> Path:
    """``$PYMETA_OMNIGLOT`` when set, else ``shared/data/omniglot`` beside the repository that
    holds this package (a source checkout's layout): never relative to the current folder."""
    env = os.environ.get("PYMETA_OMNIGLOT")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def add_arguments(parser: argparse.ArgumentParser, train: bool) -> None:
    from pymeta.cli_args import add_resume_arguments, positive_float, positive_int

    parser.add_argument(
        "--root",
        type=Path,
        default=default_root(),
        help="folder with the Omniglot zips (default: $PYMETA_OMNIGLOT, else "
        "shared/data/omniglot beside the repository)",
    )
    parser.add_argument("--cache-dir", default=None, help="tensor cache (default ~/.cache/pymeta)")
    parser.add_argument("--checkpoint", default="runs/omniglot.pt")
    parser.add_argument("--test-tasks", type=positive_int, default=600)
    parser.add_argument(
        "--test-query",
        type=positive_int,
        default=15,
        help="query examples per class of validation and test tasks (whatever --k-query was)",
    )
    parser.add_argument(
        "--eval-steps", type=positive_int, default=None, help="adaptation steps at test time"
    )
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    if not train:
        parser.add_argument(
            "--split",
            choices=("test", "val"),
            default="test",
            help="held-out characters to evaluate on: test, or validation (for choosing settings)",
        )
        return
    from pymeta.cli_args import non_negative_int

    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="agnostic",
        help="MAML (agnostic, aware) or the pretrain-then-fine-tune baseline (pretrained)",
    )
    parser.add_argument("--n-way", type=positive_int, default=5)
    parser.add_argument("--k-shot", type=positive_int, default=1)
    parser.add_argument("--k-query", type=positive_int, default=15)
    parser.add_argument("--meta-batch", type=positive_int, default=32)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="pretrained: examples per pretraining step",
    )
    parser.add_argument(
        "--inner-lr",
        type=positive_float,
        default=None,
        help="adaptation learning rate (default 0.4; pretrained: 0.05, head fine-tuning)",
    )
    parser.add_argument(
        "--inner-steps",
        type=positive_int,
        default=None,
        help="adaptation steps (default 1; pretrained: 100, head fine-tuning)",
    )
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--iterations", type=positive_int, default=2000)
    parser.add_argument(
        "--lr", type=positive_float, default=1e-3, help="(meta-)optimizer (Adam) learning rate"
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=DEFAULT_MODEL,
        help="the network: conv4 (MAML's 4 conv blocks) or resnet12 (4 residual blocks)",
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=None,
        help=f"conv4: channels of every block (default {CONV4_HIDDEN})",
    )
    parser.add_argument(
        "--widths",
        type=positive_int,
        nargs=4,
        default=None,
        metavar="W",
        help="resnet12: channels of the four blocks (default "
        f"{' '.join(map(str, RESNET12_WIDTHS))})",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=28,
        help="images are resized to this side (conv4 and resnet12 need at least 16)",
    )
    parser.add_argument(
        "--no-rotations", action="store_true", help="no 90-degree class augmentation"
    )
    parser.add_argument(
        "--val-every", type=non_negative_int, default=250, help="0: validate only at the end"
    )
    parser.add_argument("--val-tasks", type=positive_int, default=100)
    parser.add_argument("--log-every", type=positive_int, default=25)
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=100,
        help="0: save only at the end",
    )
    add_resume_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write learning curves to this PNG")


def _describe(config: dict) -> str:
    model = config.get("model", DEFAULT_MODEL)
    if config["variant"] == "pretrained":
        return f"{model}, pretrained baseline (no meta-learning)"
    return f"{model}, {config['variant']} MAML"


def _network(config: dict, outputs: int):
    """The run's network with ``outputs`` logits: (N, 1, image_size, image_size) -> (N, outputs).
    Omniglot is grayscale: one input channel."""
    import pymeta

    if config.get("model", DEFAULT_MODEL) == "resnet12":
        return pymeta.models.resnet12(
            outputs, in_channels=1, widths=tuple(config["widths"]), image_size=config["image_size"]
        )
    return pymeta.models.conv4(outputs, hidden=config["hidden"], image_size=config["image_size"])


def _build(config: dict):
    import pymeta

    if config["variant"] == "pretrained":
        # One logit per training class for pretraining; each task gets a fresh n_way head.
        net = _network(config, config["classes"])
        return pymeta.baselines.Pretrained(
            net,
            loss="cross_entropy",
            inner_lr=config["inner_lr"],
            inner_steps=config["inner_steps"],
            adapt_layers="head",
            head=config["n_way"],
        )
    net = _network(config, config["n_way"])
    kwargs = dict(
        inner_lr=config["inner_lr"],
        inner_steps=config["inner_steps"],
        first_order=config["first_order"],
        loss="cross_entropy",
    )
    if config["variant"] == "aware":
        return pymeta.ModelAwareMAML(net, **kwargs)
    return pymeta.MAML(net, **kwargs)


def _data(args, config):
    import pymeta

    ds = pymeta.datasets.Omniglot(
        args.root, image_size=config["image_size"], cache_dir=args.cache_dir
    )
    shots = dict(n_way=config["n_way"], k_shot=config["k_shot"])
    train_split = ds.split("train", rotations=config["rotations"])
    train = pymeta.tasks.FewShot(train_split, k_query=config["k_query"], **shots)
    # Every model is validated and tested on the same tasks, however it was trained.
    val = pymeta.tasks.FewShot(ds.split("val"), k_query=args.test_query, **shots)
    test = pymeta.tasks.FewShot(ds.split("test"), k_query=args.test_query, **shots)
    return train, val, test


def _report(maml, tasks, config, args, split="test") -> dict:
    from pymeta.evaluation import few_shot_accuracy

    steps = args.eval_steps or config["inner_steps"]
    seed = 12345 if split == "test" else 777  # the tasks training validates on start at 777
    acc, ci = few_shot_accuracy(maml, tasks, args.test_tasks, steps=steps, seed=seed)
    print(
        f"{split}: {config['n_way']}-way {config['k_shot']}-shot, {args.test_tasks} tasks of "
        f"held-out characters, {args.test_query} queries per class, {steps} adaptation step(s): "
        f"accuracy {100 * acc:.2f}% ± {100 * ci:.2f}% (95% CI)"
    )
    return {"accuracy": acc, "ci95": ci}


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise SystemExit(
            f"--root: expected a folder of Omniglot zips or images, received {str(root)!r} "
            "(pass --root or set $PYMETA_OMNIGLOT)"
        )


def _config(args) -> dict:
    """The run's settings: everything a resumed run must share with the checkpoint. Checks
    what argparse cannot (SystemExit, one line) before any work starts."""
    pretrained = args.variant == "pretrained"
    keys = ["variant", "n_way", "k_shot", "k_query", "inner_lr", "inner_steps"]
    keys += ["batch_size"] if pretrained else ["meta_batch", "first_order"]
    keys += ["iterations", "lr", "model", "image_size", "seed"]
    config = {k: getattr(args, k) for k in keys}
    config.update(_architecture(args))
    default_lr, default_steps = ADAPT_DEFAULTS["pretrained" if pretrained else "maml"]
    if config["inner_lr"] is None:
        config["inner_lr"] = default_lr
    if config["inner_steps"] is None:
        config["inner_steps"] = default_steps
    config["rotations"] = not args.no_rotations
    return config


def _architecture(args) -> dict:
    """The network's config entries (conv4: hidden; resnet12: widths), checked: SystemExit with
    one line for flags of the other model or a too small image."""
    from pymeta.models import CONV4_MIN_IMAGE_SIZE, RESNET12_MIN_IMAGE_SIZE

    if args.model == "conv4":
        if args.widths is not None:
            raise SystemExit(
                "--widths: expected only with --model resnet12 (conv4's width is --hidden), "
                "received --model conv4"
            )
        minimum, entries = CONV4_MIN_IMAGE_SIZE, {"hidden": args.hidden or CONV4_HIDDEN}
    else:
        if args.hidden is not None:
            raise SystemExit(
                "--hidden: expected only with --model conv4 (resnet12's widths are --widths), "
                "received --model resnet12"
            )
        widths = list(args.widths or RESNET12_WIDTHS)  # a list: what the checkpoint stores
        minimum, entries = RESNET12_MIN_IMAGE_SIZE, {"widths": widths}
    if args.image_size < minimum:
        raise SystemExit(
            f"--image-size: expected at least {minimum} ({args.model}'s four 2x2 "
            f"poolings), received {args.image_size}"
        )
    return entries


def train(args) -> dict:
    from pymeta.baselines import pretrain
    from pymeta.checkpoints import open_resume, restore, save_checkpoint
    from pymeta.cli_args import check_checkpoint_path
    from pymeta.distributed import DistributedMeta, world
    from pymeta.training import meta_train, plot_history

    config = _config(args)
    check_checkpoint_path(args.checkpoint, must_exist=False)
    _check_root(args.root)
    rank, size = world()
    if size > 1 and config["variant"] == "pretrained":
        raise SystemExit(
            "--variant pretrained: pretraining on Omniglot runs on one process; start it without "
            "torchrun (the meta-learning variants split their meta-batches over ranks)"
        )
    resumed = None
    if args.resume or args.resume_if_exists:  # before decoding any data
        resumed = open_resume(args.checkpoint, BENCHMARK, config, args.resume_if_exists)
    torch.set_num_threads(args.threads)
    pretrained = config["variant"] == "pretrained"
    torch.manual_seed(config["seed"])
    train_tasks, val_tasks, test_tasks = _data(args, config)
    if pretrained:
        config["classes"] = train_tasks.examples.shape[0]
    maml = _build(config)
    optimizer = torch.optim.Adam(maml.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    step, history = restore(resumed, maml, optimizer, generator)

    from pymeta.evaluation import few_shot_accuracy

    def validate():
        return few_shot_accuracy(maml, val_tasks, args.val_tasks, seed=777)[0]

    def batch_accuracy(batch):
        with torch.no_grad():
            if pretrained:  # a batch (x, y) of training classes
                x, y = batch
                return float((maml(x).argmax(-1) == y).double().mean())
            adapted = maml.adapt(batch.support_x, batch.support_y, batched=True)
            return float((adapted(batch.query_x).argmax(-1) == batch.query_y).double().mean())

    def checkpoint(done, hist):
        save_checkpoint(
            args.checkpoint,
            benchmark=BENCHMARK,
            config=config,
            maml=maml,
            optimizer=optimizer,
            step=done,
            task_generator=generator,
            history=hist,
        )

    loop = dict(
        start_step=step,
        history=history,
        validate=validate,
        val_every=args.val_every,
        train_accuracy=batch_accuracy,
        log_every=args.log_every,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    if pretrained:
        history = pretrain(
            maml,
            train_tasks.examples,
            optimizer,
            iterations=config["iterations"],
            batch_size=config["batch_size"],
            generator=generator,
            **loop,
        )
    else:
        history = meta_train(
            DistributedMeta(maml) if size > 1 else maml,
            optimizer,
            train_tasks,
            iterations=config["iterations"],
            meta_batch=config["meta_batch"],
            task_generator=generator,
            **loop,
        )
    print(
        f"trained {config['iterations']} {'steps' if pretrained else 'meta-steps'} in "
        f"{history.seconds:.1f} s; checkpoint {args.checkpoint}"
    )
    if args.plot and rank == 0:
        labels = dict(step_label="step", loss_label="loss", train_label="train (batch)")
        plot_history(
            history,
            args.plot,
            f"Omniglot {config['n_way']}-way {config['k_shot']}-shot, {_describe(config)}",
            **(labels if pretrained else {}),
        )
        print(f"learning curves: {args.plot}")
    return _report(maml, test_tasks, config, args)


def evaluate(args) -> dict:
    from pymeta.checkpoints import load_checkpoint
    from pymeta.cli_args import check_checkpoint_path

    check_checkpoint_path(args.checkpoint, must_exist=True)
    _check_root(args.root)
    blob = load_checkpoint(args.checkpoint, BENCHMARK)
    torch.set_num_threads(args.threads)
    config = blob["config"]
    maml = _build(config)
    maml.load_state_dict(blob["maml"])
    _, val_tasks, test_tasks = _data(args, config)
    print(f"checkpoint {args.checkpoint}: step {blob['step']}, {_describe(config)}")
    tasks = test_tasks if args.split == "test" else val_tasks
    return _report(maml, tasks, config, args, args.split)
