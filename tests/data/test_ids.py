from __future__ import annotations

import pytest

from ducho_fast.data.ids import check_id, unsafe_reason
from ducho_fast.errors import DataError


@pytest.mark.parametrize("item_id", ["B001", "007", "a b", "日本", "x.y", ".hidden", "x.tmp-"])
def test_safe_ids(item_id: str) -> None:
    assert check_id(item_id) == item_id


@pytest.mark.parametrize(
    ("item_id", "reason"),
    [
        ("", "empty"),
        ("..", "empty"),
        ("../etc/passwd", "separator"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("x" * 252, "255 bytes"),
        ("é" * 126, "255 bytes"),
        (".tmp-a1b2-7-0", "names ducho-fast's temporary files"),  # deleted when a run starts
    ],
)
def test_unsafe_ids(item_id: str, reason: str) -> None:
    assert reason in (unsafe_reason(item_id) or "")
    with pytest.raises(DataError, match=r"cannot be a file name"):
        check_id(item_id)
