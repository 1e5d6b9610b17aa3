"""The block layout: one mode per block, shared by the block strategies.

Modes: keep (as the script has it), recompute and selective (checkpoint), offload, compress, and
compress+offload (the codec runs first, then the compressed bytes go to the host). Each section states the
modes it gives its blocks (`Strategy.block_modes`); `combine` merges them per block, and a block that two
sections give modes that do not compose is refused here, once, for the document (`check_refs`, before the
model is known), the profile (the cost model) and the live run (the patcher).

The tuner proposes a whole layout per trial (`propose`) and the block strategies' `space` read their blocks
from it, so compression can be searched together with recompute and offload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memtune.blocks import resolve_block_refs, shared_block_refs
from memtune.errors import PlanError
from memtune.strategies.context import Layout

if TYPE_CHECKING:
    from memtune.plan import Plan
    from memtune.profile import Profile
    from memtune.strategies.context import SearchOptions

MODES = ("keep", "recompute", "selective", "offload", "compress", "compress+offload")
RECOMPUTE = ("recompute", "selective")
OFFLOADED = ("offload", "compress+offload")
COMPRESSED = ("compress", "compress+offload")
LOSSY_MODES = COMPRESSED
# modes two sections may give one block, and what they make together
_COMPOSE = {frozenset({"compress", "offload"}): "compress+offload"}


def combine(a: str, b: str) -> str | None:
    """The mode of a block two sections name, or None when the two do not compose."""
    if a == b or b == "keep":
        return a
    if a == "keep":
        return b
    return _COMPOSE.get(frozenset({a, b}))


def _section_modes(plan: Plan) -> list[tuple[str, str, Any]]:
    """(section, mode, block references) for every per-block mode the plan's sections ask for."""
    from memtune.strategies import get_strategy

    out = []
    for name, cfg in plan.sections.items():
        for mode, refs in get_strategy(name).block_modes(cfg).items():
            if refs and refs != ():
                out.append((name, mode, refs))
    return out


def _explain(sa: str, ma: str, sb: str, mb: str, blocks: Iterable[Any]) -> str:
    shown = sorted(blocks, key=str)
    if {ma, mb} & set(RECOMPUTE):
        why = "a recomputed block saves nothing to offload or compress"
    else:
        why = "those modes do not compose"
    return (f"block(s) {shown} are given two modes: {ma} ({sa}) and {mb} ({sb}); {why}: choose one mode per "
            "block")


def check_refs(plan: Plan) -> list[str]:
    """Conflicts visible without the model (references compared as written; ranges expanded)."""
    asks = _section_modes(plan)
    problems = []
    for i, (sa, ma, ra) in enumerate(asks):
        for sb, mb, rb in asks[i + 1:]:
            if sa == sb or combine(ma, mb) is not None:
                continue
            both = shared_block_refs(ra, rb)
            if both:
                problems.append(_explain(sa, ma, sb, mb, both))
    return problems


def resolve_layout(plan: Plan, repeated: list[str], all_blocks: list[str]) -> Layout:
    """Each block's mode once the model's blocks are known; PlanError for a block given clashing modes."""
    modes: dict[str, str] = {}
    owner: dict[str, tuple[str, str]] = {}
    for section, mode, refs in _section_modes(plan):
        for name in resolve_block_refs(refs, repeated, all_blocks, f"{section} blocks"):
            prev = modes.get(name, "keep")
            merged = combine(prev, mode)
            if merged is None:
                sa, ma = owner[name]
                raise PlanError(_explain(sa, ma, section, mode, [name]))
            modes[name] = merged
            owner.setdefault(name, (section, mode))
    order = {n: i for i, n in enumerate(all_blocks)}
    return Layout(dict(sorted(modes.items(), key=lambda kv: order.get(kv[0], len(order)))))


def profile_layout(plan: Plan, profile: Profile) -> Layout:
    return resolve_layout(plan, [b.name for b in profile.repeated_blocks], [b.name for b in profile.blocks])


# --- the tuner's proposal ---------------------------------------------------------------------------------

# Forward order of the repeated blocks in a proposed layout: offloaded blocks first (their copies have the
# most forward compute after them to hide behind, and come back last in backward: on an H100, 1.1B Llama,
# docs/strategies.md, the first 5 of 22 hid 94% of their transfer time, every 3rd block only 78%), then
# compressed-and-offloaded, then compressed; recomputed blocks are the last ones, the rest kept.
_FRONT = ("offload", "compress+offload", "compress")


