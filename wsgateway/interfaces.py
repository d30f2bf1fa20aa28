"""
Protocols between the packages of wsgateway, in one place (as Twisted keeps
``iweb.py``): a package depends on what it needs of another through these,
never on the other's classes, so no two packages import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from twisted.application.service import IService, IServiceCollection
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IProtocolFactory, IPushProducer

    from wsgateway.config.loader import GatewayConfig
    from wsgateway.durable.entries import DeadLetter, Entry, NewEntry


class ProcessRole(Protocol):
    """
    Where a gateway service runs: the one process of ``workers = 1``, or one
    worker of N sharing its parent's sockets (``wsgateway.workers.child``).
    ``GatewayService`` asks its role for the config it runs, its listeners
    and any private control port; it knows nothing else of workers.
    """

    def adapt(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` as this process runs it: at start and on every SIGHUP."""

    def listener(self, index: int, desc: str, factory: IProtocolFactory, reactor: Any) -> tuple[IService, Any]:
        """The service listening on ``[gateway] listen`` entry ``index``, and its reloadable TLS (or None)."""

    def control_service(self, view: Any, registry: Any, reactor: Any) -> IService | None:
        """A private port a parent process reads this one through, if any."""


class WorkerSlotView(Protocol):
    """One worker of the parent, as its admin port names it."""

    id: int


class WorkerParentView(Protocol):
    """
    What the parent's admin port (``wsgateway.workers.admin``) reads of the
    parent of worker processes (``wsgateway.workers.parent.WorkerParent``).
    """

    config: GatewayConfig

    @property
    def slots(self) -> Sequence[WorkerSlotView]: ...

    async def ask(self, slot: Any, method: bytes, uri: bytes, body: bytes | None = None
                  ) -> tuple[int, bytes] | None: ...

    async def ask_all(self, method: bytes, uri: bytes, body: bytes | None = None
                      ) -> list[tuple[Any, tuple[int, bytes] | None]]: ...

    async def metrics(self, accept: bytes | None = None) -> tuple[bytes, str]: ...

    async def views(self, uri: bytes) -> list[tuple[Any, Any]]: ...

    async def readiness(self) -> dict[str, Any]: ...


IdT = TypeVar("IdT")


