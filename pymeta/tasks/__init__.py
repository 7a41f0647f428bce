"""Task samplers that produce ``pymeta.TaskBatch``es."""

from pymeta.tasks.few_shot import FewShot
from pymeta.tasks.sinusoid import Sinusoid

__all__ = ["FewShot", "Sinusoid"]
