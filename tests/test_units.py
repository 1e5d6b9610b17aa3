import pytest

from memtune.errors import InputError
from memtune.units import format_bytes, parse_duration, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("16GiB", 16 * 2**30), ("16GB", 16 * 10**9), ("16000MiB", 16000 * 2**20), ("16G", 16 * 2**30),
     ("1.5 GiB", int(1.5 * 2**30)), ("1024", 1024), ("2tib", 2 * 2**40)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "16 parsecs", "-1GiB", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError, match="16GiB"):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(16 * 2**30) == "16 GiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(-2**20) == "-1 MiB"


def test_parse_duration():
    assert parse_duration("60s") == 60
    assert parse_duration("2m") == 120
    assert parse_duration("250ms") == 0.25
    with pytest.raises(InputError):
        parse_duration("soon")
