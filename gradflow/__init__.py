"""gradflow: measure how gradients flow through deep stacks of recurrent cells.

The package reads bottom-up: ``cells`` -> ``Stack`` -> measurements (``jacobian``, ``gates``;
``models`` builds other frameworks' models for them) -> ``results`` -> ``plot`` / ``cli``;
training (``tasks``, ``train``) sits beside them.

Names are loaded on first use (module ``__getattr__``, PEP 562): ``import gradflow`` costs
nothing, and ``gradflow --help`` answers without importing JAX; ``gradflow.Stack`` or
``from gradflow import gradient_map`` imports what it needs.
"""
import importlib as _importlib

__version__ = "0.1.0"

# name -> the submodule that defines it
_ATTRS = {
    "gradient_map": "jacobian", "jacobian_map": "jacobian", "local_gains": "jacobian",
    "model_map": "jacobian", "model_jacobian_map": "jacobian", "tap": "jacobian",
    "Problem": "problem",
    "Result": "results", "load": "results",
    "Stack": "stack", "StackOutput": "stack", "from_torch": "stack", "torch_model": "models",
}
# every module a user may reach as gradflow.<module> after a bare `import gradflow`
# (gradflow.problem is the module, callable as its function problem(), whatever was imported
# first: `import gradflow.problem as P` and `from gradflow import problem` give one object)
_SUBMODULES = ("atlas", "atlas_training", "cells", "checks", "cli", "cost", "errors",
               "experiments", "gates", "jacobian", "linalg", "models", "parallel", "plot",
               "problem", "registry", "reproduce", "results", "runs", "seeds", "stack", "sweep",
               "tasks", "train", "views", "xla")

__all__ = ["cells", "gates", "jacobian", "results", "tasks", "train", "Stack", "StackOutput",
           "Problem", "problem", "gradient_map", "jacobian_map", "local_gains", "model_map",
           "model_jacobian_map", "tap", "from_torch", "torch_model", "Result", "load",
           "__version__"]


def __getattr__(name):
    if name in _ATTRS:
        value = getattr(_importlib.import_module(f"gradflow.{_ATTRS[name]}"), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f"gradflow.{name}")
    else:
        raise AttributeError(f"module 'gradflow' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
