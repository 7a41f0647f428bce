"""The Omniglot command line on a tiny data set: training, exact resumption, evaluation, plot."""

import pytest
import torch

from pymeta.__main__ import main

# Settings of every tiny run, whatever the network; COMMON adds conv4's width.
TINY = (
    "--image-size 16 --n-way 2 --k-query 2 --meta-batch 2 --val-every 2 --val-tasks 3 "
    "--test-tasks 6 --test-query 2 --log-every 1 --no-progress"
).split()
COMMON = ["--hidden", "4", *TINY]
RESNET12 = ["--model", "resnet12", "--widths", "2", "3", "4", "5", *TINY]


def run_train(root, cache, checkpoint, iterations, *extra, common=COMMON):
    return main(
        [
            "train",
            "omniglot",
            "--root",
            str(root),
            "--cache-dir",
            str(cache),
            "--checkpoint",
            str(checkpoint),
            "--iterations",
            str(iterations),
            *common,
            *extra,
        ]
    )


def test_train_eval_and_plot(tiny_root, tmp_path, capsys):
    ckpt, png = tmp_path / "run.pt", tmp_path / "curves.png"
    assert run_train(tiny_root, tmp_path / "cache", ckpt, 4, "--plot", str(png)) == 0
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "accuracy" in out and "95% CI" in out
    assert ckpt.is_file() and png.stat().st_size > 1000
    evaluate = [
        "eval",
        "omniglot",
        "--root",
        str(tiny_root),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    evaluate += [
        "--checkpoint",
        str(ckpt),
        "--test-tasks",
        "6",
        "--test-query",
        "2",
        "--no-progress",
    ]
    assert main(evaluate) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and "test: 2-way 1-shot, 6 tasks" in out
    assert main([*evaluate, "--split", "val"]) == 0
    assert "val: 2-way 1-shot, 6 tasks" in capsys.readouterr().out


def test_resume_continues_exactly(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    run_train(tiny_root, cache, straight, 6, "--checkpoint-every", "3")
    run_train(tiny_root, cache, split, 3, "--checkpoint-every", "3")
    run_train(tiny_root, cache, split, 6, "--checkpoint-every", "3", "--resume")
    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    assert a["step"] == b["step"] == 6
    for key, value in a["maml"].items():
        assert torch.equal(value, b["maml"][key]), key
    assert a["history"]["meta_loss"] == b["history"]["meta_loss"]


def test_resume_refuses_other_settings(tiny_root, tmp_path):
    ckpt = tmp_path / "run.pt"
    run_train(tiny_root, tmp_path / "cache", ckpt, 2)
    with pytest.raises(SystemExit, match="--resume: the checkpoint was made with other settings"):
        run_train(tiny_root, tmp_path / "cache", ckpt, 4, "--resume", "--inner-lr", "0.1")


def test_aware_variant_trains_the_same_model_as_the_agnostic_one(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    run_train(tiny_root, cache, tmp_path / "agnostic.pt", 3)
    run_train(tiny_root, cache, tmp_path / "aware.pt", 3, "--variant", "aware")
    a = torch.load(tmp_path / "agnostic.pt", weights_only=True)["maml"]
    b = torch.load(tmp_path / "aware.pt", weights_only=True)["maml"]
    shared = [k for k in a if k in b and k.startswith("module.")]
    assert len(shared) == 18  # conv4: 4 x (conv weight, bias, bn weight, bias) + the head
    # Convolution biases in front of batch norm have an exact-zero gradient, so Adam turns
    # each core's float32 rounding noise into full steps there: compare everything else.
    conv_biases = {f"module.{i}.bias" for i in (0, 4, 8, 12)}
    for key in set(shared) - conv_biases:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_eval_needs_a_checkpoint(tiny_root, tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint: expected an existing file"):
        main(
            [
                "eval",
                "omniglot",
                "--root",
                str(tiny_root),
                "--checkpoint",
                str(tmp_path / "none.pt"),
            ]
        )


def usage_error(capsys, argv) -> str:
    """The one-line message a bad command line exits with (argparse's or the CLI's own)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert code != 0 and message.strip() and "\n" not in message.strip(), message
    return message


@pytest.fixture
def no_work(monkeypatch):
    """Any data decoding or training fails the test: errors must come first."""
    import pymeta.datasets.omniglot
    import pymeta.training

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(pymeta.datasets.omniglot.Omniglot, "_decode", forbidden)
    monkeypatch.setattr(pymeta.training, "meta_train", forbidden)
    monkeypatch.setattr("pymeta.demo.run_demo", forbidden)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--log-every", "0"], "--log-every: expected a positive int, received 0"),
        (["--val-tasks", "0"], "--val-tasks: expected a positive int, received 0"),
        (["--test-tasks", "0"], "--test-tasks: expected a positive int, received 0"),
        (["--test-query", "0"], "--test-query: expected a positive int, received 0"),
        (["--eval-steps", "0"], "--eval-steps: expected a positive int, received 0"),
        (["--eval-steps", "-2"], "--eval-steps: expected a positive int, received -2"),
        (["--threads", "0"], "--threads: expected a positive int, received 0"),
        (["--iterations", "0"], "--iterations: expected a positive int, received 0"),
        (["--n-way", "0"], "--n-way: expected a positive int, received 0"),
        (["--k-shot", "-1"], "--k-shot: expected a positive int, received -1"),
        (["--k-query", "0"], "--k-query: expected a positive int, received 0"),
        (["--meta-batch", "0"], "--meta-batch: expected a positive int, received 0"),
        (["--batch-size", "0"], "--batch-size: expected a positive int, received 0"),
        (["--inner-steps", "0"], "--inner-steps: expected a positive int, received 0"),
        (["--hidden", "0"], "--hidden: expected a positive int, received 0"),
        (["--val-every", "-1"], "--val-every: expected an int >= 0, received -1"),
        (["--checkpoint-every", "-1"], "--checkpoint-every: expected an int >= 0, received -1"),
        (["--lr", "inf"], "--lr: expected a finite number > 0, received inf"),
        (["--inner-lr", "-0.1"], "--inner-lr: expected a finite number > 0, received -0.1"),
        (["--n-way", "two"], "--n-way: expected a positive int, received 'two'"),
        (["--image-size", "15"], "--image-size: expected at least 16 (conv4's four 2x2"),
        (["--resume", "--resume-if-exists"], "--resume-if-exists: not allowed with argument"),
    ],
)
def test_train_flags_are_checked_before_any_work(flags, message, tiny_root, tmp_path, capsys,
                                                 no_work):  # fmt: skip
    argv = ["train", "omniglot", "--root", str(tiny_root), "--cache-dir", str(tmp_path / "c")]
    argv += ["--checkpoint", str(tmp_path / "run.pt"), *COMMON, *flags]
    assert message in usage_error(capsys, argv)
    assert not (tmp_path / "c").exists() and not (tmp_path / "run.pt").exists()


def test_a_checkpoint_path_under_a_regular_file_is_refused_before_training(
    tiny_root, tmp_path, capsys, no_work
):
    (tmp_path / "file").write_text("not a folder")
    ckpt = tmp_path / "file" / "run.pt"
    message = usage_error(
        capsys,
        ["train", "omniglot", "--root", str(tiny_root), "--checkpoint", str(ckpt), *COMMON],
    )
    assert f"--checkpoint: expected a path under a folder, received '{ckpt}'" in message
    message = usage_error(capsys, ["train", "sinusoid", "--checkpoint", str(ckpt)])
    assert "under the regular file" in message
    message = usage_error(capsys, ["train", "sinusoid", "--checkpoint", str(tmp_path)])
    assert "--checkpoint: expected a file path, received the folder" in message


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--test-tasks", "0"], "--test-tasks: expected a positive int, received 0"),
        (["--test-query", "0"], "--test-query: expected a positive int, received 0"),
        (["--eval-steps", "0"], "--eval-steps: expected a positive int, received 0"),
        (["--threads", "0"], "--threads: expected a positive int, received 0"),
    ],
)
def test_eval_flags_are_checked_before_any_work(flags, message, tiny_root, tmp_path, capsys,
                                                no_work):  # fmt: skip
    argv = ["eval", "omniglot", "--root", str(tiny_root), "--checkpoint", str(tmp_path / "x.pt")]
    assert message in usage_error(capsys, [*argv, *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--meta-batch", "0"], "--meta-batch: expected a positive int, received 0"),
        (["--iterations", "0"], "--iterations: expected a positive int, received 0"),
        (["--threads", "0"], "--threads: expected a positive int, received 0"),
    ],
)
def test_demo_flags_are_checked_before_any_work(flags, message, capsys, no_work):
    assert message in usage_error(capsys, ["demo", *flags])


def test_default_root_does_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    from pathlib import Path

    import pymeta
    from pymeta import cli_omniglot

    monkeypatch.delenv("PYMETA_OMNIGLOT", raising=False)
    monkeypatch.chdir(tmp_path)
    root = cli_omniglot.default_root()
    repository = Path(pymeta.__file__).resolve().parents[1]
    assert root.is_absolute() and root == repository.parent / "shared" / "data" / "omniglot"
    monkeypatch.setenv("PYMETA_OMNIGLOT", str(tmp_path / "elsewhere"))
    assert cli_omniglot.default_root() == tmp_path / "elsewhere"


def test_a_missing_root_is_a_one_line_error(tmp_path, capsys, no_work):
    missing = tmp_path / "missing"
    argv = ["train", "omniglot", "--root", str(missing), "--checkpoint", str(tmp_path / "r.pt")]
    message = usage_error(capsys, argv)
    assert f"--root: expected a folder of Omniglot zips or images, received '{missing}'" in message


def test_console_script_is_the_same_program_as_python_m_pymeta(tmp_path):
    import subprocess
    import sys
    from importlib.metadata import entry_points
    from pathlib import Path

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "pymeta"]
    assert script.value == "pymeta.__main__:run"
    installed = Path(sys.executable).parent / "pymeta"
    if not installed.is_file():
        pytest.skip("no installed pymeta script next to this interpreter")
    argv = ["train", "sinusoid", "--log-every", "0"]
    a = subprocess.run([str(installed), *argv], capture_output=True, text=True, cwd=tmp_path)
    b = subprocess.run([sys.executable, "-m", "pymeta", *argv], capture_output=True, text=True,
                       cwd=tmp_path)  # fmt: skip
    assert a.returncode == b.returncode == 2 and a.stdout == b.stdout == ""
    assert a.stderr == b.stderr and "--log-every: expected a positive int" in a.stderr


def test_run_reports_an_unusable_checkpoint_in_one_line(tmp_path, monkeypatch):
    from pymeta.__main__ import run

    called = []  # run() must set up memory as the program does (not for this test process)
    monkeypatch.setattr("pymeta.memory.retain_freed_memory", lambda: called.append(1))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    monkeypatch.setattr("sys.argv", ["pymeta", "eval", "sinusoid", "--checkpoint", str(bad)])
    with pytest.raises(SystemExit, match=rf"^pymeta: error: checkpoint: '{bad}' is empty"):
        run()
    assert called == [1]


def eval_argv(root, cache, checkpoint):
    return ["eval", "omniglot", "--root", str(root), "--cache-dir", str(cache), "--checkpoint",
            str(checkpoint), "--test-tasks", "6", "--test-query", "2", "--no-progress"]  # fmt: skip


def test_resnet12_trains_evaluates_and_resumes_exactly(tiny_root, tmp_path, capsys):
    cache, straight, split = tmp_path / "cache", tmp_path / "straight.pt", tmp_path / "split.pt"
    flags = ("--checkpoint-every", "2")
    assert run_train(tiny_root, cache, straight, 4, *flags, common=RESNET12) == 0
    assert "test: 2-way 1-shot, 6 tasks" in capsys.readouterr().out
    blob = torch.load(straight, weights_only=True)
    assert blob["config"]["model"] == "resnet12" and blob["config"]["widths"] == [2, 3, 4, 5]
    assert "hidden" not in blob["config"]
    # ResNet-12 on one channel: the first block's convolutions see 1 input channel.
    assert blob["maml"]["module.0.body.0.weight"].shape == (2, 1, 3, 3)
    assert blob["maml"]["module.6.weight"].shape == (2, 5)  # the head on the last width

    assert main(eval_argv(tiny_root, cache, straight)) == 0
    out = capsys.readouterr().out
    assert "step 4, resnet12, agnostic MAML" in out and "test: 2-way 1-shot, 6 tasks" in out

    # Resuming rebuilds the same network from the checkpoint's model and widths.
    run_train(tiny_root, cache, split, 2, *flags, common=RESNET12)
    run_train(tiny_root, cache, split, 4, *flags, "--resume", common=RESNET12)
    resumed = torch.load(split, weights_only=True)
    assert resumed["step"] == 4
    for key, value in blob["maml"].items():
        assert torch.equal(value, resumed["maml"][key]), key
    # Other widths are other settings; conv4 is another model.
    with pytest.raises(SystemExit, match=r"other settings: \['widths'\]"):
        run_train(tiny_root, cache, split, 6, "--resume", "--widths", "2", "3", "4", "6",
                  common=RESNET12)  # fmt: skip
    with pytest.raises(SystemExit, match=r"other settings: \['model', 'hidden'\]"):
        run_train(tiny_root, cache, split, 6, "--resume")


def test_resnet12_model_aware_trains_like_model_agnostic(tiny_root, tmp_path, capsys):
    """The same run with ModelAwareMAML and with pymeta.MAML: the same meta-gradient up to
    float32 rounding, so the trained networks agree closely."""
    runs = {}
    for variant in ("aware", "agnostic"):
        ckpt = tmp_path / f"{variant}.pt"
        assert run_train(tiny_root, tmp_path / "cache", ckpt, 2, "--variant", variant,
                         common=RESNET12) == 0  # fmt: skip
        out = capsys.readouterr().out
        assert "test: 2-way 1-shot, 6 tasks" in out
        runs[variant] = torch.load(ckpt, weights_only=True)["maml"]
    for key, value in runs["agnostic"].items():
        if key.startswith("module."):
            torch.testing.assert_close(runs["aware"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_resnet12_pretrained_baseline(tiny_root, tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    extra = ("--variant", "pretrained", "--batch-size", "8", "--inner-steps", "3")
    assert run_train(tiny_root, tmp_path / "cache", ckpt, 2, *extra, common=RESNET12) == 0
    assert "test: 2-way 1-shot, 6 tasks" in capsys.readouterr().out
    assert main(eval_argv(tiny_root, tmp_path / "cache", ckpt)) == 0
    assert "step 2, resnet12, pretrained baseline" in capsys.readouterr().out


def test_a_checkpoint_without_a_model_evaluates_as_conv4(tiny_root, tmp_path, capsys):
    """Checkpoints written before --model existed hold conv4 and no "model" key."""
    from pymeta.checkpoints import CHECKPOINT_FORMAT, load_checkpoint
    from pymeta.safe_files import save_file

    ckpt = tmp_path / "run.pt"
    run_train(tiny_root, tmp_path / "cache", ckpt, 2)
    capsys.readouterr()
    assert main(eval_argv(tiny_root, tmp_path / "cache", ckpt)) == 0
    expected = capsys.readouterr().out
    blob = load_checkpoint(ckpt, "omniglot")
    assert blob["config"].pop("model") == "conv4"
    envelope = ("format", "version", "sha256")  # save_file writes them again
    save_file(ckpt, {k: v for k, v in blob.items() if k not in envelope}, CHECKPOINT_FORMAT)
    assert main(eval_argv(tiny_root, tmp_path / "cache", ckpt)) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            [*COMMON, "--widths", "2", "3", "4", "5"],
            "--widths: expected only with --model resnet12",
        ),
        ([*RESNET12, "--hidden", "4"], "--hidden: expected only with --model conv4"),
        (
            [*RESNET12, "--image-size", "15"],
            "--image-size: expected at least 16 (resnet12's four 2x2 poolings), received 15",
        ),
        ([*RESNET12, "--widths", "2", "0", "4", "5"], "--widths: expected a positive int"),
        ([*TINY, "--widths", "2", "3"], "--widths: expected 4 argument"),
        ([*TINY, "--model", "resnet18"], "--model: invalid choice: 'resnet18'"),
    ],
)
def test_model_flags_are_checked_before_any_work(flags, message, tiny_root, tmp_path, capsys,
                                                 no_work):  # fmt: skip
    argv = ["train", "omniglot", "--root", str(tiny_root), "--cache-dir", str(tmp_path / "c")]
    argv += ["--checkpoint", str(tmp_path / "run.pt"), *flags]
    assert message in usage_error(capsys, argv)
    assert not (tmp_path / "c").exists() and not (tmp_path / "run.pt").exists()
