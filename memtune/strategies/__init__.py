"""Strategies: one module (or small package) each, registered by the plan section it reads, plus what
they share: the block layout (layout.py), the saved-tensor pipeline (saved_tensors.py) and the contract
(base.py).

This package also turns a plan document into a validated Plan (`load_plan`, `plan_from_dict`): each
section validated by its strategy, then the cross-section rules (`check_plan`: one layout check for
per-block modes, then each strategy's `conflicts` over the typed `PlanFacts`).

Adding a strategy = adding its module and its name to `_MODULES`. Modules import lazily so the CLI starts
fast and Triton is only imported when a kernel-backed strategy is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from memtune.errors import PlanError
from memtune.plan import RESERVED, Plan, SectionConfig, read_plan_file, split_document
from memtune.strategies.base import _REGISTRY, Strategy, register
from memtune.strategies.context import ApplyContext, PlanFacts, SearchOptions

# module names under memtune.strategies (append yours)
_MODULES: list[str] = ["precision", "checkpoint", "offload", "sharding", "optimizers", "loss", "compress", "weights",
                       "placement"]

__all__ = ["ApplyContext", "PlanFacts", "SearchOptions", "Strategy", "all_strategies", "check_plan", "describe_plan",
           "get_strategy", "load_plan", "make_context", "ordered_sections", "plan_facts", "plan_from_dict", "register",
           "strategy_names"]

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


# --- plans ------------------------------------------------------------------------------------------------


def ordered_sections(plan: Plan) -> list[tuple[str, SectionConfig]]:
    """The plan's sections in apply (and effect) order."""
    return sorted(plan.sections.items(), key=lambda kv: (get_strategy(kv[0]).order, kv[0]))


def plan_facts(plan: Plan) -> PlanFacts:
    facts = PlanFacts()
    for name, cfg in ordered_sections(plan):
        get_strategy(name).declare(cfg, facts)
    return facts


def check_plan(plan: Plan, source: str = "plan") -> None:
    """Cross-section rules: blocks given modes that do not compose, then each strategy's own."""
    from memtune.strategies.layout import check_refs

    for problem in check_refs(plan):
        raise PlanError(f"{source}: {problem}")
    facts = plan_facts(plan)
    for name, cfg in ordered_sections(plan):
        for problem in get_strategy(name).conflicts(cfg, facts):
            raise PlanError(f"{source}: {problem}")


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    """A plan document (parsed YAML) -> a validated Plan."""
    raw, run, provenance = split_document(data, source)
    allowed = list(RESERVED) + strategy_names()
    sections: dict[str, SectionConfig] = {}
    for key, value in raw.items():
        if key not in allowed:
            raise PlanError(f"{source}: unknown section {key!r}; allowed: {', '.join(allowed)}")
        sections[key] = get_strategy(key).validate(value)
    plan = Plan(sections=sections, run=run, provenance=provenance)
    check_plan(plan, source)
    return plan


def load_plan(plan: Plan | dict | str | Path) -> Plan:
    """A Plan from a Plan, a document dict or a plan file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return plan_from_dict(plan)
    p = plan_from_dict(read_plan_file(plan), source=str(plan))
    p.source = str(plan)
    return p


def describe_plan(plan: Plan, knob: str | None = None) -> str:
    """One line for tables: each section's description, lossy ones labelled."""
    parts = [f"{name}: {cfg.describe()}" + (" [LOSSY]" if cfg.lossy else "") for name, cfg in plan.sections.items()]
    if knob and plan.run.get("knobs", {}).get(knob) is not None:
        parts.append(f"{knob} {plan.run['knobs'][knob]}")
    return "; ".join(parts) or "unchanged (baseline)"


def make_context(model: Any, optimizers: list[Any], blocks: list[Any], device: Any, plan: Plan,
                 profile: Any = None, models: list[Any] | None = None) -> ApplyContext:
    """The ApplyContext of one run: the plan's typed facts, and its block layout resolved against the live
    blocks (PlanError for a block given clashing modes, before anything changes)."""
    from memtune.strategies.layout import resolve_layout

    repeated = [b.name for b in blocks if b.kind == "repeated"]
    return ApplyContext(model=model, optimizers=list(optimizers), blocks=list(blocks), device=device, plan=plan,
                        profile=profile, facts=plan_facts(plan), models=list(models or []),
                        layout=resolve_layout(plan, repeated, [b.name for b in blocks]))
