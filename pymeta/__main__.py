"""Command line: ``python -m pymeta demo | train omniglot|sinusoid | eval omniglot|sinusoid``;
``torchrun --nproc-per-node N -m pymeta train ...`` runs on N processes (docs/distributed.md)."""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line: the full usage of `train omniglot` is a screen long."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs the command; every flag is checked
    before any work starts. Returns 0; a bad flag raises SystemExit with one line."""
    from pymeta.cli_args import positive_int

    parser = _Parser(prog="pymeta", description="pymeta command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="short sinusoid meta-training with before/after-adaptation MSE"
    )
    demo.add_argument("--iterations", type=positive_int, default=3000)
    demo.add_argument("--meta-batch", type=positive_int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="intra-op threads (1 is fastest for these small tensors)",
    )
    demo.add_argument("--no-progress", action="store_true")
    from pymeta import cli_omniglot, cli_sinusoid

    for command, helptext in (
        ("train", "meta-train on a benchmark"),
        ("eval", "evaluate a checkpoint"),
    ):
        benchmarks = sub.add_parser(command, help=helptext).add_subparsers(
            dest="benchmark", required=True
        )
        cli_omniglot.add_arguments(
            benchmarks.add_parser("omniglot", help="few-shot Omniglot"), command == "train"
        )
        cli_sinusoid.add_arguments(
            benchmarks.add_parser("sinusoid", help="the MAML paper's sinusoid regression"),
            command == "train",
        )
    args = parser.parse_args(argv)

    import torch

    if args.command == "demo":
        from pymeta.demo import run_demo

        torch.set_num_threads(args.threads)
        run_demo(args.iterations, args.meta_batch, args.seed, progress=not args.no_progress)
    else:
        import torch.distributed as dist

        from pymeta.distributed import init_from_environment, world

        # Under torchrun: one process group for the run; only rank 0 prints (its checkpoints,
        # plots and progress bars are rank 0's too).
        distributed = init_from_environment()
        if distributed and world()[0] != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
        finished = False
        try:
            cli = cli_sinusoid if args.benchmark == "sinusoid" else cli_omniglot
            (cli.train if args.command == "train" else cli.evaluate)(args)
            finished = True
        finally:
            if distributed:
                if finished:
                    dist.barrier()  # no rank tears gloo down while another still talks to it
                dist.destroy_process_group()
        if distributed:
            # A finished rank leaves without the interpreter's teardown, where gloo's threads
            # can abort it ("terminate called without an active exception", SIGABRT, seen in
            # CI); its files are closed and its output is flushed here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return 0


def run() -> int:
    """The program: ``python -m pymeta`` and the installed ``pymeta`` console script both start
    here, so they behave the same."""
    from pymeta.memory import retain_freed_memory
    from pymeta.safe_files import CheckpointError

    retain_freed_memory()  # this process is ours: reuse freed activations (pymeta/memory.py)
    try:
        return main()
    except CheckpointError as err:  # names the file and says why: no traceback needed
        raise SystemExit(f"pymeta: error: {err}") from None


if __name__ == "__main__":
    sys.exit(run())
