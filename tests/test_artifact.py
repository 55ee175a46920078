from __future__ import annotations

import os
import stat

import pytest

from ducho_fast.artifact import new_build_dir


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700)])
def test_build_dirs_follow_the_umask(tmp_path, umask: int, mode: int) -> None:
    """An artifact keeps its build directory's mode when it is renamed into the store: 0755
    under the usual umask, so everyone sharing the store can read the models."""
    old = os.umask(umask)
    try:
        first, second = new_build_dir(tmp_path / "store"), new_build_dir(tmp_path / "store")
    finally:
        os.umask(old)
    assert first != second and first.name.startswith(".building-")
    assert stat.S_IMODE(first.stat().st_mode) == mode
