"""Limits shared by both ends of a transfer (from the CR's spec.transfer)."""

from __future__ import annotations

from dataclasses import dataclass

from deepstack_runtime.config import TRANSFER_DEFAULTS, TRANSFER_KNOBS, TransferConfig

# Mooncake's own allowance for a write's size on top of its timeout (MC_TRANSFER_TIMEOUT),
# which ours follows: one second per GB.
WRITE_SECONDS_PER_BYTE = 1e-9


@dataclass(frozen=True)
class TransferSettings:
    """The transfer's view of spec.transfer (from_config); each default is the knob's in
    config.TRANSFER_KNOBS."""

    # language side's first allocation per request
    default_tokens: int = TRANSFER_DEFAULTS["default_allocation_tokens"]
    handshake_timeout: float = TRANSFER_DEFAULTS["handshake_timeout_seconds"]
    # whole request, resumptions included
    transfer_timeout: float = TRANSFER_DEFAULTS["transfer_timeout_seconds"]
    resume_timeout: float = TRANSFER_DEFAULTS["resume_timeout_seconds"]  # one resume round
    # One Mooncake write: not final by then, its request fails (the write stays fenced
    # until Mooncake says it is final). Also how long a receiver that lost its sender
    # mid-write keeps the blocks fenced. Below transfer_timeout; None: half of it.
    write_timeout: float | None = TRANSFER_DEFAULTS["write_timeout_seconds"]
    # resume requests per request; 0 disables resumption
    max_rounds: int = TRANSFER_DEFAULTS["resume_max_rounds"]
    # Receipts waiting for blocks (more are refused: POOL_EXHAUSTED); on the encode side,
    # also the rooms one peer may wait for before they are submitted.
    max_queued: int = TRANSFER_DEFAULTS["max_queued_requests"]
    # per-block checksums, computed by the sender, checked by the receiver
    checksum: bool = TRANSFER_DEFAULTS["checksum"]

    @classmethod
    def from_config(cls, config: TransferConfig) -> TransferSettings:
        """From the runtime configuration's transfer section (TRANSFER_KNOBS' mapping)."""
        return cls(
            **{
                knob.settings: getattr(config, knob.field)
                for knob in TRANSFER_KNOBS
                if knob.settings
            }
        )

    def __post_init__(self) -> None:
        if self.default_tokens < 1:
            raise ValueError("default_tokens must be >= 1")
        timeouts = (self.handshake_timeout, self.transfer_timeout, self.resume_timeout)
        if min(*timeouts, self.write_seconds) <= 0:
            raise ValueError("timeouts must be > 0")
        if self.write_seconds >= self.transfer_timeout:
            raise ValueError(
                f"write_timeout ({self.write_seconds:g}s) must be below transfer_timeout "
                f"({self.transfer_timeout:g}s): a failed write must end before its request"
            )
        if self.max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        if self.max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")

    @property
    def room_wait(self) -> float:
        """How long an encoder waits for a receiver's room to be submitted: the receiver's
        deadline less one handshake, so that its answer arrives before that deadline."""
        return max(self.transfer_timeout - self.handshake_timeout, self.handshake_timeout)

    @property
    def write_seconds(self) -> float:
        """The write timeout: as set, else half the transfer timeout (Mooncake's own 30 s
        for the default 60 s)."""
        return self.transfer_timeout / 2 if self.write_timeout is None else self.write_timeout

    def write_deadline(self, nbytes: int) -> float:
        """Seconds one write of `nbytes` may take before its request fails (Mooncake's own
        rule for MC_TRANSFER_TIMEOUT: the timeout plus one second per GB)."""
        return self.write_seconds + nbytes * WRITE_SECONDS_PER_BYTE
