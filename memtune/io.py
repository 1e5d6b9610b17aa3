"""Files: written atomically, never overwriting a user's file unless asked."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from memtune.errors import InputError


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to replace an existing file unless `force`; say how to proceed."""
    p = Path(path)
    if p.exists() and not force:
        raise InputError(f"{p} exists: pass --force to overwrite it, or -o to write elsewhere")
    if p.exists() and p.is_dir():
        raise InputError(f"{p} is a directory: give a file name with -o")
    return p


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Temp file in the same directory + rename, so a crash never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the user's files get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p} not found: check the path")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not valid JSON ({e}): give a {what} written by memtune") from None
