"""Whether this operator instance is the active one of its kopf peering.

With more than one operator replica, kopf peering keeps one active: kopf pauses the watch
streams of an instance while another one of the same peering with a higher (or the same)
priority is alive. It tells no handler, though, and our work queue runs beside kopf: its
workers and requeue timers would go on reconciling (applying, scaling, posting events)
beside the active instance. So every queued key passes this gate first. The gate reads
the peering object kopf keeps its records in (`status`: identity -> priority, lifetime,
lastseen) and applies kopf's rule to it (`blocking_peers`, pure).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# kopf's lifetime of a record that names none, in seconds.
DEFAULT_LIFETIME = 60
# The peering object is read at most this often (per object) however many keys ask.
CACHE_SECONDS = 1.0

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Peering:
    """This instance in its peering, as it was given to kopf."""

    name: str  # of the ClusterKopfPeering, or of the KopfPeering in each namespace
    identity: str  # our key in the peering object's status
    priority: int
    clusterwide: bool


def _timestamp(value: object) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def blocking_peers(
    records: Mapping[str, Any], *, identity: str, priority: int, now: datetime.datetime
) -> list[str]:
    """The peers that pause us by kopf's rule: alive (last seen less than their lifetime
    ago; a record without a time counts as seen now), not us, with a priority at least
    ours (an equal one pauses both, as kopf does: two active operators would fight)."""
    blocking = []
    for peer, record in sorted(records.items()):
        if peer == identity or not isinstance(record, Mapping):
            continue
        try:
            their_priority = int(record.get("priority", 0))
            lifetime = int(record.get("lifetime", DEFAULT_LIFETIME))
        except (TypeError, ValueError):
            blocking.append(peer)  # unreadable: assume it may be acting
            continue
        lastseen = _timestamp(record.get("lastseen")) or now
        if lastseen + datetime.timedelta(seconds=lifetime) <= now:
            continue  # dead: kopf removes such records
        if their_priority >= priority:
            blocking.append(peer)
    return blocking


class PeeringGate:
    """Answers "may this instance act on a resource in this namespace now?".

    `read(namespace)` returns the peering object (the cluster one when namespace is None),
    or None when there is none. Without a peering object kopf never starts (resumes) the
    watch streams either, so no object, or one that cannot be read, means "not now".
    `report(where, active)` is told every answer read from the server."""

    def __init__(
        self,
        peering: Peering | None,
        read: Callable[[str | None], Manifest | None],
        *,
        report: Callable[[str, bool], None] = lambda where, active: None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.peering = peering
        self._read = read
        self._report = report
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._answers: dict[str | None, tuple[float, bool]] = {}

    def where(self, namespace: str) -> str | None:
        """The namespace of the peering object that decides for `namespace` (None: the
        cluster-wide one)."""
        assert self.peering is not None
        return None if self.peering.clusterwide else namespace

    def active(self, namespace: str) -> bool:
        if self.peering is None:
            return True  # standalone
        where = self.where(namespace)
        with self._lock:
            cached = self._answers.get(where)
            if cached is not None and self._clock() - cached[0] < CACHE_SECONDS:
                return cached[1]
            active = self._decide(where)
            previous = self._answers.get(where)
            self._answers[where] = (self._clock(), active)
        if previous is None or previous[1] != active:
            log.info(
                "%s in peering %s%s",
                "active" if active else "paused",
                self.peering.name,
                f" of namespace {where}" if where else "",
            )
        self._report(f"{where}/{self.peering.name}" if where else self.peering.name, active)
        return active

    def _decide(self, where: str | None) -> bool:
        assert self.peering is not None
        try:
            obj = self._read(where)
        except Exception as e:  # the server's trouble: act again once it answers
            log.warning("cannot read peering %s: %s", self.peering.name, e)
            return False
        if obj is None:
            return False
        blocking = blocking_peers(
            obj.get("status") or {},
            identity=self.peering.identity,
            priority=self.peering.priority,
            now=self._now(),
        )
        if blocking:
            log.debug("paused in favour of %s", ", ".join(blocking))
        return not blocking
