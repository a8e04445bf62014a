"""The transfer-ready readiness gate of language pods.

A language pod checks one real transfer from an encode pod before it asks for traffic
(deepstack_runtime.transfer.check) and then shows `deepstack_transfer_verified{transport}`
at 1 on its metrics port. The operator reads that and sets the pod's
`disagg.deepstack.dev/transfer-ready` condition, so that the pod turns Ready only once a
transfer has been seen to work, and says which transport it took.

The pure parts (which pods to look at, what their metrics say, the condition, the
summary) are here; reconcile.py does the I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from deepstack_operator import names

Manifest = dict[str, Any]
VERIFIED_METRIC = "deepstack_transfer_verified"
VERIFIED_REASON = "TransferVerified"
_TRANSPORT = re.compile(r"over (\w+)")


def _conditions(pod: Manifest) -> dict[str, str]:
    return {
        c.get("type", ""): c.get("status", "")
        for c in (pod.get("status") or {}).get("conditions") or []
    }


def awaiting_gate(pod: Manifest) -> bool:
    """A language pod, live, not Ready, whose gate is not yet open: the operator looks
    at it again soon. A pod Ready without the gate is not ours to judge (a simulated
    pod: nothing there can transfer)."""
    labels = pod["metadata"].get("labels") or {}
    conditions = _conditions(pod)
    return (
        labels.get(names.ROLE_LABEL) == "language"
        and not pod["metadata"].get("deletionTimestamp")
        # Placed on a node (starting or running); not one that cannot be scheduled: that
        # waits for capacity, not for us, and would keep the operator looking for nothing.
        and bool((pod.get("spec") or {}).get("nodeName"))
        and (pod.get("status") or {}).get("phase") in ("Pending", "Running")
        and conditions.get(names.TRANSFER_READY_GATE) != "True"
        and conditions.get("Ready") != "True"
    )


def text_only_condition(now: str) -> Manifest:
    """The gate of a language pod that has no encode group to verify a transfer with."""
    return {
        "type": names.TRANSFER_READY_GATE,
        "status": "True",
        "reason": "NoEncodeGroup",
        "message": "the encode group is held at zero pods: text only, nothing to transfer",
        "lastTransitionTime": now,
    }


def can_check(pod: Manifest) -> bool:
    """Awaiting its gate, and its server is up (its containers are ready): its metrics
    can say whether its transfer check passed."""
    status = pod.get("status") or {}
    return (
        awaiting_gate(pod)
        and status.get("phase") == "Running"
        and bool(status.get("podIP"))
        and _conditions(pod).get("ContainersReady") == "True"
    )


def metrics_url(pod: Manifest) -> str | None:
    """Where a runtime pod serves /metrics (its port named "metrics"); None if nowhere."""
    ip = (pod.get("status") or {}).get("podIP")
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "metrics" and isinstance(port.get("containerPort"), int):
                return f"http://{ip}:{port['containerPort']}/metrics" if ip else None
    return None


def verified_transport(metrics_text: str) -> str | None:
    """The transport of a verified check, from a pod's /metrics; None if none yet."""
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name == VERIFIED_METRIC and sample.value == 1:
                    return str(sample.labels.get("transport", "unknown"))
    except ValueError:  # not Prometheus text: nothing verified
        return None
    return None


def gate_condition(transport: str, now: str) -> Manifest:
    return {
        "type": names.TRANSFER_READY_GATE,
        "status": "True",
        "reason": VERIFIED_REASON,
        "message": f"a check transfer from an encode pod arrived intact over {transport}",
        "lastTransitionTime": now,
    }


@dataclass(frozen=True)
class TransferSummary:
    """Language pods that passed the check, and the transports they took."""

    verified: int
    transports: tuple[str, ...]


NO_TRANSFERS = TransferSummary(0, ())


def summarize(pods: list[Manifest], revision: str) -> TransferSummary:
    """Over the live language pods of `revision` (an older revision's pods may have
    verified another protocol)."""
    verified = 0
    transports: set[str] = set()
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if (
            labels.get(names.ROLE_LABEL) != "language"
            or labels.get(names.REVISION_LABEL) != revision
            or pod["metadata"].get("deletionTimestamp")
        ):
            continue
        for c in (pod.get("status") or {}).get("conditions") or []:
            # Ours only: a simulator (kwok) opens every readiness gate, with no reason.
            if (
                c.get("type") == names.TRANSFER_READY_GATE
                and c.get("status") == "True"
                and c.get("reason") == VERIFIED_REASON
            ):
                verified += 1
                found = _TRANSPORT.search(c.get("message", ""))
                transports.add(found.group(1) if found else "unknown")
    return TransferSummary(verified, tuple(sorted(transports)))
