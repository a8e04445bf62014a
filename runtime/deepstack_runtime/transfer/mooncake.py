"""Transport over the Mooncake transfer engine (`mooncake-transfer-engine`), RDMA or TCP."""

from __future__ import annotations

import importlib.metadata
import json
import threading
from collections.abc import Sequence
from typing import Any

from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.transfer.base import Transport
from deepstack_runtime.transfer.plan import WriteEntry

# The PyPI builds of Mooncake: the CUDA one registers GPU memory, the other host memory only.
CUDA_DISTRIBUTION = "mooncake-transfer-engine"


def buffer_device() -> str:
    """Where a pool registered with this Mooncake build lives: the GPU when there is one
    and the installed Mooncake is the CUDA build, host memory otherwise."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        importlib.metadata.distribution(CUDA_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}"


def rdma_devices(engine: Any) -> list[str]:
    """The RDMA devices (HCAs) an initialized engine found, from its topology: JSON of
    {location: [[preferred devices], [other devices]]}."""
    try:
        topology = json.loads(engine.get_local_topology(""))
    except (ValueError, TypeError, RuntimeError):
        return []
    found: set[str] = set()
    for tiers in topology.values() if isinstance(topology, dict) else ():
        for tier in tiers if isinstance(tiers, list) else ():
            found.update(str(device) for device in tier if isinstance(tier, list))
    return sorted(found)


class MooncakeTransport(Transport):
    """Peer-to-peer handshake (no metadata server): a peer is addressed by
    "host:rpc_port" of its engine."""

    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp", devices: str = "") -> None:
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol must be tcp or rdma, got {protocol!r}")
        from mooncake.engine import TransferEngine  # heavy native import, only here

        self._engine: Any = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, devices)
        if rc != 0:
            raise RuntimeError(
                f"Mooncake TransferEngine.initialize({host!r}, {protocol!r}) returned {rc}"
            )
        self._session = f"{host}:{self._engine.get_rpc_port()}"
        # Asked for RDMA but given no device, Mooncake serves over TCP without an error:
        # say which it is, so that the fallback is never silent.
        self.devices = rdma_devices(self._engine)
        self.protocol = "rdma" if protocol == "rdma" and self.devices else "tcp"
        self.fallback = (
            "no RDMA device found (Mooncake's topology lists none): transfers use TCP"
            if protocol != self.protocol
            else ""
        )
        self._registered: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.calls = 0  # transfer calls made, for benchmarks

    @property
    def session_id(self) -> str:
        return self._session

    def register(self, ptr: int, nbytes: int) -> None:
        rc = self._engine.register_memory(ptr, nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory({nbytes} bytes) returned {rc}")
        self._registered.append((ptr, nbytes))

    def write(self, target_session: str, entries: Sequence[WriteEntry]) -> None:
        if not entries:
            return
        with self._lock:
            self.calls += 1
        if len(entries) == 1:
            e = entries[0]
            rc = self._engine.transfer_sync_write(target_session, e.src_ptr, e.dst_ptr, e.nbytes)
        else:
            rc = self._engine.batch_transfer_sync_write(
                target_session,
                [e.src_ptr for e in entries],
                [e.dst_ptr for e in entries],
                [e.nbytes for e in entries],
            )
        if rc != 0:
            raise TransferError(
                FailureReason.TRANSFER_ERROR,
                f"Mooncake write of {sum(e.nbytes for e in entries)} bytes to {target_session} "
                f"failed (rc={rc})",
            )

    def close(self) -> None:
        for ptr, _ in self._registered:
            self._engine.unregister_memory(ptr)
        self._registered.clear()
