"""Transfer and buffer metrics (prometheus-client, own registry, base units).

Who records what, so that sums across pods mean something:
- bytes, resumed bytes: the side that writes (encode);
- resumptions, duration (hello to last byte): the side that waits (language);
- failures, in-flight requests, buffer blocks: each side for itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from deepstack_runtime.errors import FailureReason

# aux: fill ids, positions, block headers and padding (see BufferLayout.payload_bytes).
PAYLOAD_LABELS = ("embedding", "deepstack", "aux")
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


@dataclass(frozen=True)
class ChunkStats:
    """One chunk written by the encode side."""

    bytes_by_payload: Mapping[str, int] = field(default_factory=dict)
    resumed: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_payload.values())


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.bytes = Counter(
            "deepstack_transfer_bytes",
            "Bytes written to peers, by payload.",
            ["payload"],
            registry=r,
        )
        self.duration = Histogram(
            "deepstack_transfer_duration_seconds",
            "Time from handshake to the last byte received, per request (language side).",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.resumptions = Counter(
            "deepstack_transfer_resumptions",
            "Resume requests: sequences longer than the receiver's allocation.",
            registry=r,
        )
        self.resumed_bytes = Counter(
            "deepstack_transfer_resumed_bytes",
            "Bytes written in resumed rounds (after the first round of a request).",
            registry=r,
        )
        self.failures = Counter(
            "deepstack_transfer_failures",
            "Transfers that did not complete, by reason.",
            ["reason"],
            registry=r,
        )
        self.blocks = Gauge(
            "deepstack_buffer_blocks",
            "Buffer blocks by state.",
            ["state"],
            registry=r,
        )
        self.buffer_memory = Gauge(
            "deepstack_buffer_memory_info",
            "Where the buffer pool lives: memory (host or device) and device; always 1.",
            ["memory", "device"],
            registry=r,
        )
        self.inflight = Gauge(
            "deepstack_transfer_inflight_requests",
            "Transfers in progress.",
            registry=r,
        )
        self.scattered = Counter(
            "deepstack_transfer_scattered",
            "Encoded items copied into the pool (encode side): the vision tower could not "
            "write them in place (another dtype, or no single run of free blocks).",
            registry=r,
        )
        self.gathered = Counter(
            "deepstack_transfer_gathered",
            "Received items copied out of the pool because their blocks were not one run "
            "(the others are read where they landed).",
            registry=r,
        )
        self.queued = Gauge(
            "deepstack_transfer_queued_requests",
            "Receivers waiting for enough free blocks to be admitted (language side).",
            registry=r,
        )
        self.verified = Gauge(
            "deepstack_transfer_verified",
            "1 once this language server has received a check transfer from an encode peer "
            "and found every byte as sent, by the transport it took (tcp or rdma); what "
            "the operator's transfer-ready readiness gate reads.",
            ["transport"],
            registry=r,
        )
        # Every series exists from the start, at zero.
        for payload in PAYLOAD_LABELS:
            self.bytes.labels(payload=payload)
        for reason in FailureReason:
            self.failures.labels(reason=reason.value)
        for state in ("used", "free", "fenced"):
            self.blocks.labels(state=state)

    def record_chunk(self, stats: ChunkStats) -> None:
        for payload, nbytes in stats.bytes_by_payload.items():
            self.bytes.labels(payload=payload).inc(nbytes)
        if stats.resumed:
            self.resumed_bytes.inc(stats.total_bytes)

    def record_failure(self, reason: FailureReason) -> None:
        self.failures.labels(reason=reason.value).inc()

    def set_buffer_memory(self, memory: str, device: str) -> None:
        self.buffer_memory.labels(memory=memory, device=device).set(1)

    def set_fenced(self, fenced: int) -> None:
        """Used blocks kept until their encoder can no longer write into them."""
        self.blocks.labels(state="fenced").set(fenced)

    def set_blocks(self, used: int, free: int) -> None:
        self.blocks.labels(state="used").set(used)
        self.blocks.labels(state="free").set(free)
