"""Pure derivation of a resource's status from what its children report.

    observe children -> RoleState per role -> derive_status(...) -> status dict
    (assemble: the whole of it, from a reconcile's observation, plan and applies)

Conditions:
  Degraded     a problem the operator found (a missing Secret/PVC/ServiceAccount, a spec
               the runtime rejects, an apply the API server refused).
  Progressing  a workload is being created or has not caught up with its spec (generation
               not observed, or its pods not all updated and ready, or old ones left).
  Ready        every role's rollout is complete: replicas = updated = ready = desired >= 1.
  TransferReady a language pod has verified a real transfer from an encode pod (its
               transfer-ready readiness gate, see transfers.py); reason TCPFallback when
               RDMA was asked for and a check went over TCP.
  Compatible   every live encode and language pod serves the spec's embedding contract;
               False while pods of two contracts live side by side (a paired rollout)
               or the live pods serve only an older one.
The phase always agrees with them: Degraded if Degraded, else Ready if Ready, else
Progressing if Progressing, else Pending (settled, but not serving: a role scaled to zero).
Conditions keep their lastTransitionTime while their status does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepstack_operator import names, transfers
from deepstack_operator.desired import DesiredState
from deepstack_operator.ownership import scaled_by_another_manager
from deepstack_operator.rollout import RolloutPlan
from deepstack_operator.transfers import NO_TRANSFERS, TransferSummary

Status = dict[str, Any]


@dataclass(frozen=True)
class RoleState:
    """What one workload (StatefulSet or Deployment) reports."""

    desired: int
    exists: bool = True
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    up_to_date: bool = False  # observedGeneration == generation and no pending revision

    @property
    def settled(self) -> bool:
        """The rollout is complete: no old pod left, every pod updated and ready."""
        return self.up_to_date and self.replicas == self.updated == self.ready == self.desired

    def as_status(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "readyReplicas": self.ready,
            "updatedReplicas": self.updated,
            "summary": f"{self.ready}/{self.desired}",
        }


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, e.g. MissingSecret
    message: str


def role_state(workload: dict[str, Any] | None, desired: int) -> RoleState:
    """From a live StatefulSet or Deployment (None: it does not exist)."""
    if workload is None:
        return RoleState(desired=desired, exists=False)
    meta, status = workload.get("metadata", {}), workload.get("status") or {}
    generation = meta.get("generation", 0)
    observed = status.get("observedGeneration", 0)
    pending_revision = (
        workload.get("kind") == "StatefulSet"
        and status.get("updateRevision")
        and status.get("currentRevision") != status.get("updateRevision")
    )
    return RoleState(
        desired=desired,
        replicas=status.get("replicas", 0),
        ready=status.get("readyReplicas", 0),
        updated=status.get("updatedReplicas", 0),
        up_to_date=observed >= generation and not pending_revision,
    )


def _condition(
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: dict[str, Any],
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(kind)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def compatibility(contract: str, live: dict[str, dict[str, int]]) -> tuple[bool, str, str]:
    """(status, reason, message) of the Compatible condition. `live` maps each contract
    that has pods to its pod count per group."""

    def described(c: str) -> str:
        return f"{c} (" + ", ".join(f"{r} {n}" for r, n in sorted(live[c].items())) + ")"

    if len(live) > 1:
        return (
            False,
            "MixedContracts",
            f"pods of {len(live)} contracts are live: "
            + "; ".join(described(c) for c in sorted(live))
            + "; each request is served within one",
        )
    if live and contract not in live:
        (old,) = live
        return (
            False,
            "ContractPending",
            f"live pods serve {described(old)}; the spec's is {contract}",
        )
    return True, "SingleContract", f"every pod serves contract {contract}" if live else ""


def transfer_condition(transfer: TransferSummary, protocol: str) -> tuple[bool, str, str]:
    """(status, reason, message) of TransferReady."""
    if not transfer.verified:
        return (
            False,
            "Unverified",
            "no language pod has verified a transfer from an encode pod yet",
        )
    message = f"{transfer.verified} language pod(s) verified a transfer over " + ", ".join(
        transfer.transports
    )
    if protocol == "rdma" and "tcp" in transfer.transports:
        return True, "TCPFallback", f"RDMA was asked for, but {message}"
    return True, "TransferVerified", message


def derive_status(
    *,
    generation: int,
    roles: dict[str, RoleState],
    problems: list[Problem],
    url: str,
    previous: Status,
    now: str,
    contract: str = "",
    revision: str = "",
    live_contracts: dict[str, dict[str, int]] | None = None,
    old_revisions: dict[str, str] | None = None,
    transfer: TransferSummary = NO_TRANSFERS,
    protocol: str = "tcp",
) -> Status:
    """`roles` maps encode/language (and router, if enabled) to their state (the current
    revision's); `old_revisions` (revision: summary) are those a paired rollout keeps
    serving until the current one is ready."""
    prev_conditions = {c["type"]: c for c in previous.get("conditions", []) if "type" in c}
    missing = sorted(r for r, s in roles.items() if not s.exists)
    states = {r: s for r, s in roles.items() if s.exists}
    not_settled = sorted(r for r, s in states.items() if not s.settled)
    scaled_to_zero = sorted(r for r, s in states.items() if s.desired == 0)

    if problems:
        degraded = (True, problems[0].reason, "; ".join(p.message for p in problems))
    else:
        degraded = (False, "AsExpected", "")

    old = "; ".join(
        f"revision {r} ({summary}) serves until {revision or 'the new one'} is ready"
        for r, summary in sorted((old_revisions or {}).items())
    )
    detail = ", ".join(
        f"{r} {states[r].ready}/{states[r].desired} ready, {states[r].updated} updated"
        for r in not_settled
    )
    if missing:
        progressing = (True, "Creating", f"waiting for {', '.join(missing)} to be created")
    elif old:
        progressing = (True, "PairedRollout", "; ".join(x for x in (detail, old) if x))
    elif not_settled:
        progressing = (True, "RollingOut", detail)
    else:
        progressing = (False, "Stable", "")

    if missing or not_settled or old:
        ready = (False, progressing[1], progressing[2])
    elif scaled_to_zero:
        ready = (False, "ScaledToZero", f"{', '.join(scaled_to_zero)} has no replicas")
    elif problems:
        ready = (False, degraded[1], degraded[2])
    else:
        ready = (True, "AllReplicasReady", "")

    transfer_ready = transfer_condition(transfer, protocol)

    if degraded[0]:
        phase = "Degraded"
    elif ready[0]:
        phase = "Ready"
    elif progressing[0]:
        phase = "Progressing"
    else:
        phase = "Pending"

    conditions = [
        _condition("Ready", *ready, generation, prev_conditions, now),
        _condition("Progressing", *progressing, generation, prev_conditions, now),
        _condition("Degraded", *degraded, generation, prev_conditions, now),
        _condition("TransferReady", *transfer_ready, generation, prev_conditions, now),
        _condition(
            "Compatible",
            *compatibility(contract, live_contracts or {}),
            generation,
            prev_conditions,
            now,
        ),
    ]
    status: Status = {"phase": phase, "observedGeneration": generation, "conditions": conditions}
    if contract:
        status["contract"] = contract
    if revision:
        status["revision"] = revision
    for role, state in roles.items():
        status[role] = state.as_status()
    if "language" in status:
        status["language"]["transferVerified"] = transfer.verified
        status["language"]["transports"] = list(transfer.transports)
    if url:
        status["url"] = url
    return status


def _condition_of(status: Status, kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def transitions(previous: Status, status: Status) -> list[tuple[str, str, str]]:
    """The events a person wants to hear about, (type, reason, message), from one status
    to the next: entering or leaving Degraded, Ready, a rollout starting, and an RDMA
    transfer that took TCP (never silent)."""
    events: list[tuple[str, str, str]] = []
    transfer = _condition_of(status, "TransferReady")
    if (
        transfer.get("reason") == "TCPFallback"
        and _condition_of(previous, "TransferReady").get("reason") != "TCPFallback"
    ):
        events.append(("Warning", "TCPFallback", transfer.get("message", "")))
    before, after = previous.get("phase"), status["phase"]
    if before == after:
        return events
    if after == "Degraded":
        degraded = _condition_of(status, "Degraded")
        return [*events, ("Warning", degraded["reason"], degraded["message"])]
    if before == "Degraded":
        events.append(("Normal", "Recovered", f"no longer degraded; now {after}"))
    if after == "Ready":
        events.append(("Normal", "Ready", "all replicas are ready"))
    elif after == "Progressing" and before == "Ready":
        events.append(("Normal", "RollingOut", "a change is rolling out"))
    return events


def _protocol(previous: Status) -> str:
    """The transfer protocol a status was last reported for (RDMA only shows as a TCP
    fallback)."""
    fallback = _condition_of(previous, "TransferReady").get("reason") == "TCPFallback"
    return "rdma" if fallback else "tcp"


def router_replicas(configured: int, deployment: dict[str, Any] | None) -> int:
    """The router's desired count: router.replicas, or the live Deployment's once another
    controller (the user's HPA, KEDA) scales it."""
    if deployment is None or not scaled_by_another_manager(deployment):
        return configured
    return int((deployment.get("spec") or {}).get("replicas", configured))


def assemble(
    *,
    cr: dict[str, Any],
    state: DesiredState | None,
    problems: list[Problem],
    children: dict[tuple[str, str], dict[str, Any]],
    plan: RolloutPlan | None,
    pods: list[dict[str, Any]],
    now: str,
) -> Status:
    """The status from what this reconcile saw and did. `state` None: the spec is invalid and
    no valid one is known since the operator started (the live revision, contract, router
    and URL stay as last reported). `children` holds every
    child as this reconcile left them (one it just
    changed reports the change as not yet observed, so the status says Progressing however
    fast pods roll)."""
    meta = cr["metadata"]
    previous = cr.get("status") or {}
    if state is None:
        target, contract = previous.get("revision", ""), previous.get("contract", "")
    else:
        target, contract = state.revision, state.contract
    live_sets = {name: sts for (kind, name), sts in children.items() if kind == "StatefulSet"}
    roles: dict[str, RoleState] = {}
    for role in names.ROLES:
        sts = live_sets.get(names.workload_name(meta["name"], role, target))
        live_count = int((sts or {}).get("spec", {}).get("replicas", 0))
        if state is None or (state.groups[role].scaling is not None and sts is not None):
            # An autoscaler decides (the HPA, or the operator's own Load policy); with no
            # valid spec known, what is live is what was asked for.
            desired = live_count
        else:
            desired = state.groups[role].replicas
        roles[role] = role_state(sts, desired)
    deployment = children.get(("Deployment", names.child_name(meta["name"], names.ROUTER)))
    if state is not None and state.router.enabled:
        roles[names.ROUTER] = role_state(
            deployment, router_replicas(state.router.replicas, deployment)
        )
        url = state.config.endpoints.router_url
    elif state is None and "router" in previous:  # as last reported, with its live pods
        roles[names.ROUTER] = role_state(
            deployment, int((deployment or {}).get("spec", {}).get("replicas", 0))
        )
        url = str(previous.get("url", ""))
    else:
        url = ""
    # Pods that stay: the current revision's and those the plan keeps (not the pruned).
    current = {names.workload_name(meta["name"], role, target) for role in names.ROLES}
    live_contracts: dict[str, dict[str, int]] = {}
    for name, sts in sorted(live_sets.items()):
        if plan is not None and name not in {*plan.keep, *current}:
            continue
        count = (sts.get("status") or {}).get("replicas", 0)
        labels = sts["metadata"].get("labels") or {}
        if count:
            by_role = live_contracts.setdefault(labels.get(names.CONTRACT_LABEL, "unknown"), {})
            role = labels.get(names.ROLE_LABEL, "unknown")
            by_role[role] = by_role.get(role, 0) + count
    return derive_status(
        generation=meta.get("generation", 0),
        roles=roles,
        problems=problems,
        url=url,
        previous=previous,
        now=now,
        contract=contract,
        revision=target,
        live_contracts=live_contracts,
        old_revisions=plan.old_revisions if plan else None,
        transfer=transfers.summarize(pods, target),
        protocol=state.config.transfer.protocol if state is not None else _protocol(previous),
    )
