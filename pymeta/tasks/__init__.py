"""Task samplers that produce ``pymeta.TaskBatch``es."""

from pymeta.tasks.sinusoid import Sinusoid

__all__ = ["Sinusoid"]
