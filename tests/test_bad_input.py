"""Every case of tests/bad_input_cases.py: one line on stderr, exit 1 (130 on Ctrl-C), no traceback unless the
user's script raised, no file changed; and docs/bad-input.md shows what the cases print now."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import bad_input_cases as bic  # noqa: E402

DOC = bic.ROOT / "docs" / "bad-input.md"
_ran: dict[str, tuple] = {}


@pytest.mark.parametrize("case", bic.CASES, ids=[c.id + ":" + c.what for c in bic.CASES])
def test_case(case, tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    o = bic.run_case(case, d)
    _ran[case.id] = (case, o, d)
    assert not bic.problems(case, o, d), bic.problems(case, o, d)


def test_at_least_40_cases():
    assert len(bic.CASES) >= 40
    assert all(c.code in (1, 130) for c in bic.CASES)


def test_doc_is_current(tmp_path):
    """docs/bad-input.md holds the table the cases print (regenerate: python tests/scripts/bad_input_doc.py)."""
    rows = []
    for c in bic.CASES:
        if c.id not in _ran:  # run alone: run the cases here
            d = tmp_path / c.id
            d.mkdir()
            _ran[c.id] = (c, bic.run_case(c, d), d)
        rows.append(_ran[c.id])
    table = bic.render_table(rows)
    assert table in DOC.read_text(), "docs/bad-input.md is stale: run python tests/scripts/bad_input_doc.py"
