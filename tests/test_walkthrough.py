"""examples/walkthrough.py in a reduced form: both variants meta-train, adapt to new tasks one at
a time and print each task's loss; adaptation helps and the two variants agree."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.py"


@pytest.fixture
def walkthrough():
    spec = importlib.util.spec_from_file_location("walkthrough", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets one thread


def test_walkthrough_reduced(walkthrough, capsys):
    result = walkthrough.main(iterations=30, tasks=3)
    out = capsys.readouterr().out
    assert "=== pymeta.MAML ===" in out and "=== pymeta.ModelAwareMAML ===" in out
    assert out.count("task 3: query loss") == 2 and "task 4" not in out
    for variant in ("MAML", "ModelAwareMAML"):
        r = result[variant]
        assert len(r["before"]) == len(r["after"]) == 3
        # Adapting on the support set helps on every task's query set ...
        assert all(a < 0.5 * b for a, b in zip(r["after"], r["before"]))
        # ... and more from the meta-learned weights than from the random initial ones.
        assert sum(r["after"]) < sum(r["untrained_after"])
    # Same initial weights, tasks and algorithm: the two implementations agree.
    torch.testing.assert_close(
        torch.tensor(result["MAML"]["after"]),
        torch.tensor(result["ModelAwareMAML"]["after"]),
        rtol=2e-3,
        atol=1e-4,
    )


def test_task_family_shapes_and_labels(walkthrough):
    family = walkthrough.ShuffledClusters(k_support=2, k_query=3)
    batch = family.sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 20, 10) and batch.query_x.shape == (4, 30, 10)
    assert batch.support_y.shape == (4, 20) and batch.support_y.dtype == torch.int64
    assert torch.equal(batch.query_y[0].bincount(), torch.full((10,), 3))
    # Without noise or shift every example is a shared centre, and each task shuffles which
    # label sits at which centre.
    exact = walkthrough.ShuffledClusters(k_support=1, k_query=1, noise=0.0, shift=0.0)
    batch = exact.sample(6, torch.Generator().manual_seed(0))
    centre_of = torch.cdist(batch.support_x, exact.centres).argmin(-1)  # (6 tasks, 10 labels)
    assert torch.allclose(batch.support_x, exact.centres[centre_of])
    assert all(sorted(row.tolist()) == list(range(10)) for row in centre_of)
    assert len({tuple(row.tolist()) for row in centre_of}) == 6
