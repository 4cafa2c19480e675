"""The method table: method name -> the module that defines it. Each module defines one `Method` subclass and an
instance of it named `METHOD`; the contract (declarations, hooks, how to add a method) is methods/contract.py.

Modules load on first use, so `tunelab --help` and config checks import only the method a run names.
"""

from __future__ import annotations

import importlib

from tunelab.errors import UserError, suggest
from tunelab.methods.contract import Method

METHODS: dict[str, str | Method] = {
    "sft": "tunelab.methods.sft",
    "dpo": "tunelab.methods.dpo",
    "orpo": "tunelab.methods.orpo",
    "kto": "tunelab.methods.kto",
    "simpo": "tunelab.methods.simpo",
    "reward": "tunelab.methods.reward",
    "grpo": "tunelab.methods.grpo",
    "ppo": "tunelab.methods.ppo",
    "distill": "tunelab.methods.distill",
}


def register(name: str, method: Method) -> None:
    """Add a method defined outside this package (a plugin, a test) to the table."""
    if not isinstance(method, Method):
        raise TypeError(f"{name}: a method is an instance of tunelab.methods.contract.Method")
    METHODS[name] = method


def get(name: str) -> Method:
    """The method called `name` (a UserError naming the nearest known one otherwise)."""
    entry = METHODS.get(name)
    if entry is None:
        raise UserError(f"unknown method '{name}'{suggest(name, METHODS)}; known: {', '.join(METHODS)}")
    if isinstance(entry, str):
        entry = METHODS[name] = importlib.import_module(entry).METHOD
    return entry


def options(cfg):
    """The run's method and its typed options, checked against the method's Config and its accepted adapters."""
    from pydantic import ValidationError

    from tunelab.config import explain_validation_error

    method = get(cfg.method.name)
    try:
        opts = method.options(cfg.method.options())
    except ValidationError as e:
        raise UserError(explain_validation_error(e, prefix="method", model=method.Config)) from None
    method.check_adapter(cfg.method.name, cfg.adapter.type)
    if cfg.training.activation_offloading is True and not method.activation_offloading:
        able = ", ".join(n for n in METHODS if get(n).activation_offloading)
        raise UserError(f"config key 'training.activation_offloading': method '{cfg.method.name}' cannot offload "
                        f"activations (its trainer has no such option; methods that can: {able}); set it to auto "
                        "or false")
    return method, opts
