"""Observers used by `memtune profile`: memory, timing and hardware.

`profile_script(...) -> Profile` (memtune/profilers/runner.py) is the library entry point.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ScriptFailed", "profile_script"]


def __getattr__(name: str) -> Any:  # lazy: `memtune env` imports hardware without the runner
    if name in __all__:
        from memtune.profilers import runner

        return getattr(runner, name)
    raise AttributeError(name)
