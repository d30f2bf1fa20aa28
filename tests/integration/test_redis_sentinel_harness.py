"""
The Sentinel harness itself (support/redis_sentinel.py, issue 19): the
gateway's high-availability tests trust it to start a converged cluster, to
fail over when the master dies, and to bring a killed server back as a
replica; if it did not, their failures would point at the gateway.
"""

from __future__ import annotations

import pytest

from support.redis_sentinel import SentinelCluster
from support.redis_server import redis_command
from support.waiting import wait_for


def test_cluster_starts_converged_and_replicates(sentinel_cluster: SentinelCluster) -> None:
    cluster = sentinel_cluster
    master, replica = cluster.servers
    assert len(set(cluster.sentinels)) == 3
    assert all(addr.startswith("127.0.0.1:") for addr in cluster.sentinels)
    for port in cluster.sentinel_ports:
        assert redis_command(port, "SENTINEL", "get-master-addr-by-name", cluster.master_name) == [
            b"127.0.0.1", str(master.port).encode()]
        quorum = redis_command(port, "SENTINEL", "ckquorum", cluster.master_name)
        assert isinstance(quorum, bytes) and quorum.startswith(b"OK"), quorum
    assert cluster.master_port() == master.port
    assert replica.command("ROLE")[:4] == [b"slave", b"127.0.0.1", master.port, b"connected"]  # type: ignore[index]

    assert master.command("SET", "k", b"\x00v") == b"OK"
    assert wait_for(lambda: replica.command("GET", "k") == b"\x00v")
    with pytest.raises(RuntimeError, match="READONLY"):
        replica.command("SET", "k", "from the replica")


def test_failover_promotes_the_replica_and_the_old_master_rejoins(sentinel_cluster: SentinelCluster) -> None:
    cluster = sentinel_cluster
    master, replica = cluster.servers
    master.command("SET", "before", "1")
    assert master.command("WAIT", 1, 2000) == 1  # the replica has it before the crash

    old = cluster.kill_master()
    assert old == master.port
    new = cluster.wait_for_failover(old)
    assert new == replica.port == cluster.master_port()
    assert cluster.command(new, "GET", "before") == b"1"
    assert cluster.command(new, "SET", "after", "2") == b"OK"

    # back from its config file as an empty master, then demoted by Sentinel
    cluster.restart(old)
    cluster.wait_for_replica(old)
    assert master.command("ROLE")[:2] == [b"slave", b"127.0.0.1"]  # type: ignore[index]
    assert wait_for(lambda: master.command("GET", "after") == b"2")
    assert cluster.master_port() == new


@pytest.mark.parametrize("sentinel_cluster", [{"password": "data-pw", "sentinel_password": "sentinel-pw"}],
                         indirect=True, ids=["passwords"])
def test_passwords_are_required_and_work(sentinel_cluster: SentinelCluster) -> None:
    cluster = sentinel_cluster
    master, replica = cluster.servers
    sentinel = cluster.sentinel_ports[0]
    for port in (master.port, replica.port, sentinel):
        with pytest.raises(RuntimeError, match="NOAUTH"):
            redis_command(port, "PING")
        with pytest.raises(RuntimeError, match="WRONGPASS"):
            redis_command(port, "PING", password="wrong")
    assert redis_command(master.port, "PING", password="data-pw") == b"PONG"
    assert redis_command(sentinel, "SENTINEL", "get-master-addr-by-name", cluster.master_name,
                         password="sentinel-pw") == [b"127.0.0.1", str(master.port).encode()]

    # the replica synced with masterauth; the sentinels monitor with auth-pass
    # and vote with sentinel-pass: a failover needs all three
    master.command("SET", "k", "v")
    assert master.command("WAIT", 1, 2000) == 1
    new = cluster.wait_for_failover(cluster.kill_master())
    assert new == replica.port
    assert cluster.command(new, "GET", "k") == b"v"
