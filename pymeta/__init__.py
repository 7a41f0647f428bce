"""pymeta: gradient-based meta-learning (MAML) for PyTorch with a compiled core.

Public API:
    TaskBatch: a meta-batch of tasks, task dimension first.
    MAML: model-agnostic MAML around any nn.Module.
    ModelAwareMAML: MAML on MLPs, conv nets and residual networks (any module of supported
        layers) with the inner loop and exact meta-gradient in the compiled core.
    BnRunningStats: its per-step batch norm running statistics (MAML++, track_bn_stats).
    baselines: the non-meta-learned baseline (Pretrained: pretrain, then fine-tune per task).
    tasks: task samplers (Sinusoid, FewShot).
    datasets: Omniglot and its image loader.
    models: standard networks (conv4, resnet12).
    memory: retain_freed_memory (reuse freed activations instead of faulting pages in) and
        the model-aware core's own workspace cache.
    ops: the fused, task-batched functional ops (``torch.ops.pymeta.*``).
"""

from pymeta import _ops  # noqa: F401, I001  (first: registers torch.ops.pymeta.*)
from pymeta import baselines, datasets, memory, models, ops, reference, tasks
from pymeta._ops import HAS_COMPILED_CORE
from pymeta.adapted import AdaptedModel
from pymeta.learner import Learner
from pymeta.maml import MAML
from pymeta.model_aware import BnRunningStats, ModelAwareMAML
from pymeta.task_batch import TaskBatch

__version__ = "0.1.0"
__all__ = [
    "MAML",
    "ModelAwareMAML",
    "TaskBatch",
    "AdaptedModel",
    "BnRunningStats",
    "baselines",
    "Learner",
    "ops",
    "reference",
    "tasks",
    "datasets",
    "models",
    "memory",
    "HAS_COMPILED_CORE",
    "__version__",
]