class QueueStore(Protocol[IdT]):
    """
    Where durable delivery (``delivery = at_least_once``) keeps the client
    messages it could not forward yet (docs/durable-delivery.md): the
    SQLite file of one process (``wsgateway.durable.sqlite.SQLiteQueueStore``,
    ``IdT`` = ``int``) or Redis Streams shared by a cluster
    (``wsgateway.durable.redis.RedisQueueStore``, ``IdT`` = ``str``). Used by
    ``wsgateway.durable.delivery``, ``wsgateway.durable.relay``, the admin
    API and ``wsgateway.service``; ``tests/unit/durable/test_queue_contract.py`` runs one
    suite against both.

    Ids: ``Entry.id`` is what the store names an entry by (a row id; a
    ``"ROUTE/STREAM-ID"`` string): opaque, pass back only ids this store
    handed out. ``Entry.entry_id`` is a 26-character ULID that never
    changes, not even through a dead letter and ``replay_dead``: the upstream
    dedupes on it, since delivery is at least once.

    Order: entries come back in append order (across routes), except that the
    entries of one connection key are sorted by ``seq`` within the positions
    they occupy (``wsgateway.durable.entries.in_conn_order``): a retry may
    append a connection's later seq before an earlier one.

    Times come from the store's injected clock: ``first_seen`` is when the
    gateway first had the message (``NewEntry.first_seen``, else the append
    time) and never changes; ``enqueued_at`` is the append time, reset by
    ``replay_dead``; retention counts from ``enqueued_at``, ``oldest_age``
    from ``first_seen``.

    Scope: a Redis store reads and expires only the entries of the nodes
    whose lease it holds (itself, and dead nodes it adopted); ``ack``,
    ``attempt_failed``, ``depth``, the dead letters, ``replay_dead`` and
    ``purge`` are cluster-wide. A SQLite store sees its one file.

    Errors: every operation fails with ``QueueUnavailable`` (never another
    exception, never silently) when the store cannot do it now: a read-only
    or full file, an I/O error, Redis down, hung (after its reply timeout)
    or refusing writes. Nothing waits for the store to come back; the next
    operation tries again. A store that is not running refuses ``append``
    with ``QueueUnavailable`` ("not running"); any other operation on a
    SQLite store that was never started raises ``RuntimeError`` (a bug).

    The store is also a Twisted service: ``startService``/``stopService`` run
    ``start``/``stop``, and ``DeliveryService`` makes it its child.
    """

    max_attempts: int  # failed delivery attempts before an entry becomes a dead letter ("max_attempts")
    retention: float  # seconds from enqueued_at before an entry becomes a dead letter ("retention")
    max_bytes: int | None  # what the whole queue may hold ("max_bytes"; None = no cap)
    max_bytes_per_connection: int | None  # what one connection's entries may hold ("max_bytes_per_connection")
    stored_bytes: int | None  # what it held as of the last write, as the caps count it (None: not known yet)

    @property
    def backend(self) -> str:
        """What ``/admin/queue`` reports as ``backend`` (docs/admin-api.md): ``QueueStore`` or ``RedisQueueStore``."""

    @property
    def append_failed_at(self) -> float | None:
        """Clock time of the last failed or refused ``append``; None again after one succeeds (health, 502s)."""

    @property
    def transactions(self) -> int:
        """Group commits written: one per batch of appends, however many ``append`` calls it holds."""

    @property
    def appended(self) -> int:
        """Entries stored by ``append``."""

    @property
    def errors(self) -> int:
        """Operations that failed with ``QueueUnavailable``."""

    def start(self) -> Deferred[None]:
        """
        Open the store. Fires once it is open, or once the first attempt
        failed (logged; operations then fail and retry): it never waits for
        a store that is not there.
        """

    def stop(self) -> Deferred[None]:
        """
        Write what ``append`` accepted before (each caller's Deferred fires as
        usual), then close. Appends after ``stop`` is called are refused.
        """

    def setServiceParent(self, parent: IServiceCollection) -> Any: ...

    def append(self, entries: Sequence[NewEntry]) -> Deferred[list[IdT]]:
        """
        Store ``entries``, in this order, all or none; fires with their ids,
        in the same order. Group commit (``wsgateway.durable.batching``):
        the appends of one reactor turn are written together, in one
        transaction or script. The Deferred fires once that write is done
        (SQLite: committed and fsynced; Redis: the script ran, so as durable
        as Redis' persistence); until then nothing is promised. If the
        write fails, every caller of the batch gets ``QueueUnavailable`` and
        must not treat its entries as accepted (SQLite: nothing was stored;
        Redis: a write that was sent may have been stored all the same, so a
        retry may duplicate, never lose). Cancelling the Deferred takes the
        entries out while they still wait for their batch, not after.

        Caps: an append that would take its connection's entries past
        ``max_bytes_per_connection``, or everything stored (dead letters
        included) past ``max_bytes``, fails with ``QueueFull`` (a
        ``QueueUnavailable``; ``whole`` tells which) and stores nothing;
        the other appends of its batch are not affected. Nothing stored is
        ever dropped to make room. An entry counts its message, claims,
        headers and connection key as stored plus a fixed overhead.
        """

    def pending(self, route: str | None = None, limit: int = 1000) -> Deferred[list[Entry]]:
        """The oldest ``limit`` entries (of ``route``, or of all), in delivery order (see Order)."""

    def pending_for(self, conn_key: str, limit: int = 500) -> Deferred[list[Entry]]:
        """The first ``limit`` entries of one client connection, by ``seq``."""

    def conn_keys(self, limit: int = 100) -> Deferred[list[tuple[str, str]]]:
        """
        ``(route, conn_key)`` of the connections that have entries, the one
        with the oldest entry first: what a replay pass walks through.
        """

    def ack(self, ids: Sequence[IdT]) -> Deferred[int]:
        """Remove delivered entries; fires with how many were removed (each once; unknown ids count 0)."""

    def attempt_failed(self, ids: Sequence[IdT]) -> Deferred[list[IdT]]:
        """
        Count one more failed delivery attempt for ``ids``; those that reach
        ``max_attempts``, or whose ``enqueued_at`` is more than ``retention``
        ago, move to the dead letters (reason ``max_attempts`` or
        ``retention``, ``dead_at`` now). Fires with the ids moved. Ids that
        are no entry (any more) are ignored.
        """

    def expire(self, now: float | None = None) -> Deferred[list[IdT]]:
        """Move every entry older than ``retention`` at ``now`` (default: the clock's) to the dead letters."""

    def depth(self) -> Deferred[dict[str, dict[str, float]]]:
        """
        ``{route: {"depth": n, "oldest_age": seconds, "dead": n}}`` for every
        route with entries or dead letters; ``oldest_age`` from the oldest
        ``first_seen``, 0 when the route has only dead letters.
        """

    def dead_letters(self, limit: int = 100, route: str | None = None) -> Deferred[list[DeadLetter]]:
        """The oldest ``limit`` dead letters (of ``route``, or of all): SQLite by id, Redis in the order they died."""

    def replay_dead(self, ids: Sequence[IdT] | None = None) -> Deferred[int]:
        """
        Put dead letters (``ids``: their ``entry.id``; all when None) back in
        the queue with zero attempts, a fresh retention window and the same
        ``entry_id`` and ``first_seen``; fires with how many moved. SQLite
        keeps ``Entry.id``; Redis gives the entry a new one (a new stream
        entry).
        """

    def purge(self, route: str | None = None, *, dead: bool = False) -> Deferred[int]:
        """Delete the entries (``dead``: the dead letters) of ``route``, or of all routes; fires with how many."""


