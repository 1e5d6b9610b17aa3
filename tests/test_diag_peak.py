"""benchmarks/diag_peak.py's trace replay (the tool itself needs a GPU's allocator history)."""

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def diag():
    return load_benchmark("diag_peak")


def _ev(action, addr, size, where="train.py"):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": f"/x/{where}", "line": 3, "name": "f"}]}


def test_peak_live_is_the_set_at_the_highest_point(diag):
    # allocated counts a block as freed when its free is requested (as max_memory_allocated does), not when
    # the stream uses it waited for are done
    trace = [_ev("alloc", 1, 100), _ev("alloc", 2, 50, "fetch.py"), _ev("free_requested", 1, 100),
             _ev("free_completed", 1, 100), _ev("alloc", 3, 70), _ev("alloc", 4, 10), _ev("free_requested", 3, 70)]
    peak, at, live = diag.peak_live(trace)
    assert peak == 150 and at == 1 and set(live) == {1, 2}  # 150 then, 130 at most later
    assert diag._where(live[2]["frames"], 2) == "fetch.py:3:f"