@dataclass
class Proposal:
    """One trial's layout as block references (repeated indices or module paths) by mode."""

    refs: dict[str, list[int | str]] = field(default_factory=dict)
    recompute_mode: str = "full"

    def blocks(self, *modes: str) -> list[int | str]:
        return [r for m in modes for r in self.refs.get(m, [])]


def available_modes(profile: Profile, opts: SearchOptions) -> list[str]:
    """The per-block modes the registered strategies can give here (offload needs CUDA; compress is lossy)."""
    from memtune.strategies import strategy_names

    have = set(strategy_names())
    out = []
    if "checkpoint" in have:
        out.append("recompute")
    if "offload" in have and opts.device == "cuda":
        out.append("offload")
    if "compress" in have and not opts.lossless_only:
        out.append("compress")
        if "offload" in have and opts.device == "cuda":
            out.append("compress+offload")
    return out


# Without repeated blocks (an LSTM LM, a GAN's Sequentials) a block is worth a choice when it saves this share
# of what all blocks save: lstm_lm's `rnn` saves 4.7 of 5.1 MB at its tiny size.
ALONE_SHARE = 0.1


def exception_blocks(profile: Profile) -> list[str]:
    """Non-repeated blocks worth a choice of their own: those saving at least a median repeated block, or,
    when the model has no repeated blocks, a tenth of what the blocks save."""
    acts = sorted(b.activation_bytes for b in profile.repeated_blocks)
    if acts:
        floor = acts[len(acts) // 2]
    else:
        floor = int(ALONE_SHARE * sum(b.activation_bytes for b in profile.blocks))
    return [b.name for b in profile.blocks if b.kind != "repeated" and b.activation_bytes >= max(1, floor)]


def propose(trial: Any, profile: Profile, opts: SearchOptions) -> Proposal:
    """This trial's layout. Parameters: `blocks.<mode>` = how many repeated blocks get the mode (clipped to
    what the modes before it left: offload, compress+offload and compress count from the first block,
    recompute from the last; offloaded blocks at most all but one), `blocks.recompute.mode` (full or
    selective), and `blocks.other.<path>` = the mode of each large non-repeated block (e.g. an LM head).
    Idempotent within a trial."""
    modes = available_modes(profile, opts)
    n = len(profile.repeated_blocks)
    prop = Proposal()
    if not modes:
        return prop
    taken = moved = 0
    for mode in [m for m in _FRONT if m in modes]:
        k = min(trial.suggest_int(f"blocks.{mode}", 0, n), n - taken) if n else 0
        if mode in OFFLOADED:  # never every block: the last one's backward comes first, nothing hides its copy
            k = min(k, max(0, n - 1 - moved))
            moved += k
        prop.refs[mode] = list(range(taken, taken + k))
        taken += k
    if "recompute" in modes:
        k = min(trial.suggest_int("blocks.recompute", 0, n), n - taken) if n else 0
        prop.refs["recompute"] = list(range(n - k, n))
        if k:
            prop.recompute_mode = trial.suggest_categorical("blocks.recompute.mode", ["full", "selective"])
    for name in exception_blocks(profile):
        choice = trial.suggest_categorical(f"blocks.other.{name}", ["keep", *modes])
        if choice != "keep":
            prop.refs.setdefault(choice, []).append(name)
    return prop


def compact(refs: list[int | str], n_repeated: int) -> list[int | str] | str:
    """Indices as 'a-b' ranges (and 'all'), paths as they are: how a plan a person reads names blocks."""
    idx = sorted({r for r in refs if isinstance(r, int)})
    paths = [r for r in refs if not isinstance(r, int)]
    if n_repeated and idx == list(range(n_repeated)) and not paths:
        return "all"
    out: list[int | str] = []
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(idx[i] if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return out + paths


__all__ = ["ALONE_SHARE", "COMPRESSED", "LOSSY_MODES", "MODES", "OFFLOADED", "RECOMPUTE", "Layout", "Proposal", "available_modes",
           "check_refs", "combine", "compact", "exception_blocks", "profile_layout", "propose", "resolve_layout"]
