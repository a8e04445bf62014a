"""The transport interface: register memory once, then write batches into a peer's memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future

from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.transfer.plan import WriteEntry


class UnsettledWrite(TransferError):
    """A write that was not final by its deadline: its bytes may still land (Mooncake
    keeps a stalled write going after it gave up on it). `settled` completes once the
    transport knows that nothing more of it can land; until then neither the source
    blocks nor the destination blocks may be reused."""

    def __init__(self, message: str, settled: Future[None]) -> None:
        super().__init__(FailureReason.TIMEOUT, message)
        self.settled = settled


class Transport(ABC):
    """Moves bytes from this process's registered memory into a peer's registered memory.

    `write` is synchronous and returns only when the bytes are in the peer's memory; it
    raises TransferError when the write failed and nothing more of it can land, and
    UnsettledWrite when it did not end within `timeout`. Thread-safe: callers run it off
    the event loop.
    """

    # The transport the bytes actually take ("tcp", "rdma"; "memory" in tests): not
    # always the one asked for (Mooncake uses TCP when it finds no RDMA device).
    protocol: str = "tcp"

    @property
    @abstractmethod
    def session_id(self) -> str:
        """How peers address this process: "host:port", host an IP address."""

    @abstractmethod
    def register(self, ptr: int, nbytes: int) -> None: ...

    @abstractmethod
    def write(
        self, target_session: str, entries: Sequence[WriteEntry], timeout: float | None = None
    ) -> None:
        """All entries in one call (one batch); `timeout` None: no deadline."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine."""
