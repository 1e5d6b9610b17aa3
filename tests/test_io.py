import os
import stat

import pytest

from memtune.errors import InputError
from memtune.io import check_writable, read_json, write_json_atomic, write_text_atomic


def test_atomic_write_keeps_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_text_atomic(tmp_path / "sub" / "plan.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert p.read_text() == "a: 1\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [f.name for f in p.parent.iterdir()] == ["plan.yaml"]  # no temp file left behind


def test_existing_file_needs_force(tmp_path):
    p = tmp_path / "profile.json"
    write_json_atomic(p, {"x": 1})
    with pytest.raises(InputError, match="--force"):
        check_writable(p, force=False)
    assert check_writable(p, force=True) == p
    assert read_json(p) == {"x": 1}


def test_read_json_errors_say_what_to_do(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_json(tmp_path / "missing.json", "profile")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        read_json(bad, "profile")
