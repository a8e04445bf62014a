"""Transport over the Mooncake transfer engine (`mooncake-transfer-engine`), RDMA or TCP.

A write is submitted without waiting (`transfer_submit_write`) and polled
(`transfer_check_status`) until Mooncake reports a final status: COMPLETED (over tcp,
the receiver has acknowledged that the bytes are in its memory) or FAILED (nothing more
of it moves). Mooncake's synchronous calls give up after MC_TRANSFER_TIMEOUT and return
-1 while the write goes on (a stalled tcp write lands in full once its receiver runs
again), and they spin a core while they wait; polling keeps the write's handle, so that
a write past its deadline is handed to a settler thread, which says when it is final.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.transfer.base import Transport, UnsettledWrite
from deepstack_runtime.transfer.plan import WriteEntry

# The PyPI builds of Mooncake that register GPU memory (the CUDA 12 and CUDA 13 builds);
# `mooncake-transfer-engine-non-cuda` registers host memory only.
CUDA_DISTRIBUTIONS = ("mooncake-transfer-engine", "mooncake-transfer-engine-cuda13")
# The CR's `rdmaDevices: [auto]`: every device Mooncake finds, which an empty device
# filter means to Mooncake (a device named "auto" would match none).
AUTO_DEVICES = "auto"
# Mooncake's transfer_check_status answers.
_COMPLETED, _FAILED = 1, -1
# Polling a write: spin (each check releases the GIL) for as long as a small write takes
# over loopback, then sleep, doubling up to the cap: a longer or stalled write then costs
# nearly no CPU. (A 2 ms spin cost an encode pod serving cached rows 4 ms of CPU a request.)
_SPIN_SECONDS = 2e-4
_FIRST_SLEEP, _MAX_SLEEP = 50e-6, 1e-3
_SETTLE_INTERVAL = 0.02


def buffer_device() -> str:
    """Where a pool registered with this Mooncake build lives: the GPU when there is one
    and the installed Mooncake is the CUDA build, host memory otherwise."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    for distribution in CUDA_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def device_filter(devices: str) -> str:
    """Mooncake's device filter for the configured devices ("mlx5_0,mlx5_1", or "auto")."""
    return "" if devices.strip() == AUTO_DEVICES else devices


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


def mooncake_environment(
    write_timeout: float | None, ports: tuple[int, int] | None
) -> dict[str, str]:
    """The variables that make Mooncake follow the runtime's configuration: its own
    write timeout, and the range of the ports it listens on (its handshake RPC port and,
    over tcp, its data port, each picked at random within it), which a NetworkPolicy
    admits."""
    env = {}
    if write_timeout is not None:
        env["MC_TRANSFER_TIMEOUT"] = str(math.ceil(write_timeout))
    if ports is not None:
        env["MC_MIN_RPC_PORT"], env["MC_MAX_RPC_PORT"] = str(ports[0]), str(ports[1])
    return env


class _Settler:
    """Polls writes that missed their deadline until Mooncake reports each final."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._watched: list[tuple[list[int], Future[None]]] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def watch(self, batches: list[int]) -> Future[None]:
        settled: Future[None] = Future()
        with self._changed:
            self._watched.append((batches, settled))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="mooncake-settler", daemon=True
                )
                self._thread.start()
            self._changed.notify()
        return settled

    @property
    def unsettled(self) -> int:
        with self._changed:
            return len(self._watched)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._watched or self._stopping)
                if self._stopping:
                    return
                watched = list(self._watched)
            for batches, settled in watched:
                batches[:] = [b for b in batches if not _final(self._engine, b)]
                if not batches:
                    with self._changed:
                        self._watched.remove((batches, settled))
                    settled.set_result(None)
            time.sleep(_SETTLE_INTERVAL)

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()


def _final(engine: Any, batch: int) -> bool:
    """Whether a submitted write has ended; Mooncake frees the batch when it says so
    (its status must not be asked again)."""
    return int(engine.transfer_check_status(batch)) in (_COMPLETED, _FAILED)


class MooncakeTransport(Transport):
    """Peer-to-peer handshake (no metadata server): a peer is addressed by
    "host:rpc_port" of its engine."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        protocol: str = "tcp",
        devices: str = "",
        *,
        write_timeout: float | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol must be tcp or rdma, got {protocol!r}")
        # Mooncake reads its ports when its library loads, its timeout when an engine is
        # made: both before the import.
        os.environ.update(mooncake_environment(write_timeout, ports))
        from mooncake.engine import TransferEngine  # heavy native import, only here

        self._engine: Any = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device_filter(devices))
        if rc != 0:
            raise RuntimeError(
                f"Mooncake TransferEngine.initialize({host!r}, {protocol!r}) returned {rc}"
            )
        rpc_port = int(self._engine.get_rpc_port())
        if ports is not None and not ports[0] <= rpc_port <= ports[1]:
            raise RuntimeError(
                f"Mooncake listens on {rpc_port}, outside the configured {ports[0]}-"
                f"{ports[1]}: mooncake.engine was loaded before its ports could be set "
                "(it reads MC_MIN_RPC_PORT once, when it loads)"
            )
        self._session = f"{host}:{rpc_port}"
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
        self._settler = _Settler(self._engine)
        self.calls = 0  # transfer calls made, for benchmarks

    @property
    def session_id(self) -> str:
        return self._session

    @property
    def unsettled(self) -> int:
        """Writes past their deadline that Mooncake has not yet reported final."""
        return self._settler.unsettled

    def register(self, ptr: int, nbytes: int) -> None:
        rc = self._engine.register_memory(ptr, nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory({nbytes} bytes) returned {rc}")
        self._registered.append((ptr, nbytes))

    def write(
        self, target_session: str, entries: Sequence[WriteEntry], timeout: float | None = None
    ) -> None:
        if not entries:
            return
        with self._lock:
            self.calls += 1
        nbytes = sum(e.nbytes for e in entries)
        what = f"Mooncake write of {nbytes} bytes to {target_session}"
        started = time.monotonic()
        deadline = math.inf if timeout is None else started + timeout
        pending: list[int] = []
        failed = 0
        unstarted = ""
        for e in entries:  # one batch each: only a batch's first write can be polled
            batch = int(self._engine.transfer_submit_write(
                target_session, e.src_ptr, e.dst_ptr, e.nbytes
            ))  # fmt: skip
            if batch == 0:
                unstarted = " to start (Mooncake could not open the peer's segment)"
                break
            pending.append(batch)
        delay = _FIRST_SLEEP
        while pending:
            waiting = []
            for batch in pending:
                status = int(self._engine.transfer_check_status(batch))
                if status == _FAILED:
                    failed += 1
                elif status != _COMPLETED:  # waiting (or a slice timeout: not final)
                    waiting.append(batch)
            pending = waiting
            if not pending:
                break
            now = time.monotonic()
            if now >= deadline:
                raise UnsettledWrite(
                    f"{what} not done within {timeout:g}s; its blocks stay fenced until "
                    "Mooncake reports it final",
                    self._settler.watch(pending),
                )
            if now - started > _SPIN_SECONDS:
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, _MAX_SLEEP)
        if failed or unstarted:
            raise TransferError(FailureReason.TRANSFER_ERROR, f"{what} failed{unstarted}")

    def close(self) -> None:
        self._settler.stop()
        for ptr, _ in self._registered:
            self._engine.unregister_memory(ptr)
        self._registered.clear()
