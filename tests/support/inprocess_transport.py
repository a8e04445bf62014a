"""A transport between pools of one process (memmove). For unit tests of pure logic only."""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Sequence

from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.transfer.base import Transport
from deepstack_runtime.transfer.plan import WriteEntry

_ids = itertools.count()
_REGISTRY: dict[str, InProcessTransport] = {}


class InProcessTransport(Transport):
    def __init__(self) -> None:
        # "host:port" as Mooncake's, on loopback: an encoder accepts a session only on
        # the connecting peer's own address.
        self._session = f"127.0.0.1:{next(_ids)}"
        self._regions: list[tuple[int, int]] = []
        self.calls = 0
        _REGISTRY[self._session] = self

    @property
    def session_id(self) -> str:
        return self._session

    def register(self, ptr: int, nbytes: int) -> None:
        self._regions.append((ptr, nbytes))

    def _owns(self, ptr: int, nbytes: int) -> bool:
        return any(start <= ptr and ptr + nbytes <= start + size for start, size in self._regions)

    def write(
        self, target_session: str, entries: Sequence[WriteEntry], timeout: float | None = None
    ) -> None:
        self.calls += 1
        peer = _REGISTRY.get(target_session)
        if peer is None:
            raise TransferError(FailureReason.PEER_LOST, f"no peer {target_session}")
        for e in entries:
            if not self._owns(e.src_ptr, e.nbytes) or not peer._owns(e.dst_ptr, e.nbytes):
                raise TransferError(
                    FailureReason.TRANSFER_ERROR, f"{e} is outside registered memory"
                )
        for e in entries:
            ctypes.memmove(e.dst_ptr, e.src_ptr, e.nbytes)

    def close(self) -> None:
        _REGISTRY.pop(self._session, None)
