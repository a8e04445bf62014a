"""What the encode and language servers share: their end of the transfer (settings, the
block pool, Mooncake) from the runtime configuration, and how a transfer's failure is
answered over HTTP."""

from __future__ import annotations

import logging

from aiohttp import web

from deepstack_runtime.buffers import BufferLayout, MultimodalDataBuffers
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.errors import FailureReason, TransferError
from deepstack_runtime.metrics import TransferMetrics
from deepstack_runtime.servers.common import Listen, busy, error
from deepstack_runtime.transfer.mooncake import MooncakeTransport, buffer_device
from deepstack_runtime.transfer.settings import TransferSettings

log = logging.getLogger(__name__)
# Transfer failures that are the caller's own mistakes (400); most others may be retried.
_CLIENT_REASONS = {FailureReason.BAD_REQUEST, FailureReason.DUPLICATE_ROOM, FailureReason.OVERSIZE}


def transfer_settings(config: RuntimeConfig) -> TransferSettings:
    return TransferSettings.from_config(config.transfer)


def buffer_layout(config: RuntimeConfig) -> BufferLayout:
    return BufferLayout(
        num_blocks=config.transfer.pool_blocks,
        block_tokens=config.transfer.block_tokens,
        hidden_size=config.deepstack.hidden_size,
        num_deepstack=config.deepstack.num_layers,
        dtype=config.deepstack.dtype,
    )


def transfer_error(e: TransferError) -> web.Response:
    """A failed transfer's answer: busy (503, Retry-After) while the pool is full, the
    caller's mistake (400), a timeout (504), or the peer's failure (502, with its reason
    for the router to blame)."""
    message = f"transfer failed ({e.reason.value}): {e.message}"
    if e.reason is FailureReason.POOL_EXHAUSTED:
        return busy(message)  # full now, free again soon: retry later or elsewhere
    status = (
        400 if e.reason in _CLIENT_REASONS else 504 if e.reason is FailureReason.TIMEOUT else 502
    )
    return error(status, message, "transfer_error", reason=e.reason.value)


def transport(config: RuntimeConfig, listen: Listen) -> MooncakeTransport:
    t = config.transfer
    made = MooncakeTransport(
        listen.advertise_host,
        t.protocol,
        ",".join(t.rdma_devices),
        write_timeout=transfer_settings(config).write_seconds,
        ports=(t.mooncake_min_port, t.mooncake_max_port),
    )
    if made.fallback:
        log.warning("transfer.protocol is %s, but %s", t.protocol, made.fallback)
    return made


def buffers(config: RuntimeConfig, metrics: TransferMetrics) -> MultimodalDataBuffers:
    """The pool, in device memory where the Mooncake build can register it."""
    device = buffer_device()
    pool = MultimodalDataBuffers(buffer_layout(config), device=device)
    memory = "host" if device == "cpu" else "device"
    metrics.set_buffer_memory(memory, device)
    log.info("buffers: %d MiB in %s memory (%s)", pool.nbytes >> 20, memory, device)
    return pool


def check_checkpoint(hidden_size: int, num_deepstack: int, layout: BufferLayout) -> None:
    if (hidden_size, num_deepstack) != (layout.hidden_size, layout.num_deepstack):
        raise SystemExit(
            f"the checkpoint has hidden size {hidden_size} and {num_deepstack} DeepStack "
            f"layers; the configuration says {layout.hidden_size} and {layout.num_deepstack}"
        )
