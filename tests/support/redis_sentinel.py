"""
A Redis Sentinel set-up on loopback for the high-availability tests (issue
19): one master, one replica and three sentinels, each ``redis-server`` on a
free port in the cluster's own folder, so several clusters can run at once
(pytest-xdist).

The timings are tight so that a failover after ``kill_master()`` completes in
about three seconds: ``down-after-milliseconds`` 1500, ``failover-timeout``
3000 (which also bounds a stalled election), quorum 2 of 3. Sentinel's
internal periods are compile-time defaults that ``SENTINEL DEBUG`` (Redis
7.0+) can shorten, applied to every sentinel at start:

- ``ping-period`` 250 (default 1000): it also spaces a sentinel's reconnects,
  and right after a switch the new master must answer a PING within
  down-after of the switch. With the default period and down-after 1000 that
  margin can vanish: in the first of two trial runs a sentinel marked the
  healthy new master down one second after the switch and (apparently
  counting its peers' still-fresh "master down" answers about the old one)
  failed over again, onto the just restarted, empty old master;
- ``ask-period`` 250 (default 1000): faster agreement on "objectively down",
  and those stale peer answers expire after five periods;
- ``publish-period`` 500 (default 2000): hellos, how fast sentinels find each
  other and spread a new configuration; four of them is also how long
  Sentinel waits before it demotes a restarted old master;
- ``info-period`` 1000 (default 10000): how fast a replica's role change is seen;
- ``tilt-period`` 5000 (default 30000): a stalled machine leaves Sentinel's
  TILT mode (no actions) before a test's wait runs out.

Every data server runs from a config file of its own, so the ``CONFIG
REWRITE`` Sentinel sends with each ``REPLICAOF`` keeps the role it was given
across ``restart()``; a killed master restarted from its file comes back as a
master with an empty dataset (no persistence), and Sentinel demotes it to a
replica of the new master: the stale-master window the gateway must survive.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from support.gateway import free_port
from support.redis_server import RedisServer, require_redis_server
from support.tiers import require_integration
from support.waiting import wait_for

# SENTINEL DEBUG settings (milliseconds): see the module docstring.
SENTINEL_DEBUG = {
    "ping-period": 250, "ask-period": 250, "publish-period": 500, "info-period": 1000, "tilt-period": 5000,
}
BAD_FLAGS = ("s_down", "o_down", "disconnected")


class SentinelCluster:
    """
    ``with SentinelCluster(tmp_path) as cluster:`` (or ``start()`` /
    ``stop()``): the master is ``servers[0]`` at start, the replica
    ``servers[1]``; ``sentinels`` are the "127.0.0.1:PORT" addresses a
    gateway is configured with. After a failover, ask ``master_port()``.
    """

    def __init__(
        self,
        folder: Path,
        *,
        master_name: str = "mymaster",
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 1500,
        failover_timeout_ms: int = 3000,
        quorum: int = 2,
    ) -> None:
        self.folder = folder
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.quorum = quorum
        self.servers: list[RedisServer] = []
        self.sentinel_servers: list[RedisServer] = []

    # -- life cycle -----------------------------------------------------

    def __enter__(self) -> SentinelCluster:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        """Master, replica in sync, three sentinels that all see both and each other; or stop all and raise."""
        assert not self.servers, "a SentinelCluster starts once"
        require_integration("redis-server (sentinel cluster)")
        require_redis_server()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            master = self._data_server(replica_of=None)
            master.start()
            replica = self._data_server(replica_of=master.port)
            replica.start()
            self._until(lambda: self._link_problem(replica), min(timeout, 10.0),
                        f"replica {replica.port} in sync with master {master.port}", [replica, master])
            for _ in range(3):
                self._sentinel(master.port).start()
            for sentinel in self.sentinel_servers:
                debug: list[str | int] = [x for item in SENTINEL_DEBUG.items() for x in item]
                sentinel.command("SENTINEL", "DEBUG", *debug)
            self._until(self._topology_problem, timeout,
                        "every sentinel to see the master, the replica and the two other sentinels",
                        self.sentinel_servers)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL everything, sentinels first (so none reacts to the data servers going)."""
        for server in [*self.sentinel_servers, *self.servers]:
            server.kill()

    # -- what a test asks ------------------------------------------------

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinel_servers]

    @property
    def sentinel_ports(self) -> list[int]:
        return [s.port for s in self.sentinel_servers]

    def server(self, port: int) -> RedisServer:
        """The data server (master or replica) on ``port``."""
        for server in self.servers:
            if server.port == port:
                return server
        raise KeyError(f"no data server of this cluster on port {port}: {[s.port for s in self.servers]}")

    def sentinel_command(self, *args: bytes | str | int, timeout: float = 2.0) -> object:
        """A command to the first sentinel that answers (authenticated if ``sentinel_password``)."""
        errors: list[str] = []
        for sentinel in self.sentinel_servers:
            try:
                return sentinel.command(*args, timeout=timeout)
            except OSError as exc:
                errors.append(f"{sentinel.port}: {exc}")
        raise ConnectionError(f"no sentinel answered {args!r}: {errors}")

    def master_port(self) -> int:
        """The master's port, as a sentinel reports it (SENTINEL get-master-addr-by-name)."""
        return _addr_port(self.sentinel_command("SENTINEL", "get-master-addr-by-name", self.master_name))

    def master(self) -> RedisServer:
        """The current master's RedisServer (to ``kill()``, ``pause()`` or ``command()`` it)."""
        return self.server(self.master_port())

    def command(self, port: int, *args: bytes | str | int, timeout: float = 5.0) -> object:
        """One command to the data server on ``port`` (authenticated if ``password``)."""
        return self.server(port).command(*args, timeout=timeout)

    # -- failures ---------------------------------------------------------

    def kill_master(self) -> int:
        """SIGKILL the current master (as the sentinels see it); its port, for ``wait_for_failover``."""
        port = self.master_port()
        self.server(port).kill()
        return port

    def wait_for_failover(self, old_port: int, timeout: float = 15.0) -> int:
        """Until every sentinel names one new master and that server says ROLE master; its port."""
        found: list[int] = []

        def problem() -> str | None:
            ports = {_addr_port(s.command("SENTINEL", "get-master-addr-by-name", self.master_name, timeout=1.0))
                     for s in self.sentinel_servers}
            if len(ports) != 1 or old_port in ports:
                return f"sentinels name {sorted(ports)} (old master {old_port})"
            (port,) = ports
            role = self.server(port).command("ROLE", timeout=1.0)
            if not isinstance(role, list) or role[0] != b"master":
                return f"{port} answers ROLE {role!r}"
            found.append(port)
            return None

        self._until(problem, timeout, f"failover away from {old_port}",
                    [*self.sentinel_servers, *(s for s in self.servers if s.port != old_port)])
        return found[-1]

    def restart(self, port: int, timeout: float = 10.0) -> RedisServer:
        """
        Start the killed server on ``port`` again, from its config file: a
        replica Sentinel reconfigured stays one; the old master comes back as a
        master until Sentinel demotes it (``wait_for_replica``).
        """
        server = self.server(port)
        server.start(timeout=timeout)
        return server

    def wait_for_replica(self, port: int, timeout: float = 15.0) -> None:
        """
        Until the server on ``port`` replicates the current master (link up)
        and every sentinel lists it as a healthy replica, so a further
        failover can pick it.
        """
        def problem() -> str | None:
            master = self.master_port()
            role = self.server(port).command("ROLE", timeout=1.0)
            if not (isinstance(role, list) and role[0] == b"slave" and role[2] == master and role[3] == b"connected"):
                return f"{port} answers ROLE {role!r}, master is {master}"
            return self._link_problem(self.server(port)) or self._replica_seen_problem(port)

        self._until(problem, timeout, f"{port} to become a replica of the current master",
                    [self.server(port), *self.sentinel_servers])

    # -- internals ---------------------------------------------------------

    def _data_server(self, replica_of: int | None) -> RedisServer:
        port = free_port()
        config = self.folder / f"redis-{port}.conf"
        lines = ["repl-diskless-sync-delay 0"]  # Redis 7 waits 5 s for more replicas before a full sync
        if self.password:
            lines.append(f"masterauth {self.password}")
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        config.write_text("\n".join(lines) + "\n")
        server = RedisServer(self.folder, port, config_file=config, password=self.password,
                             args=["--loglevel", "notice"])
        self.servers.append(server)
        return server

    def _sentinel(self, master_port: int) -> RedisServer:
        port = free_port()
        name = self.master_name
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"sentinel monitor {name} 127.0.0.1 {master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password:
            lines.append(f"sentinel sentinel-pass {self.sentinel_password}")  # to the other sentinels
        config = self.folder / f"sentinel-{port}.conf"  # Sentinel rewrites it: a file of its own, writable
        config.write_text("\n".join(lines) + "\n")
        sentinel = RedisServer(self.folder, port, config_file=config, password=self.sentinel_password,
                               args=["--sentinel", "--loglevel", "notice"], label="sentinel")
        self.sentinel_servers.append(sentinel)
        return sentinel

    def _link_problem(self, replica: RedisServer) -> str | None:
        info = replica.command("INFO", "replication", timeout=1.0)
        text = info.decode() if isinstance(info, bytes) else str(info)
        if "master_link_status:up" not in text:
            return f"{replica.port} INFO replication:\n{text}"
        # and the master streams writes to it. After a diskless full sync the
        # master waits for the replica's first ACK before it does, while INFO
        # already says state=online (and WAIT may count the replica meanwhile,
        # as seen with Redis 7.0.15): a probe write must arrive
        port = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("master_port:")),
                    "")
        if not port.isdigit():
            return f"{replica.port}: no master_port in INFO replication"
        master = self.server(int(port))
        probe = f"harness:probe:{replica.port}"
        master.command("SET", probe, "1")
        return None if replica.command("GET", probe, timeout=1.0) == b"1" else \
            f"{replica.port}: the master's writes do not reach it yet"

    def _replica_seen_problem(self, port: int) -> str | None:
        for sentinel in self.sentinel_servers:
            reply = sentinel.command("SENTINEL", "replicas", self.master_name, timeout=1.0)
            replicas = [_fields(r) for r in _list(reply)]
            mine = [r for r in replicas if r.get("port") == str(port)]
            if not mine or _bad(mine[0]) or mine[0].get("master-link-status") != "ok":
                return f"sentinel {sentinel.port} sees replica {port} as {mine}"
        return None

    def _topology_problem(self) -> str | None:
        master = self.servers[0].port
        for sentinel in self.sentinel_servers:
            named = _addr_port(sentinel.command("SENTINEL", "get-master-addr-by-name", self.master_name, timeout=1.0))
            if named != master:
                return f"sentinel {sentinel.port} names master {named}, not {master}"
            reply = sentinel.command("SENTINEL", "sentinels", self.master_name, timeout=1.0)
            peers = [_fields(p) for p in _list(reply)]
            healthy = [p for p in peers if not _bad(p)]
            if len(healthy) != len(self.sentinel_servers) - 1:
                return f"sentinel {sentinel.port} sees sentinels {peers}"
        return self._replica_seen_problem(self.servers[1].port)

    @staticmethod
    def _until(problem: Callable[[], str | None], timeout: float, what: str, logs: list[RedisServer]) -> None:
        """
        Poll ``problem`` (None when all is well) for ``timeout`` s, else raise
        with its last answer and the tails of the logs that say why.
        """
        last = ["not checked yet"]

        def ok() -> bool:
            try:
                last[0] = problem() or ""
            except (OSError, RuntimeError, KeyError) as exc:  # a server down or not ready yet
                last[0] = f"{type(exc).__name__}: {exc}"
            return not last[0]

        if not wait_for(ok, timeout=timeout):
            tails = "\n".join(f"--- {s.log_path} ---\n{s.log_tail(25)}" for s in logs)
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}; last seen: {last[0]}\n{tails}")


def _list(reply: object) -> list[object]:
    return reply if isinstance(reply, list) else []


def _fields(entry: object) -> dict[str, str]:
    """A SENTINEL replicas/sentinels entry (a flat name, value, ... array) as a dict."""
    flat = [x.decode() if isinstance(x, bytes) else str(x) for x in _list(entry)]
    return dict(zip(flat[::2], flat[1::2]))


def _bad(entry: dict[str, str]) -> bool:
    return any(flag in entry.get("flags", "").split(",") for flag in BAD_FLAGS)


def _addr_port(reply: object) -> int:
    if not (isinstance(reply, list) and len(reply) == 2):
        raise RuntimeError(f"get-master-addr-by-name answered {reply!r}")
    return int(reply[1])