class RelayTransport(Protocol):
    """
    What the frame relay (``wsgateway.relay``) uses of a transport it owns:
    Twisted's TCP and TLS transports are ones, as are the in-memory ones of
    the tests. ``ITransport`` lacks the producer and consumer halves, which
    are how each leg slows the other down.
    """

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class RelayControl(Protocol):
    """
    What a L{RelayHooks} may use of the relay it is attached to
    (``wsgateway.relay.relay.Relay``), and nothing else: the transports and
    scanners, the state flags, and the relay's own ways of ending things.

    Hooks set only these flags: ``holding`` and ``reconnecting`` (their own
    state, which the relay consults), ``close_from_upstream`` (when a hook
    answers an upstream's close itself) and ``closed_to_upstream`` (when a
    hook sends the upstream its close itself).
    """

    log: Any
    client: RelayTransport
    upstream: RelayTransport | None  # None while no upstream leg is open
    c2u: Any  # FrameScanner, client -> upstream
    u2c: Any  # FrameScanner, upstream -> client
    write_buffer: int
    last_activity: float  # clock time of the last data frame either way
    holding: bool
    reconnecting: bool
    done: bool
    closed_by: str | None
    closed_to_client: bool
    closed_to_upstream: bool
    close_from_client: bool
    close_from_upstream: bool
    client_lost: bool
    upstream_lost: bool
    upstream_vanished: bool

    def upstream_gone(self, vanished: bool) -> None:
        """The upstream leg is gone and nothing more goes to it (a hook finds another one)."""

    def upstream_reconnected(self, transport: RelayTransport) -> Any:
        """A new upstream leg is open: relay on it; returns its protocol."""

    def finish_client(self) -> None:
        """Both halves of the client's close handshake are done: close its TCP connection."""

    def give_up(self) -> None:
        """No upstream any more: 1014 to the client (unless it is closing already)."""

    def client_violation(self, code: int, reason: str) -> None:
        """Close the client with ``code`` and fail its stream; 1001 upstream."""

    def close(self, code: int, reason: str) -> None:
        """Close both legs with ``code``."""


