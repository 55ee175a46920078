"""The scripts a GPU machine runs (``benchmarks/gpu_suite.sh``, ``gpu_unpack.sh``): what can be
checked of them without one, so that a slip shows here and not in a lease's minutes."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
UNPACK = ROOT / "benchmarks" / "gpu_unpack.sh"


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=60
    )


def test_every_step_of_the_suite_has_a_command_and_runs_in_its_order() -> None:
    listed = run([str(SUITE), "--list"])
    assert listed.returncode == 0, listed.stderr
    steps = [line.split()[0] for line in listed.stdout.splitlines()]
    text = SUITE.read_text()
    order = re.search(r"^ORDER=\((.*)\)$", text, re.M)
    assert order and steps == order[1].split()
    defined = re.findall(r"^  \[([\w-]+)\]=", text, re.M)
    assert sorted(defined) == sorted(steps)  # none defined but left out of the order
    assert steps[:2] == ["doctor", "warm-up"]  # the unconfirmed reading of the logs first
    assert (
        "--vs runtime.cuda_options.cudnn_conv_algo_search=HEURISTIC"
        in listed.stdout.splitlines()[1]
    )


def test_the_suite_refuses_an_unknown_step_before_running_any() -> None:
    refused = run([str(SUITE), "doctor", "bench-writer"], LOGS="/nonexistent/logs")
    assert refused.returncode == 2
    assert "no step 'bench-writer'" in refused.stderr and "bench-writers" in refused.stderr


def pack(folder: Path, files: dict[str, bytes], pieces: int) -> None:
    """What gpu_pack.sh leaves: an xz tarball of ``site/`` cut into ``pieces``, and its sum."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"site/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    folder.mkdir()
    size = -(-len(data) // pieces)
    for k in range(pieces):
        (folder / f"p{k}").write_bytes(data[k * size : (k + 1) * size])
    (folder / "sum").write_text(hashlib.sha256(data).hexdigest() + "\n")


def test_unpack_puts_the_packed_site_together(tmp_path: Path) -> None:
    files = {"onnxruntime/__init__.py": b"# gpu build\n", "soundfile.py": os.urandom(50_000)}
    pack(tmp_path / "up", files, pieces=3)
    site = tmp_path / "site"
    site.mkdir()
    (site / "stale.py").write_text("from an earlier unpack")
    done = run([str(UNPACK), str(tmp_path / "up")], SITE=str(site), SKIP_INSTALL="1")
    assert done.returncode == 0, done.stderr
    assert f"{site} from 3 pieces" in done.stdout
    found = {str(p.relative_to(site)): p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert found == files


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_unpack_refuses_pieces_that_do_not_add_up(tmp_path: Path, damage: str) -> None:
    pack(tmp_path / "up", {"a.py": os.urandom(40_000)}, pieces=3)
    piece = tmp_path / "up" / "p1"
    if damage == "missing":
        piece.unlink()
    else:
        piece.write_bytes(piece.read_bytes()[:-10])
    site = tmp_path / "site"
    refused = run([str(UNPACK), str(tmp_path / "up")], SITE=str(site), SKIP_INSTALL="1")
    assert refused.returncode == 1
    assert "do not add up to what was packed" in refused.stderr
    assert not site.exists()  # nothing unpacked


def test_unpack_names_a_folder_without_pieces(tmp_path: Path) -> None:
    refused = run([str(UNPACK), str(tmp_path)], SITE=str(tmp_path / "site"), SKIP_INSTALL="1")
    assert refused.returncode == 2
    assert f"no pieces p0, p1, ... and sum in {tmp_path}" in refused.stderr
