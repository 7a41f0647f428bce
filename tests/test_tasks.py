import math

import torch

import pymeta


def test_sinusoid_shapes_ranges_and_determinism():
    tasks = pymeta.tasks.Sinusoid(k_support=10, k_query=7)
    batch = tasks.sample(64, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (64, 10, 1) and batch.query_y.shape == (64, 7, 1)
    assert batch.support_x.dtype == torch.float32
    for x in (batch.support_x, batch.query_x):
        assert float(x.min()) >= -5 and float(x.max()) <= 5
    assert float(batch.support_y.abs().max()) <= 5.0
    again = tasks.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(batch.support_y, again.support_y)


def test_sinusoid_targets_follow_amplitude_and_phase():
    tasks = pymeta.tasks.Sinusoid(k_support=5, k_query=5, dtype=torch.float64)
    amp, phase = tasks.sample_functions(1000, torch.Generator().manual_seed(1))
    assert 0.1 <= float(amp.min()) and float(amp.max()) <= 5.0
    assert 0.0 <= float(phase.min()) and float(phase.max()) <= math.pi
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    batch = tasks.sample(8, g1)
    amp, phase = tasks.sample_functions(8, g2)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    torch.testing.assert_close(y, amp * torch.sin(x - phase))


def test_task_batch_slicing_and_to():
    batch = pymeta.tasks.Sinusoid().sample(5, torch.Generator().manual_seed(0))
    assert batch[1:3].num_tasks == 2 and len(batch[-1]) == 1
    assert batch.to(dtype=torch.float64).support_x.dtype == torch.float64
