"""Decide: from an observation and the desired state to what to do, without I/O.

    open gates -> size the groups (spec, HPA, or the pods' load) -> plan the rollout
    -> render the children -> what to prune

Everything here is pure (time comes in as arguments) and tested by table; act.py carries
the decision out, and status.assemble reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deepstack_operator import names, transfers
from deepstack_operator.desired import DesiredState
from deepstack_operator.kube import OWNED_KINDS, Manifest
from deepstack_operator.observe import Observation, serving
from deepstack_operator.render import render_all
from deepstack_operator.rollout import LiveGroup, RolloutPlan, plan_rollout
from deepstack_operator.scaling import (
    GroupBounds,
    Recommendation,
    ScalePolicy,
    plan_scale,
    requests_inflight,
)
from deepstack_operator.status import role_state, router_replicas

_API_VERSIONS = {kind: api_version for api_version, kind in OWNED_KINDS}
_PRUNE_ORDER = {kind: i for i, (_, kind) in enumerate(OWNED_KINDS)}


@dataclass
class Decision:
    # (pod name, condition) of each language pod whose transfer-ready gate opens now.
    gates: list[tuple[str, Manifest]] = field(default_factory=list)
    awaiting_check: int = 0  # running language pods still waiting for theirs
    plan: RolloutPlan | None = None
    children: list[Manifest] = field(default_factory=list)  # to apply, in order
    prune: list[tuple[str, str, str]] = field(default_factory=list)  # api version, kind, name
    scaled: str | None = None  # an event's message when the load resized a group
    scale_history: list[Recommendation] = field(default_factory=list)


def open_gates(
    obs: Observation, state: DesiredState, now: str
) -> tuple[list[tuple[str, Manifest]], int]:
    """The transfer-ready conditions to set: for each language pod that has verified a
    transfer (transfers.py), or for every one when the encode group is held at zero (text
    only: there is nothing to verify); and how many running pods still wait."""
    gates: list[tuple[str, Manifest]] = []
    waiting = 0
    for pod in obs.pods:
        if not transfers.can_check(pod):
            waiting += transfers.awaiting_gate(pod)  # its server is still starting
            continue
        name = pod["metadata"]["name"]
        if state.no_encoders:
            gates.append((name, transfers.text_only_condition(now)))
            continue
        text = obs.metrics.get(name)
        transport = transfers.verified_transport(text) if text is not None else None
        if transport is None:
            waiting += 1
        else:
            gates.append((name, transfers.gate_condition(transport, now)))
    return gates, waiting


def live_group(sts: Manifest) -> LiveGroup:
    meta, spec = sts["metadata"], sts.get("spec") or {}
    labels = meta.get("labels") or {}
    return LiveGroup(
        role=labels.get(names.ROLE_LABEL, ""),
        # A StatefulSet from before paired rollouts has no revision: an old one.
        revision=labels.get(names.REVISION_LABEL, ""),
        name=meta["name"],
        replicas=spec.get("replicas", 1),
        ready=(sts.get("status") or {}).get("readyReplicas", 0),
    )


def scale_on_load(
    obs: Observation,
    state: DesiredState,
    history: list[Recommendation],
    monotonic_now: float,
) -> tuple[dict[str, int], list[Recommendation], str | None]:
    """autoscaling.policy Load: the replicas of each group from the load its ready pods
    report (scaling.py); a group not autoscaled keeps its spec's count. Returns the
    replicas, the new history, and an event's message when a group changes size."""
    assert state.autoscaling is not None
    bounds: dict[str, GroupBounds] = {}
    for role, group in state.groups.items():
        if group.scaling is not None:
            bounds[role] = GroupBounds(
                group.scaling.min_replicas,
                group.scaling.max_replicas,
                group.scaling.target_requests_per_pod,
            )
        else:
            bounds[role] = GroupBounds(group.replicas, group.replicas, math.inf)
    policy = ScalePolicy(
        bounds,
        state.autoscaling.ratio_min,
        state.autoscaling.ratio_max,
        state.autoscaling.scale_down_window_seconds,
    )
    live = {
        g.role: g.replicas for g in map(live_group, obs.live_sets) if g.revision == state.revision
    }
    current = {role: live.get(role, bounds[role].minimum) for role in names.ROLES}
    load = dict.fromkeys(names.ROLES, 0.0)
    unread: set[str] = set()
    for pod in obs.pods:
        role = (pod["metadata"].get("labels") or {}).get(names.ROLE_LABEL, "")
        if role not in load or not serving(pod):
            continue
        text = obs.metrics.get(pod["metadata"]["name"])
        if text is None:
            unread.add(role)
        else:
            load[role] += requests_inflight(text)
    for role in unread:
        # A busy pod may be slow to answer: an unread pod never makes its group
        # smaller (its load counts as the group's full target).
        load[role] = max(load[role], current[role] * bounds[role].target_per_pod)
    replicas, history = plan_scale(
        now=monotonic_now, load=load, current=current, history=history, policy=policy
    )
    message = None
    if replicas != current:
        change = ", ".join(f"{r} {current[r]} -> {replicas[r]}" for r in names.ROLES)
        seen = ", ".join(f"{r} {load[r]:g}" for r in names.ROLES)
        message = f"{change} (requests in flight: {seen})"
    return replicas, history, message


