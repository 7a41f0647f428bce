import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): the relative error used by the parity tests."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale)
