"""Joining a Ray cluster for ``extract --engine ray``: addresses it cannot use are refused
with what to do, before any work (no cluster is started here; test_raydata runs on one)."""

from __future__ import annotations

import socket
import time

import pytest

from ducho_fast.errors import ConfigError
from ducho_fast.runtime import raydata
from ducho_fast.runtime.raydata import RayOptions, join_cluster, ray_address
from tests.conftest import closed_port

ray = pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_the_option_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ray_address(RayOptions()) == (None, "RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert ray_address(RayOptions()) == ("head:6379", "RAY_ADDRESS")
    assert ray_address(RayOptions(address="auto")) == ("auto", "--ray-address")


def test_no_address_joins_nothing_before_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raydata, "start_ray", lambda options: pytest.fail("joined a cluster"))
    join_cluster(RayOptions())  # a local instance starts when a model has items to embed


@pytest.mark.parametrize("where", ["option", "environment"])
def test_a_ray_client_address_is_refused_with_what_to_run_instead(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Ray Data does not run through Ray Client: Ray 2.60 fails deep in its executor
    ('Worker' object has no attribute 'core_worker') after the run has started."""
    monkeypatch.setattr(raydata, "start_ray", lambda options: pytest.fail("joined a cluster"))
    options = RayOptions(address="ray://head:10001") if where == "option" else RayOptions()
    if where == "environment":
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    named = "--ray-address ray://head:10001" if where == "option" else "RAY_ADDRESS ray"
    with pytest.raises(ConfigError, match="Ray Client address") as e:
        join_cluster(options)
    assert named in str(e.value)
    assert "auto" in str(e.value) and "6379" in str(e.value)


def test_an_address_where_nothing_listens_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ray.init retries such an address for minutes (over 2 here) before it gives up."""
    monkeypatch.setattr(raydata, "start_ray", lambda options: pytest.fail("joined a cluster"))
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(ConfigError, match="no Ray cluster answers there") as e:
        join_cluster(RayOptions(address=address))
    assert f"--ray-address {address}" in str(e.value)
    assert time.monotonic() - start < raydata.PROBE_SECONDS


def test_an_address_that_answers_is_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    joined: list[RayOptions] = []
    monkeypatch.setattr(raydata, "start_ray", joined.append)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        options = RayOptions(address=f"127.0.0.1:{server.getsockname()[1]}")
        join_cluster(options)
    assert joined == [options]
    # Forms that are not HOST:PORT go to Ray as they are.
    join_cluster(RayOptions(address="auto"))
    assert len(joined) == 2


def _fails_to_join(monkeypatch: pytest.MonkeyPatch, inner: str) -> None:
    """ray.init failing as Ray 2.60 does: a ConnectionError from the GCS client's error."""

    def init(*args: object, **kwargs: object) -> None:
        try:
            raise RuntimeError(inner)
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from e

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)


def test_a_cluster_that_wants_a_token_says_how_to_give_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fails_to_join(
        monkeypatch,
        "Failed to connect to GCS. ray.exceptions.AuthenticationError: RPC error: "
        "InvalidAuthToken: Authentication token is missing or incorrect.",
    )
    with pytest.raises(ConfigError, match="could not join the cluster") as e:
        raydata.start_ray(RayOptions(address="10.0.0.1:6379"))
    message = str(e.value)
    assert message.startswith("--ray-address 10.0.0.1:6379: ")
    assert "RAY_AUTH_MODE=token" in message and "~/.ray/auth_token" in message


def test_other_join_failures_say_to_check_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    _fails_to_join(monkeypatch, "Failed to connect to GCS within 60 seconds.")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ConfigError, match="ray status") as e:
        raydata.start_ray(RayOptions())
    assert str(e.value).startswith("RAY_ADDRESS 10.0.0.1:6379: Ray could not join")
    assert "RAY_AUTH_MODE" not in str(e.value)