def router_contracts(pods: list[Manifest]) -> set[str]:
    """The contracts of the router pods that exist, terminating ones included (they may
    still get requests); failed or finished ones (evicted, for example) do not count."""
    return {
        (pod["metadata"].get("labels") or {}).get(names.CONTRACT_LABEL, "")
        for pod in pods
        if (pod["metadata"].get("labels") or {}).get(names.ROLE_LABEL) == names.ROUTER
        and (pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded")
    }


def config_maps(sts: Manifest) -> list[str]:
    """The ConfigMaps a StatefulSet's pods mount."""
    volumes = (((sts.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes")
    return [v["configMap"]["name"] for v in volumes or [] if v.get("configMap")]


def prune(
    obs: Observation, children: list[Manifest], plan: RolloutPlan
) -> list[tuple[str, str, str]]:
    """What is ours and no longer wanted, in the order of OWNED_KINDS; a rollout's old
    revisions (their StatefulSets and the ConfigMaps their pods mount) stay until the plan
    drops them."""
    wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
    for (kind, name), kept in obs.children.items():
        if kind == "StatefulSet" and name in plan.keep:
            wanted.add((kind, name))
            wanted.update(("ConfigMap", config_map) for config_map in config_maps(kept))
    gone = sorted(
        (key for key in obs.children if key not in wanted),
        key=lambda k: (_PRUNE_ORDER[k[0]], k[1]),
    )
    return [(_API_VERSIONS[kind], kind, name) for kind, name in gone]


def decide(
    obs: Observation,
    state: DesiredState,
    *,
    history: list[Recommendation],
    now: str,
    monotonic_now: float,
) -> Decision:
    decision = Decision(scale_history=history)
    decision.gates, decision.awaiting_check = open_gates(obs, state, now)
    desired = state.spec_replicas
    if state.scaled_by_load:
        desired, decision.scale_history, decision.scaled = scale_on_load(
            obs, state, history, monotonic_now
        )
    router = obs.router()
    router_settled = not state.router.enabled or (
        router is not None
        and role_state(router, router_replicas(state.router.replicas, router)).settled
        # A terminating router pod may still get requests until kube-proxy catches up,
        # and it can only use pods of its own contract.
        and router_contracts(obs.pods) <= {state.contract}
    )
    plan = plan_rollout(
        target=state.revision,
        desired=desired,
        autoscaled=state.scaled_by_hpa,
        live=[live_group(s) for s in obs.live_sets],
        router_settled=router_settled,
    )
    decision.plan = plan
    decision.children = render_all(state, obs.capabilities, plan.target_replicas)
    decision.prune = prune(obs, decision.children, plan)
    return decision
