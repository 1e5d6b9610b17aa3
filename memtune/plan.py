"""The Plan: what to change in a run, as YAML a person can edit.

```yaml
memtune_plan: 1
run: {script: examples/gpt.py, argv: [--steps, "20"], knobs: {--batch-size: 16}}
checkpoint: {blocks: [0, 1, 2]}
optimizer: {name: adamw8bit}
provenance: {...}           # written by `memtune tune`; ignored when applying
```

Top-level keys other than `memtune_plan`, `run` and `provenance` are strategy sections; each strategy
validates its own section (memtune/strategies). An absent section means "leave this as the script has it".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memtune.errors import PlanError

PLAN_VERSION = 1
RESERVED = ("memtune_plan", "run", "provenance")
RUN_KEYS = {"script": "path of the training script", "module": "module run with -m",
            "argv": "the script's arguments (list)", "knobs": "flag -> value overrides, e.g. {--batch-size: 16}"}


@dataclass
class Plan:
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # strategy name -> validated section
    run: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.sections.get(name)

    @property
    def lossy(self) -> list[str]:
        """Names of the sections that change the numbers (quantized states, compression, low rank...)."""
        from memtune.strategies import get_strategy

        return [n for n, s in self.sections.items() if get_strategy(n).lossy(s)]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"memtune_plan": PLAN_VERSION}
        if self.run:
            d["run"] = self.run
        d.update(copy.deepcopy(self.sections))
        if self.provenance:
            d["provenance"] = self.provenance
        return d

    def to_yaml(self) -> str:
        lossy = self.lossy
        head = "# memtune plan: apply with `memtune apply THIS_FILE`\n"
        if lossy:
            head += f"# LOSSY sections (change the numbers): {', '.join(lossy)}\n"
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        from memtune.io import write_text_atomic

        return write_text_atomic(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        from memtune.strategies import get_strategy, strategy_names

        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PlanError(f"{source} must be a YAML mapping of sections, e.g. `checkpoint: {{blocks: all}}`")
        version = data.get("memtune_plan", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"{source} is plan version {version}; this memtune reads version {PLAN_VERSION}")
        allowed = list(RESERVED) + strategy_names()
        sections: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if key in RESERVED:
                continue
            if key not in allowed:
                raise PlanError(f"{source}: unknown section {key!r}; allowed: {', '.join(allowed)}")
            sections[key] = get_strategy(key).validate(value)
        run = data.get("run") or {}
        if not isinstance(run, dict):
            raise PlanError(f"{source}: `run` must be a mapping with keys {', '.join(RUN_KEYS)}")
        check_keys(run, RUN_KEYS, f"{source}: run")
        plan = cls(sections=sections, run=dict(run), provenance=dict(data.get("provenance") or {}))
        check_conflicts(plan, source)
        return plan

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan {p} not found: check the path, or write one with `memtune tune`")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where else ""
            raise PlanError(f"{p} is not valid YAML{at}: fix the syntax") from None
        return cls.from_dict(data, source=str(p))


def check_keys(section: dict[str, Any], allowed: dict[str, str] | list[str], where: str) -> None:
    """Unknown key -> one-line error naming it and listing the allowed ones."""
    for k in section:
        if k not in allowed:
            raise PlanError(f"{where}: unknown key {k!r}; allowed: {', '.join(map(str, allowed))}")


def check_choice(value: Any, allowed: list[Any] | tuple[Any, ...], where: str) -> Any:
    # `type(a) is type(value)`: YAML's 1 must not pass for true, nor true for 1
    if not any(value == a and type(a) is type(value) for a in allowed):
        shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        raise PlanError(f"{where}: {value!r} is not allowed; choose one of: {shown}")
    return value


def check_bool(value: Any, where: str) -> bool:
    return check_choice(value, (True, False), where)


def check_conflicts(plan: Plan, source: str = "plan") -> None:
    """Cross-section rules each strategy declares (e.g. a block both recomputed and offloaded)."""
    from memtune.strategies import get_strategy

    for name, section in plan.sections.items():
        for problem in get_strategy(name).conflicts(plan, section):
            raise PlanError(f"{source}: {problem}")


# --- block references ------------------------------------------------------------------------------
# A plan names blocks as: "all" (every repeated block), an int i (the i-th repeated block, negative counts
# from the end), "a-b" (a range of repeated blocks, inclusive), or a module path ("lm_head").


def validate_block_refs(value: Any, where: str) -> list[int | str] | str:
    if value == "all":
        return "all"
    if isinstance(value, (int, str)):
        value = [value]
    if not isinstance(value, list):
        raise PlanError(f"{where}: give a list of block indices or module paths, or 'all'")
    out: list[int | str] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise PlanError(f"{where}: {v!r} is not a block; use an index, a range 'a-b' or a module path")
        out.append(v)
    return out


def resolve_block_refs(refs: list[int | str] | str, repeated: list[str], all_blocks: list[str], where: str) -> list[str]:
    """Block references -> module paths, in the given order of `all_blocks`."""
    if refs == "all":
        return list(repeated)
    chosen: set[str] = set()
    for r in refs:
        if isinstance(r, int):
            if not -len(repeated) <= r < len(repeated):
                raise PlanError(f"{where}: block {r} is out of range; the model has {len(repeated)} repeated blocks")
            chosen.add(repeated[r])
        elif "-" in r and all(p.strip().lstrip("-").isdigit() for p in r.split("-", 1)):
            a, b = (int(p) for p in r.split("-", 1))
            if not (0 <= a <= b < len(repeated)):
                raise PlanError(f"{where}: range {r!r} is out of range; the model has {len(repeated)} repeated blocks")
            chosen.update(repeated[a : b + 1])
        elif r in all_blocks:
            chosen.add(r)
        else:
            raise PlanError(f"{where}: no block {r!r}; blocks are 0..{len(repeated) - 1} or one of {all_blocks}")
    return [b for b in all_blocks if b in chosen]


def block_ref_keys(refs: list[int | str]) -> set[int | str]:
    """Block references as comparable keys without the model: 'a-b' ranges expand to their indices.
    (A negative index or a module path that aliases an index is only caught once the model is known.)"""
    out: set[int | str] = set()
    for r in refs:
        if isinstance(r, str) and "-" in r and all(x.strip().isdigit() for x in r.split("-", 1)):
            a, b = (int(x) for x in r.split("-", 1))
            out.update(range(a, b + 1))
        else:
            out.add(r)
    return out


def shared_block_refs(a: list[int | str] | str, b: list[int | str] | str) -> set[int | str]:
    """What two sections' block references both name ('all' is every repeated block, so it shares each index)."""
    if a == "all" and b == "all":
        return {"all"}
    if a == "all" or b == "all":
        other = b if a == "all" else a
        return {r for r in block_ref_keys(other) if isinstance(r, int)}
    return block_ref_keys(a) & block_ref_keys(b)
