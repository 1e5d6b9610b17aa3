"""Reversible changes to someone else's objects: every patch memtune makes returns an `Undo`.

- `Undos`: a stack of undos run newest first; as a context manager it undoes what was done when the
  block raises, so a half-applied change never stays behind.
- `replace_on_instance`, `wrap_forward`: change one object (its class untouched).
- `patch_functions`: replace a module's or a class's function, installed before a script binds the name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Undo = Callable[[], None]


def noop() -> None:
    pass


class Undos:
    """Undos run newest first. Each one runs even when an earlier one raised; the first error is re-raised
    (with the others named) once all have run."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Undo]] = []

    def add(self, undo: Undo | None, name: str = "") -> None:
        if undo is not None:
            self._items.append((name, undo))

    def __len__(self) -> int:
        return len(self._items)

    def __call__(self) -> None:
        errors: list[str] = []
        first: BaseException | None = None
        while self._items:
            name, undo = self._items.pop()
            try:
                undo()
            except Exception as e:  # keep undoing the rest; report after
                first = first or e
                errors.append(f"{name + ': ' if name else ''}{e}")
        if first is not None:
            raise RuntimeError("memtune could not undo everything: " + "; ".join(errors)) from first

    def __enter__(self) -> Undos:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self()
        return False


def replace_on_instance(obj: Any, name: str, value: Any) -> Undo:
    """Set `obj.name = value` on this instance only (its class untouched); the undo restores exactly what the
    instance had: its own attribute, or none so the class's shows again."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            obj.__dict__.pop(name, None)

    return undo


def wrap_forward(module: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Undo:
    """Replace module.forward on the instance with make(current forward), so state_dict keys never change."""
    return replace_on_instance(module, "forward", make(module.forward))


def patch_functions(targets: list[tuple[Any, str]], wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
                    marker: str | None = None) -> Undo:
    """Replace each function `owner.attr` (a module's or a class's) by `wrap(current)`; the undo puts the
    originals back, newest first. With `marker`, a function already wrapped with that marker is left alone
    (installing twice wraps once) and each new wrapper gets it. Install before a script binds the names."""
    done: list[tuple[Any, str, Any]] = []
    for owner, attr in targets:
        f = getattr(owner, attr, None)
        if f is None or (marker and getattr(f, marker, False)):
            continue
        w = wrap(f)
        if marker:
            setattr(w, marker, True)
        setattr(owner, attr, w)
        done.append((owner, attr, f))

    def undo() -> None:
        for owner, attr, f in reversed(done):
            setattr(owner, attr, f)

    return undo
