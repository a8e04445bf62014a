"""The transport interface: register memory once, then write batches into a peer's memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from deepstack_runtime.transfer.plan import WriteEntry


class Transport(ABC):
    """Moves bytes from this process's registered memory into a peer's registered memory.

    `write` is synchronous and returns only when the bytes are in the peer's memory; it
    raises TransferError on failure. Thread-safe: callers run it off the event loop.
    """

    # The transport the bytes actually take ("tcp", "rdma"; "memory" in tests): not
    # always the one asked for (Mooncake uses TCP when it finds no RDMA device).
    protocol: str = "tcp"

    @property
    @abstractmethod
    def session_id(self) -> str:
        """How peers address this process."""

    @abstractmethod
    def register(self, ptr: int, nbytes: int) -> None: ...

    @abstractmethod
    def write(self, target_session: str, entries: Sequence[WriteEntry]) -> None:
        """All entries in one call (one batch)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine."""
