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

import contextlib
import copy
import dataclasses
import re
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
    # the file it was read from (relative paths in `run` and `provenance` are looked up beside it first)
    source: str | None = field(default=None, compare=False, repr=False)

    def beside(self, path: str | None) -> str | None:
        """A relative path the plan names, resolved against the plan file's folder when it exists there;
        otherwise as written (the current folder)."""
        if not isinstance(path, str) or not path or self.source is None or Path(path).is_absolute():
            return path
        cand = Path(self.source).parent / path
        return str(cand) if cand.exists() else path

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


class _PlanLoader(yaml.SafeLoader):
    """Safe YAML that also refuses a key given twice in one mapping (YAML would keep the last silently)."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


def _mapping(loader: _PlanLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for k_node, _ in node.value:
        if k_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults` may override keys on purpose
        key = loader.construct_object(k_node, deep=True)
        with contextlib.suppress(TypeError):  # an unhashable key: construct_mapping says so
            if key in seen:
                raise _DuplicateKey(key, k_node.start_mark.line + 1, seen[key])
            seen[key] = k_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_PlanLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_plan_text(text: str, source: str = "plan") -> Any:
    """Plan YAML -> Python data (not validated), or one PlanError naming the line."""
    try:
        return yaml.load(text, Loader=_PlanLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as e:
        raise PlanError(f"{source}: key {e.key!r} is given twice (line {e.first} and line {e.line}): keep one") from None
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}" if mark else ""
        tag = str(getattr(e, "problem", "") or "")
        m = re.search(r"tag '([^']*)'", tag)
        name = m.group(1).replace("tag:yaml.org,2002:", "!!") if m else "?"
        if "python/" in name:
            raise PlanError(f"{source}: the tag {name}{at} is refused as unsafe (it would build Python objects): "
                            "a plan is plain YAML; remove the tag") from None
        raise PlanError(f"{source}: {' '.join(str(e).split())[:200]}; a plan is plain YAML without tags") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        problem = getattr(e, "problem", None)
        why = f" ({problem})" if problem else ""
        raise PlanError(f"{source} is not valid YAML{at}{why}: fix the syntax") from None


def read_plan_file(path: str | Path) -> Any:
    """The YAML of a plan file, parsed (not validated)."""
    p = Path(path)
    if p.is_dir():
        raise PlanError(f"plan {p} is a directory: give the plan file, e.g. {p / 'plan.yaml'}")
    if not p.is_file():
        raise PlanError(f"plan {p} not found: check the path, or write one with `memtune tune`")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PlanError(f"cannot read plan {p} ({e.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise PlanError(f"{p} is not a text file (binary content): give a plan.yaml written by `memtune tune` "
                        "or by hand")
    return parse_plan_text(text, str(p))


def split_document(data: Any, source: str = "plan") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(raw sections, run, provenance) of a plan document, its version and `run` section checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlanError(f"{source} must be a YAML mapping of sections, e.g. `checkpoint: {{blocks: all}}`")
    for k in data:
        if not isinstance(k, str):
            raise PlanError(f"{source}: section names are words, got {k!r}")
    version = data.get("memtune_plan", PLAN_VERSION)
    if version != PLAN_VERSION or isinstance(version, bool):
        raise PlanError(f"{source} is plan version {version!r}; this memtune reads version {PLAN_VERSION}")
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise PlanError(f"{source}: `run` must be a mapping with keys {', '.join(RUN_KEYS)}")
    check_keys(run, RUN_KEYS, f"{source}: run")
    check_run(run, f"{source}: run")
    prov = data.get("provenance") or {}
    if not isinstance(prov, dict):
        raise PlanError(f"{source}: `provenance` must be a mapping (memtune tune writes it; it can be left out)")
    sections = {k: v for k, v in data.items() if k not in RESERVED}
    return sections, dict(run), dict(prov)


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def check_run(run: dict[str, Any], where: str) -> None:
    """The `run` section's values have the types it says: a script or module name, argv a list of arguments,
    knobs a mapping of flags to values."""
    for k in ("script", "module"):
        v = run.get(k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise PlanError(f"{where}.{k} must be a {RUN_KEYS[k]} (a string), got {v!r}")
    if run.get("script") and run.get("module"):
        raise PlanError(f"{where}: give script or module, not both")
    argv = run.get("argv")
    if argv is not None:
        if isinstance(argv, str):
            raise PlanError(f"{where}.argv must be a list of arguments, e.g. [--steps, '20'], not a string "
                            f"({argv!r}): write each argument as an item")
        if not isinstance(argv, list) or not all(_scalar(a) for a in argv):
            raise PlanError(f"{where}.argv must be a list of arguments (strings or numbers), e.g. [--steps, '20'], "
                            f"got {argv!r}")
    knobs = run.get("knobs")
    if knobs is not None:
        if not isinstance(knobs, dict):
            raise PlanError(f"{where}.knobs must be a mapping of flag to value, e.g. {{--batch-size: 16}}, got {knobs!r}")
        for flag, v in knobs.items():
            if not isinstance(flag, str) or not _scalar(v):
                raise PlanError(f"{where}.knobs: {flag!r}: {v!r} must be a flag (string) and a value (string or "
                                "number), e.g. {--batch-size: 16}")


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
