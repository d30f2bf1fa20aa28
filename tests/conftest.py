"""
The root conftest: the tier marker (tests/README.md) and the fixtures that
start processes. Helpers live in tests/support/ (``from support.gateway
import ...``); this folder is on ``sys.path`` because this file is its
rootdir conftest.

The gateway runs as a real ``twistd`` process built from this working tree;
upstreams and clients are the ``websockets`` library (an independent
implementation), run in threads.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import ServerConnection

from support import tiers
from support.gateway import Gateway, Upstream, serve_upstream, spawn_gateway
from support.redis_sentinel import SentinelCluster
from support.redis_server import RedisServer, running_redis


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if tiers.is_integration(item):
            item.add_marker(pytest.mark.integration)
        # pytest-xdist (--dist loadgroup, `make test`): a module's tests share
        # its module-scoped gateway, so they run in one worker; tests/security
        # is one group, its survival checks judging the gateway all of it abused.
        item.add_marker(pytest.mark.xdist_group(tiers.group_of(item)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    tiers.entering(item)


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """
    start_gateway(ini_body, port=None) -> Gateway: writes the INI (``{port}``
    in it is replaced by the gateway's port), runs ``twistd -n wsgateway``
    and waits until it listens.
    """
    started: list[Gateway] = []

    def start(body: str, *, port: int | None = None, scheme_port: int | None = None, env: dict[str, str] | None = None) -> Gateway:
        return spawn_gateway(tmp_path, textwrap.dedent(body), env=env, name=f"gw-{len(started)}", port=port,
                             scheme_port=scheme_port, on_spawn=started.append)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def make_upstream() -> Iterator[Callable[..., Upstream]]:
    """
    make_upstream(handler=echo, **serve_kwargs) -> Upstream. The handler gets
    (upstream, connection).
    """
    servers: list[Upstream] = []

    def make(handler: Callable[[Upstream, ServerConnection], None] | None = None, **kwargs: Any) -> Upstream:
        up = serve_upstream(handler, **kwargs)
        servers.append(up)
        return up

    yield make
    for up in servers:
        up.server.shutdown()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (support/redis_server.py)."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def sentinel_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SentinelCluster]:
    """
    One master, one replica and three sentinels of this test's own
    (support/redis_sentinel.py), started and converged. Indirect
    parametrisation passes SentinelCluster's keyword arguments, e.g.
    ``@pytest.mark.parametrize("sentinel_cluster", [{"password": "pw"}], indirect=True)``.
    """
    with SentinelCluster(tmp_path / "sentinel", **getattr(request, "param", {})) as cluster:
        yield cluster
