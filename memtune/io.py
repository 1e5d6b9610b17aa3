"""Files: checked before any work, written atomically, never overwriting a user's file unless asked.

`check_writable` runs before a command does anything slow: an output memtune cannot write (a folder it may
not create files in, a parent that is a file, /proc) or must not replace (a symlink, a device, a folder;
an existing file without --force) is one line, before the run rather than after it. `write_bytes_atomic`
writes a temp file beside the target and renames it over a regular file only.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from memtune.errors import InputError


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None  # absent (a parent that is a file is check_dir's to say)


def check_replaceable(path: str | os.PathLike, force: bool, option: str = "-o") -> Path:
    """The target itself: absent, or a regular file and `force`. Symlinks, devices and folders are never
    replaced, --force or not."""
    p = Path(path)
    try:
        st = _lstat(p)
    except OSError as e:
        raise InputError(f"cannot use {p} ({e.strerror}): give {option} another path") from None
    if st is None:
        return p
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p} is a directory: give {option} a file name")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{p} is {_kind(st.st_mode)}: memtune replaces only regular files, even with --force; "
                         f"give {option} another path")
    if not force:
        raise InputError(f"{p} exists: pass --force to overwrite it, or give {option} another path")
    return p


def check_dir(folder: str | os.PathLike, option: str = "-o") -> Path:
    """A folder memtune can create files in: the nearest existing one above `folder` must be a folder
    (not a file) in which a file can really be created (a test file is made and removed: permissions,
    read-only mounts and /proc all answer the same way)."""
    cur = Path(folder)
    while True:
        try:
            st = os.stat(cur)  # follows links: a linked folder is fine
            break
        except (FileNotFoundError, NotADirectoryError):
            if cur.parent == cur:
                raise InputError(f"{folder} cannot be created: give {option} a path in an existing folder") from None
            cur = cur.parent
        except OSError as e:
            raise InputError(f"cannot reach {cur} ({e.strerror}): give {option} a path in a folder you can write") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{cur} is {'a file' if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)}, not a folder: "
                         f"give {option} a path in a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".memtune-check-", dir=cur)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"cannot create files in {cur} ({_why(e)}): give {option} a path in a folder you can "
                         "write") from None
    return Path(folder)


def _why(e: OSError) -> str:
    # /proc and /sys answer ENOENT to a new file in an existing folder
    if e.errno == errno.ENOENT:
        return "the file system takes no new files there"
    return (e.strerror or str(e)).lower()


def check_writable(path: str | os.PathLike, force: bool, option: str = "-o") -> Path:
    """Refuse, before any work, an output that cannot be written or must not be replaced; say how to proceed."""
    if str(path).strip() == "":
        raise InputError(f"{option} is empty: give a file name")
    p = check_replaceable(path, force, option)
    check_dir(p.parent, option)
    return p


def check_output_dir(folder: str | os.PathLike, option: str) -> Path:
    """A folder to write several files into (report --png/--csv): absent (it is created) or a folder."""
    d = Path(folder)
    if str(folder).strip() == "":
        raise InputError(f"{option} is empty: give a folder")
    if d.exists() and not d.is_dir():
        raise InputError(f"{d} is not a folder: give {option} a folder (it is created when missing)")
    return check_dir(d, option)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Temp file in the same directory + rename, so a crash never leaves half a file. Only a regular file is
    ever renamed over (checked again here: a symlink or device put there since the check is refused)."""
    p = Path(path)
    st = _lstat(p)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InputError(f"{p} is {_kind(st.st_mode)}: memtune replaces only regular files; give another path")
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the user's files get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except OSError as e:
        raise InputError(f"cannot write {p} ({e.strerror or e}): give another path") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory: give the {what} file")
    if not p.is_file():
        raise InputError(f"{what} {p} not found: check the path")
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{p} is not a text file (binary content): give a {what} written by memtune") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p} is not valid JSON ({e}): give a {what} written by memtune") from None
    except OSError as e:
        raise InputError(f"cannot read {p} ({e.strerror}): check its permissions") from None
