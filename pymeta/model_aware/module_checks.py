"""The leaves of an nn.Sequential as the model-aware core will run them, and the one check that
the core computes the network that ``model(x)`` computes: no hooks, no subclasses of the layer
types, no shared layers with parameters, no tied parameters. The graph reader (``net_spec``)
calls them."""

from __future__ import annotations

from torch import nn

# Every layer type the graph reader knows (net_spec's list). Other types get its own "not
# supported" errors.
CORE_LAYER_TYPES = (
    nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Tanh,
    nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
)  # fmt: skip
_GLOBAL_HOOKS = {
    "_global_forward_hooks": "forward hook (register_module_forward_hook)",
    "_global_forward_pre_hooks": "forward pre-hook (register_module_forward_pre_hook)",
    "_global_backward_hooks": "backward hook (register_module_full_backward_hook)",
    "_global_backward_pre_hooks": "backward pre-hook (register_module_backward_pre_hook)",
}
_MODULE_HOOKS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}
_USE_MAML = "use pymeta.MAML, which runs the module itself"


def _check_no_global_hooks() -> None:
    module_module = nn.modules.module
    for attr, what in _GLOBAL_HOOKS.items():
        if getattr(module_module, attr, None):
            raise ValueError(
                f"model: a global {what} is registered, which ModelAwareMAML's core would not "
                f"run; remove it or {_USE_MAML}"
            )


def check_no_hooks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Raises ValueError naming the module for a global hook, a hook on any module of the
    model, or a forward set on an instance: the graph reader (``net_spec``) would not see them.
    Returns the (name, module) pairs it walked (duplicates included)."""
    _check_no_global_hooks()
    walked = list(model.named_modules(remove_duplicate=False))
    for name, module in walked:
        _check_runs_as_is(name, module)
    return walked


def _where(name: str, module) -> str:
    return f"model{'.' if name else ''}{name} ({type(module).__name__})"


def _check_runs_as_is(name: str, module: nn.Module) -> None:
    """No hooks and no forward other than the class's own."""
    state = vars(module)
    for attr, what in _MODULE_HOOKS.items():
        if state.get(attr):
            raise ValueError(
                f"{_where(name, module)}: has a {what}, which ModelAwareMAML's core would not "
                f"run; remove it or {_USE_MAML}"
            )
    if "forward" in state:
        raise ValueError(
            f"{_where(name, module)}: overrides forward on the instance, which ModelAwareMAML's "
            f"core would not run; {_USE_MAML}"
        )


def check_sharing(leaves: list) -> None:
    """Parameterless layers may be used twice (the core runs them twice, exactly); a layer
    with parameters or batch-norm statistics may not, and neither may a tied Parameter: the core
    gives every use of a layer its own parameters and statistics."""
    seen_module: dict[int, str] = {}
    seen_param: dict[int, str] = {}
    for name, child in leaves:
        if child is None:
            continue
        # Leaves are exact layer types without submodules: their _parameters are all they hold.
        params = [(a, p) for a, p in child._parameters.items() if p is not None]
        if id(child) in seen_module:
            if params or isinstance(child, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"model.{seen_module[id(child)]} and model.{name} are the same "
                    f"nn.{type(child).__name__} (one module used twice); ModelAwareMAML's core "
                    f"gives every use its own parameters and statistics, so shared layers are "
                    f"not supported; {_USE_MAML}"
                )
            continue
        seen_module[id(child)] = name
        for attr, p in params:
            qual = f"{name}.{attr}"
            if id(p) in seen_param:
                raise ValueError(
                    f"model.{seen_param[id(p)]} and model.{qual} are the same Parameter (tied "
                    f"weights); ModelAwareMAML's core gives every layer its own parameters; "
                    f"{_USE_MAML}"
                )
            seen_param[id(p)] = qual
