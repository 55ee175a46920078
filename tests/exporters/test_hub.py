"""A hub name on a machine that cannot reach the hub fails at once, saying what to do, instead
of the libraries retrying each file for over a minute."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ducho_fast.exporters import hub


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def probe(monkeypatch) -> Iterator[None]:
    """The probe asked again in each test, with no offline mode or proxy from outside."""
    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", *hub.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    hub._probe.cache_clear()
    yield
    hub._probe.cache_clear()


def test_an_unreachable_hub_is_named_and_loads_from_the_cache_only(
    probe, monkeypatch, closed_port: int
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    reason = hub.unreachable("sentence-transformers/all-MiniLM-L6-v2")
    assert reason is not None and f"127.0.0.1:{closed_port}" in reason
    assert hub.options(reason) == {"local_files_only": True}
    assert hub.unreachable("bert-base-uncased") == reason  # asked once a process


def test_a_hub_that_answers_is_used_as_the_libraries_use_it(probe, monkeypatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.unreachable("org/model") is None
    assert hub.options(None) == {}


@pytest.mark.parametrize(
    "setting", ["local folder", "path", "offline mode", "proxy"], ids=lambda s: s.replace(" ", "-")
)
def test_no_probe_where_it_cannot_tell_or_need_not(
    probe, monkeypatch, tmp_path: Path, closed_port: int, setting: str
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    source = "org/model"
    if setting == "local folder":
        monkeypatch.chdir(tmp_path)
        (tmp_path / "org" / "model").mkdir(parents=True)  # a relative folder wins
    elif setting == "path":
        source = str(tmp_path / "missing")  # reported as a missing folder, not a hub name
    elif setting == "offline mode":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the libraries read the cache at once
    else:
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.unreachable(source) is None


@pytest.mark.parametrize("backend", ["sentence_transformers", "transformers"])
def test_export_of_a_hub_name_without_network_fails_at_once_with_the_fix(
    tmp_path: Path, closed_port: int, backend: str
) -> None:
    (tmp_path / "d.tsv").write_text("id\ttext\n1\thello\n")
    name = "sentence-transformers/all-MiniLM-L6-v2"
    model = {"model_name": name, "backend": backend, "output_layers": [1]}
    config = {
        "dataset_path": str(tmp_path),
        "store": str(tmp_path / "store"),
        "textual": {
            "items": {"input_path": "d.tsv", "output_path": "out", "model": [model]},
        },
    }
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *hub.PROXY_VARIABLES)
    }
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port}"
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache
    script = shutil.which("ducho-fast", path=str(Path(sys.executable).parent))
    assert script is not None
    proc = subprocess.run(
        [script, "export", str(tmp_path / "c.yml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0
    message = proc.stderr
    assert f"hub (127.0.0.1:{closed_port}) cannot be reached" in message
    assert "is not in this machine's Hugging Face cache" in message
    assert "hf download sentence-transformers/all-MiniLM-L6-v2 --local-dir DIR" in message
    assert "Retrying" not in message + proc.stdout  # the libraries' back-off never started
