"""The Omniglot command line on a tiny data set: training, exact resumption, evaluation, plot."""

import pytest
import torch

from pymeta.__main__ import main

COMMON = (
    "--hidden 4 --image-size 16 --n-way 2 --k-query 2 --meta-batch 2 --val-every 2 --val-tasks 3 "
    "--test-tasks 6 --test-query 2 --log-every 1 --no-progress"
).split()


def run_train(root, cache, checkpoint, iterations, *extra):
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
            *COMMON,
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
    a, b = torch.load(straight, weights_only=False), torch.load(split, weights_only=False)
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
    a = torch.load(tmp_path / "agnostic.pt", weights_only=False)["maml"]
    b = torch.load(tmp_path / "aware.pt", weights_only=False)["maml"]
    shared = [k for k in a if k in b and k.startswith("module.")]
    assert len(shared) == 18  # conv4: 4 x (conv weight, bias, bn weight, bias) + the head
    # Convolution biases in front of batch norm have an exact-zero gradient, so Adam turns
    # each core's float32 rounding noise into full steps there: compare everything else.
    conv_biases = {f"module.{i}.bias" for i in (0, 4, 8, 12)}
    for key in set(shared) - conv_biases:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_eval_needs_a_checkpoint(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="checkpoint: expected an existing file"):
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


def test_train_rejects_non_positive_settings(tiny_root, tmp_path):
    with pytest.raises(SystemExit, match="--iterations: expected a positive int, received 0"):
        run_train(tiny_root, tmp_path / "cache", tmp_path / "run.pt", 0)


def test_eval_rejects_a_non_positive_test_query(tiny_root, tmp_path):
    ckpt = tmp_path / "run.pt"
    assert run_train(tiny_root, tmp_path / "cache", ckpt, 1) == 0
    args = ["eval", "omniglot", "--root", str(tiny_root), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="--test-query: expected a positive int, received 0"):
        main([*args, "--checkpoint", str(ckpt), "--test-query", "0", "--no-progress"])
