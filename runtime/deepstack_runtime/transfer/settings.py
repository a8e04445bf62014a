"""Limits shared by both ends of a transfer (from the CR's spec.transfer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransferSettings:
    default_tokens: int = 4096  # language side's first allocation per request
    handshake_timeout: float = 10.0
    transfer_timeout: float = 60.0  # whole request, resumptions included
    resume_timeout: float = 30.0  # one resume round
    max_rounds: int = 8  # resume requests per request; 0 disables resumption
    max_queued: int = 64  # receipts waiting for blocks; more are refused (POOL_EXHAUSTED)
    checksum: bool = False  # per-block checksums, computed by the sender, checked by the receiver

    def __post_init__(self) -> None:
        if self.default_tokens < 1:
            raise ValueError("default_tokens must be >= 1")
        if min(self.handshake_timeout, self.transfer_timeout, self.resume_timeout) <= 0:
            raise ValueError("timeouts must be > 0")
        if self.max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        if self.max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")

    @property
    def room_wait(self) -> float:
        """How long an encoder waits for a receiver's room to be submitted: the receiver's
        deadline less one handshake, so that its answer arrives before that deadline."""
        return max(self.transfer_timeout - self.handshake_timeout, self.handshake_timeout)
