"""pymeta: gradient-based meta-learning (MAML) for PyTorch with a compiled core."""

from pymeta import _ops  # noqa: F401  (registers torch.ops.pymeta.*)
