"""
Protocols between the packages of wsgateway, in one place (as Twisted keeps
``iweb.py``): a package depends on what it needs of another through these,
never on the other's classes, so no two packages import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from twisted.application.service import IService
    from twisted.internet.interfaces import IProtocolFactory

    from wsgateway.config.loader import GatewayConfig


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

    async def metrics(self) -> bytes: ...

    async def views(self, uri: bytes) -> list[tuple[Any, Any]]: ...

    async def readiness(self) -> dict[str, Any]: ...
