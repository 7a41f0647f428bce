"""Model-aware MAML: the whole inner loop and the exact meta-gradient in the compiled core.

Modules, in the order a call goes through them:
    maml: ``ModelAwareMAML``, the learner users build.
    net_spec: reads a module (by ``torch.fx``) into the graph of layers the core runs.
    module_checks: what the reader refuses because the core would not reproduce it (hooks,
        subclasses, shared layers, tied parameters).
    encoding: the core's codes and layer layout, read from the compiled core.
    bn_running_stats: per-step batch norm running statistics (MAML++).
    compiled_step: ``maml.compile_step(optimizer)``, the meta-training step in one call.

The core itself is ``torch.ops.pymeta.net_maml_loss`` / ``net_adapt`` (csrc/net/).
"""

from pymeta.model_aware.bn_running_stats import BnRunningStats
from pymeta.model_aware.compiled_step import CompiledStep
from pymeta.model_aware.maml import LR_MODES, ModelAwareMAML

__all__ = ["ModelAwareMAML", "BnRunningStats", "CompiledStep", "LR_MODES"]