class RelayHooks(Protocol):
    """
    What the frame relay asks of the collaborator that decides what happens
    when the upstream leg is lost: by default nothing (the client gets
    1014), ``on_upstream_close = reconnect`` holds client frames in memory
    while it opens a new leg (``wsgateway.relay.reconnect``), and
    ``delivery = at_least_once`` queues them in a store
    (``wsgateway.durable.relay``).

    No hook runs per relayed message on a live connection: the relay calls
    them on leg and close events, on control frames from the upstream, and
    for client data only while ``relay.holding``. What a hook needs to see of
    every live write it gets by wrapping the transport (``upstream_transport``).
    """

    mirrors_held: bool  # whether client frames go to the route's mirror while held

    def attach(self, relay: RelayControl) -> None:
        """The relay this collaborates with, before its state exists: keep it, use it later."""

    def upstream_transport(self, transport: RelayTransport) -> RelayTransport:
        """An upstream leg was opened: the transport the relay is to write to for it."""

    def client_reader(self, client: RelayTransport) -> IPushProducer:
        """The IPushProducer registered with each upstream transport: the client as its producer."""

    def started(self) -> None:
        """The relay is wired up (its timers too)."""

    def hold(self, out: bytes) -> None:
        """Client frames read while ``relay.holding``, in place of the upstream's write."""

    def upstream_control(self, opcode: int, payload: bytes) -> bool | None:
        """
        A control frame from the upstream other than the answer to the
        relay's own ping: None to leave it to the relay, else whether it
        goes on to the client (the hook has handled it).
        """

    def upstream_connection_lost(self, vanished: bool) -> bool:
        """The upstream leg's connection is gone: True if the hook took it over (the relay does nothing)."""

    def awaits_upstream_close(self) -> bool:
        """
        The client is gone: True to wait for the upstream's answer to our
        close (bounded by the close timer) rather than drop it right after
        the close frame.
        """

    def closing_upstream(self) -> bool:
        """The relay is about to send the upstream its close: True if the hook ended the leg itself."""

    def stop_reconnecting(self) -> None:
        """No new upstream leg is wanted any more (the client closes or leaves, a drain, an expired token)."""

    def leg_headers(self) -> dict[str, str] | None:
        """
        None: a new upstream leg is opened as the client's was. Else (durable
        delivery) it carries these headers too, and its connect failures are
        quiet, as a replay connection's: the hooks keep retrying.
        """

    def upstream_reconnected(self) -> None:
        """The relay is wired to a new upstream leg (``relay.upstream_reconnected``)."""

    def maybe_done(self) -> None:
        """The relay checks whether both legs are gone (it may be done right after)."""


class DurableQueue(Protocol):
    """
    What the live connections and the handshake use of the durable queue
    (``wsgateway.durable.delivery.DeliveryService``): its store and callbacks
    for each durable relay's QueueLink, whether it takes appends now, and the
    registry of the relays that deliver their own entries. The link is one
    way: the queue never calls back into the connections.
    """

    store: Any

    @property
    def available(self) -> bool: ...

    def delivered(self, n: int) -> None: ...

    def failed(self, operation: str) -> None: ...

    def track(self, conn_key: str, delivery: Any) -> None:
        """A live relay of this process holds ``conn_key``'s entries: the Deliverer leaves them to it."""

    def untrack(self, conn_key: str, delivery: Any) -> None:
        """That relay ended (a no-op unless ``delivery`` is the one tracked); what it left queued is replayed."""
