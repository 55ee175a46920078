from __future__ import annotations

import os
from pathlib import Path

import pytest

from ducho_fast.data import ids
from ducho_fast.data.ids import (
    EXACT,
    ODD_CHARACTERS,
    Folding,
    _same_file,
    check_id,
    name_folding,
    unsafe_reason,
)
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


def test_folding_keys() -> None:
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert EXACT.key() is None
    case = Folding(case=True).key()
    assert case is not None and case("Photo") == case("PHOTO") == case("photo")
    assert case(nfc) != case(nfd)  # Windows: case folded, normalization kept
    both = Folding(case=True, normalization=True).key()
    assert both is not None and both("CAF\u00c9") == both(nfd) == both(nfc)
    norm = Folding(normalization=True).key()
    assert norm is not None and norm(nfc) == norm(nfd) and norm("A") != norm("a")


def test_the_probe_sees_a_file_under_the_other_name_and_leaves_nothing(tmp_path: Path) -> None:
    assert _same_file(tmp_path, "probe", "probe")  # what a folding file system answers
    assert not _same_file(tmp_path, "probe", "other")
    assert not _same_file(tmp_path / "missing", "probe", "probe")  # cannot be made: exact
    folder = tmp_path / "out" / "deep"  # not made yet: probed where it will be made
    expected = Folding(
        case=_caseless(tmp_path), normalization=_same_file(tmp_path, "\u00e9", "e\u0301")
    )
    assert name_folding([folder, tmp_path]) == expected._replace(refused=_refused(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_folders_on_several_file_systems_fold_as_any_of_them(tmp_path: Path, monkeypatch) -> None:
    found = {
        tmp_path / "a": Folding(case=True, refused=":?"),
        tmp_path / "b": Folding(normalization=True, refused="?*"),
    }
    for folder in found:
        folder.mkdir()
    monkeypatch.setattr(ids, "_probe", lambda folder, **_: found.get(folder, EXACT))
    assert name_folding([tmp_path / "a", tmp_path / "b" / "new"]) == Folding(True, True, ":?*")
    assert name_folding([tmp_path / "b", tmp_path]) == Folding(normalization=True, refused="?*")
    assert name_folding([tmp_path]) == EXACT


def _refused(folder: Path) -> str:
    refused = ""
    for c in ODD_CHARACTERS:
        try:
            (folder / f"x{c}").touch()
            (folder / f"x{c}").unlink()
        except OSError:
            refused += c
    return refused


def test_refused_characters_make_bad_ids() -> None:
    assert EXACT.refusal("a:b?") is None
    fat = Folding(refused=ODD_CHARACTERS)
    assert fat.refusal("B001") is None
    assert fat.refusal("user:2?") == (
        "the output folder's file system refuses : ? in file names; rename the item, or "
        "write to another file system"
    )


def _caseless(folder: Path) -> bool:
    (folder / "Case").touch()
    try:
        return (folder / "case").exists()
    finally:
        (folder / "Case").unlink()


@pytest.mark.skipif(
    "DUCHO_FAST_TEST_CASELESS_DIR" not in os.environ,
    reason="set DUCHO_FAST_TEST_CASELESS_DIR to a folder of a case-insensitive file system",
)
def test_a_case_insensitive_file_system_is_found() -> None:
    folder = Path(os.environ["DUCHO_FAST_TEST_CASELESS_DIR"])
    found = name_folding([folder / "not" / "made"])
    assert found.case and found.refused == _refused(folder)  # exFAT: all of ODD_CHARACTERS
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
