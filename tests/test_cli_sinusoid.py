"""The sinusoid command line: each variant trains, eval prints the table, exact resumption,
the pretrained baseline's fine-tuning rate chosen on validation tasks, the figure, bad flags."""

import re

import pytest
import torch

from pymeta import cli_sinusoid
from pymeta.__main__ import main

FAST = "--meta-batch 4 --test-tasks 20 --query-points 20 --log-every 1 --no-progress".split()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def few_validation_tasks(monkeypatch):
    # The baseline's rate search runs on 2000 tasks by default; a few keep the tests fast.
    monkeypatch.setattr(cli_sinusoid, "FINETUNE_VAL_TASKS", 50)


def train(checkpoint, iterations, *extra):
    argv = ["train", "sinusoid", "--checkpoint", str(checkpoint), "--iterations", str(iterations)]
    return main(argv + FAST + list(extra))


def table_rows(out: str) -> dict:
    """{K: [MSE after 0, 1, 5, 10 steps]} from the printed markdown table."""
    rows = {}
    for k, cells in re.findall(r"^\| (\d+) \| (.*) \|$", out, flags=re.M):
        rows[int(k)] = [float(c.split(" ± ")[0]) for c in cells.split(" | ")]
    return rows


@pytest.mark.parametrize("variant", ["aware", "agnostic", "pretrained"])
def test_each_variant_trains_and_eval_prints_the_table(variant, tmp_path, capsys):
    ckpt = tmp_path / f"{variant}.pt"
    assert train(ckpt, 30, "--variant", variant) == 0
    trained = capsys.readouterr().out
    assert "trained 30" in trained and "query MSE on 20 tasks" in trained
    assert main(["eval", "sinusoid", "--checkpoint", str(ckpt), "--test-tasks", "20",
                 "--query-points", "20"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "step 30" in out and "| K | 0 steps | 1 step | 5 steps | 10 steps |" in out
    rows = table_rows(out)
    assert sorted(rows) == [5, 10] and all(len(r) == 4 for r in rows.values())
    # eval rebuilds the model (and, for the baseline, its chosen fine-tuning rate) exactly.
    assert rows == table_rows(trained)
    # Same query points for K=5 and K=10: no adaptation gives the same MSE.
    assert rows[5][0] == rows[10][0]


def test_aware_and_agnostic_train_the_same_model(tmp_path):
    train(tmp_path / "agnostic.pt", 20, "--variant", "agnostic")
    train(tmp_path / "aware.pt", 20, "--variant", "aware")
    a = torch.load(tmp_path / "agnostic.pt", weights_only=True)["maml"]
    b = torch.load(tmp_path / "aware.pt", weights_only=True)["maml"]
    shared = [k for k in a if k.startswith("module.")]
    assert len(shared) == 6 and all(k in b for k in shared)
    for key in shared:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["aware", "pretrained"])
def test_resume_continues_exactly(variant, tmp_path):
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    every = ["--variant", variant, "--checkpoint-every", "5"]
    train(straight, 12, *every)
    train(split, 5, *every)
    train(split, 12, *every, "--resume")
    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    assert a["step"] == b["step"] == 12
    assert a["maml"].keys() == b["maml"].keys()
    for key, value in a["maml"].items():
        assert torch.equal(value, b["maml"][key]), key
    assert a["history"]["meta_loss"] == b["history"]["meta_loss"]
    assert a["config"] == b["config"]


def test_resume_refuses_other_settings(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(ckpt, 2)
    with pytest.raises(SystemExit, match="--resume: the checkpoint was made with other settings"):
        train(ckpt, 4, "--resume", "--inner-lr", "0.02")


def test_pretrained_fine_tuning_rate_is_chosen_on_validation_tasks(tmp_path, capsys, monkeypatch):
    seeds = []
    original = cli_sinusoid.mse_table

    def spy(model, num_tasks, query_points, seed):
        seeds.append(seed)
        return original(model, num_tasks, query_points, seed)

    monkeypatch.setattr(cli_sinusoid, "mse_table", spy)
    ckpt = tmp_path / "pre.pt"
    train(ckpt, 10, "--variant", "pretrained")
    out = capsys.readouterr().out
    grid = cli_sinusoid.FINETUNE_GRID
    # Every candidate scored on validation tasks, then one test evaluation.
    assert seeds == [cli_sinusoid.VAL_SEED] * len(grid) + [cli_sinusoid.TEST_SEED]
    chosen = torch.load(ckpt, weights_only=True)["config"]["finetune_lr_chosen"]
    assert (
        chosen in grid
        and f"-> {chosen}" in out
        and "on 50 validation tasks" in out
        and f"SGD steps of {chosen:g}" in out
    )

    # An explicit rate is used as given, with no search.
    seeds.clear()
    train(tmp_path / "fixed.pt", 10, "--variant", "pretrained", "--finetune-lr", "0.003")
    assert seeds == [cli_sinusoid.TEST_SEED]
    assert "SGD steps of 0.003" in capsys.readouterr().out


def test_diverged_tasks_are_counted_and_explained(monkeypatch):
    # Fine-tuning at a far too large rate blows up on every task: the mean stays as measured
    # (not finite), the cell is marked and the note gives the count.
    config = {"variant": "pretrained", "inner_lr": 0.01, "finetune_lr": 5.0}
    model = cli_sinusoid._build(config)
    table = cli_sinusoid.mse_table(model, num_tasks=8, query_points=10, seed=0)
    assert table[5, 0].diverged == 0 and table[5, 10].diverged == 8
    text = cli_sinusoid.format_table(table, "title")
    assert " [1] |" in text and "[1] K=5, 1 step: SGD diverged on 8 task(s)" in text
    # A rate that diverges on validation tasks is never chosen.
    monkeypatch.setattr(cli_sinusoid, "FINETUNE_GRID", (5.0, 0.01))
    assert cli_sinusoid.choose_finetune_lr(model, query_points=10, num_tasks=8) == 0.01


def test_plot_writes_the_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ckpt, png = tmp_path / "run.pt", tmp_path / "fig.png"
    train(ckpt, 3)
    main(["eval", "sinusoid", "--checkpoint", str(ckpt), "--test-tasks", "4", "--plot", str(png)])
    assert f"figure: {png}" in capsys.readouterr().out
    assert png.stat().st_size > 10_000


def test_plot_without_matplotlib_names_the_fix(tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    train(ckpt, 2)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match="--plot: the figure needs matplotlib"):
        main(["eval", "sinusoid", "--checkpoint", str(ckpt), "--test-tasks", "4", "--plot",
              str(tmp_path / "fig.png")])  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--iterations", "0"], "--iterations: expected a positive int, received 0"),
        (["--meta-batch", "-1"], "--meta-batch: expected a positive int, received -1"),
        (["--k-shot", "0"], "--k-shot: expected a positive int, received 0"),
        (["--inner-lr", "0"], "--inner-lr: expected a finite number > 0, received 0.0"),
        (["--log-every", "0"], "--log-every: expected a positive int, received 0"),
        (["--test-tasks", "0"], "--test-tasks: expected a positive int, received 0"),
        (["--query-points", "0"], "--query-points: expected a positive int, received 0"),
        (["--threads", "0"], "--threads: expected a positive int, received 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every: expected an int >= 0, received -1"),
        (["--lr", "nan"], "--lr: expected a finite number > 0, received nan"),
        (
            ["--finetune-lr", "0.01"],
            "--finetune-lr: only for --variant pretrained, received --variant aware",
        ),
        (
            ["--variant", "pretrained", "--finetune-lr", "-1"],
            "--finetune-lr: expected a finite number > 0, received -1.0",
        ),
    ],
)
def test_bad_flags_exit_with_a_clear_message(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train(tmp_path / "run.pt", 2, *flags)
    code = info.value.code
    assert message in (code if isinstance(code, str) else capsys.readouterr().err)
    assert not (tmp_path / "run.pt").exists()


def test_bad_variant_and_eval_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path / "run.pt", 2, "--variant", "nope")
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--checkpoint: expected an existing file"):
        main(["eval", "sinusoid", "--checkpoint", str(tmp_path / "none.pt")])
    other = tmp_path / "other.pt"
    torch.save({"config": {"variant": "aware", "n_way": 5}, "maml": {}, "step": 1}, other)
    with pytest.raises(ValueError, match="checkpoint: expected a pymeta-checkpoint file in"):
        main(["eval", "sinusoid", "--checkpoint", str(other)])
    ckpt = tmp_path / "run.pt"
    train(ckpt, 2)
    with pytest.raises(SystemExit, match="2"):
        main(["eval", "sinusoid", "--checkpoint", str(ckpt), "--test-tasks", "0"])
    assert "--test-tasks: expected a positive int, received 0" in capsys.readouterr().err
