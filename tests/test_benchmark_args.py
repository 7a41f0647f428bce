"""The A/B benchmark scripts refuse settings they cannot measure with, naming the argument."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("script", ["winograd_conv", "conv_weight_grad", "batched_gemm"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "1"], "--repeats: expected >= 2, received 1"),
        (["--threads", "0"], "--threads: expected >= 1, received 0"),
    ],
)
def test_bad_settings_are_refused_before_any_timing(script, args, message, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "1"], "--repeats: expected >= 2, received 1"),
        (["--meta-steps", "0"], "--meta-steps: expected >= 1, received 0"),
    ],
)
def test_resnet12_step_refuses_settings_before_any_child(args, message, capsys):
    module = __import__("resnet12_step")
    with pytest.raises(SystemExit) as exit_info:
        module.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
