"""Strategies: one module each, registered by name (the plan section it reads).

Adding a strategy = adding its module and its name to `_MODULES`. Modules import lazily so the CLI starts
fast and Triton is only imported when a kernel-backed strategy is used.
"""

from __future__ import annotations

import importlib

from memtune.errors import PlanError
from memtune.strategies.base import _REGISTRY, ApplyContext, BlockRef, SearchOptions, Strategy, register

# module names under memtune.strategies (append yours)
_MODULES: list[str] = ["precision", "checkpoint", "offload", "sharding", "optimizers", "loss", "compress"]

__all__ = ["ApplyContext", "BlockRef", "SearchOptions", "Strategy", "all_strategies", "get_strategy",
           "register", "strategy_names"]

_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        for m in _MODULES:
            importlib.import_module(f"memtune.strategies.{m}")
        _loaded = True


def strategy_names() -> list[str]:
    _load()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def all_strategies() -> list[Strategy]:
    return [_REGISTRY[n] for n in strategy_names()]


def get_strategy(name: str) -> Strategy:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PlanError(f"unknown strategy {name!r}; known: {', '.join(strategy_names())}") from None
