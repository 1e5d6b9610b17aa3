"""The Plan document: what to change in a run, as YAML a person can edit.

```yaml
memtune_plan: 1
run: {script: examples/gpt.py, argv: [--steps, "20"], knobs: {--batch-size: 16}}
checkpoint: {blocks: [0, 1, 2]}
optimizer: {name: adamw8bit}
provenance: {...}           # written by `memtune tune`; ignored when applying
```

Top-level keys other than `memtune_plan`, `run` and `provenance` are strategy sections. This module is the
document only: reading and writing it, the `run` section, and the small checks sections are made of. Each
strategy validates its own section into a frozen `SectionConfig` (memtune/strategies); `load_plan` there
turns a document into a validated Plan. An absent section means "leave this as the script has it".
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from memtune.errors import PlanError

PLAN_VERSION = 1
RESERVED = ("memtune_plan", "run", "provenance")
RUN_KEYS = {"script": "path of the training script", "module": "module run with -m",
            "argv": "the script's arguments (list)", "knobs": "flag -> value overrides, e.g. {--batch-size: 16}"}


class SectionConfig:
    """A validated plan section: strategies subclass it as frozen dataclasses.

    `to_dict()` gives the section as YAML writes it (fields left at None are omitted, tuples become
    lists); `lossy` says whether it changes the numbers; `describe()` is one line for tables."""

    strategy: ClassVar[str] = ""

    @property
    def lossy(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f.name] = _plain(v)
        return out

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


@dataclass
class Plan:
    sections: dict[str, SectionConfig] = field(default_factory=dict)  # strategy name -> validated section
    run: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        return self.sections.get(name)

    @property
    def lossy(self) -> list[str]:
        """Names of the sections that change the numbers (quantized states, compression, low rank...)."""
        return [n for n, s in self.sections.items() if s.lossy]

    def section_dicts(self) -> dict[str, dict[str, Any]]:
        return {n: s.to_dict() for n, s in self.sections.items()}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"memtune_plan": PLAN_VERSION}
        if self.run:
            d["run"] = copy.deepcopy(self.run)
        d.update(self.section_dicts())
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


def read_plan_file(path: str | Path) -> Any:
    """The YAML of a plan file, parsed (not validated)."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan {p} not found: check the path, or write one with `memtune tune`")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise PlanError(f"{p} is not valid YAML{at}: fix the syntax") from None


def split_document(data: Any, source: str = "plan") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(raw sections, run, provenance) of a plan document, its version and `run` section checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlanError(f"{source} must be a YAML mapping of sections, e.g. `checkpoint: {{blocks: all}}`")
    version = data.get("memtune_plan", PLAN_VERSION)
    if version != PLAN_VERSION:
        raise PlanError(f"{source} is plan version {version}; this memtune reads version {PLAN_VERSION}")
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise PlanError(f"{source}: `run` must be a mapping with keys {', '.join(RUN_KEYS)}")
    check_keys(run, RUN_KEYS, f"{source}: run")
    sections = {k: v for k, v in data.items() if k not in RESERVED}
    return sections, dict(run), dict(data.get("provenance") or {})


# --- checks sections are made of ---------------------------------------------------------------------


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
