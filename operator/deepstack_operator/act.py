"""Act: carry a decision out through the Kube seam (apply, prune, pod conditions, events,
status). Problems a user must fix come back as Problems (reported as Degraded); the API
server's own trouble (5xx) is raised, for the work queue to retry with backoff."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import DynamicApiError

from deepstack_operator import names
from deepstack_operator.decide import Decision
from deepstack_operator.kube import KubeApi, Manifest
from deepstack_operator.observe import Observation
from deepstack_operator.ownership import (
    keep_replicas_until_handed_over,
    yield_replicas_to_other_managers,
)
from deepstack_operator.status import Problem, transitions


@dataclass
class Acted:
    writes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Children as this reconcile left them, by (kind, name): the live ones (start from
    # the observation's), with what it applied in their place and without what it pruned.
    children: dict[tuple[str, str], Manifest] = field(default_factory=dict)


def api_message(error: Exception) -> str:
    if isinstance(error, DynamicApiError):
        return str(error.summary())  # type: ignore[no-untyped-call]
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}"
    return str(error)


def _status_code(error: Exception) -> int:
    return int(getattr(error, "status", None) or 500)


def open_gates(kube: KubeApi, obs: Observation, decision: Decision, acted: Acted) -> None:
    namespace = obs.cr["metadata"]["namespace"]
    by_name = {pod["metadata"]["name"]: pod for pod in obs.pods}
    for pod_name, condition in decision.gates:
        try:
            kube.set_pod_condition(namespace, pod_name, condition)
        except ApiException as e:
            if e.status == 404:  # gone meanwhile
                continue
            if _status_code(e) >= 500:
                raise
            acted.problems.append(Problem("GateFailed", f"Pod {pod_name}: {api_message(e)}"))
            continue
        pod = by_name[pod_name]
        pod.setdefault("status", {}).setdefault("conditions", []).append(condition)
        acted.writes.append(f"{condition['reason']}: Pod/{pod_name}")


def apply_children(kube: KubeApi, obs: Observation, decision: Decision, acted: Acted) -> None:
    router_name = names.child_name(obs.cr["metadata"]["name"], names.ROUTER)
    for child in decision.children:
        key = (child["kind"], child["metadata"]["name"])
        live = obs.children.get(key)
        if key == ("Deployment", router_name):
            # router.replicas holds until the user's own autoscaler takes over.
            child = yield_replicas_to_other_managers(child, live)
        # A count handed to an autoscaler is not dropped before the autoscaler has it.
        child = keep_replicas_until_handed_over(child, live)
        try:
            change, stored = kube.apply_if_changed(child, live)
        except (DynamicApiError, ApiException) as e:
            if _status_code(e) >= 500:
                raise  # the server's trouble: retry with backoff
            acted.problems.append(Problem("ApplyFailed", f"{key[0]} {key[1]}: {api_message(e)}"))
            continue
        if change:
            acted.writes.append(f"{change} {key[0]}/{key[1]}")
            acted.children[key] = stored


def prune(kube: KubeApi, obs: Observation, decision: Decision, acted: Acted) -> None:
    namespace = obs.cr["metadata"]["namespace"]
    for api_version, kind, name in decision.prune:
        kube.delete(api_version, kind, namespace, name)
        acted.children.pop((kind, name), None)
        acted.writes.append(f"deleted {kind}/{name}")


def write_status(kube: KubeApi, cr: Manifest, status: dict[str, Any], acted: Acted) -> bool:
    """Write `status` if it changed, and post the events its transitions call for.
    False: the resource is gone."""
    previous = cr.get("status") or {}
    if status == previous:
        return True
    meta = cr["metadata"]
    # A merge patch removes a field only when told to (for example the router's).
    gone = {key: None for key in previous if key not in status}
    try:
        kube.patch_status(meta["namespace"], meta["name"], {**gone, **status})
    except ApiException as e:
        if e.status == 404:  # deleted while we worked: nothing left to report on
            return False
        raise
    acted.writes.append("status")
    for event_type, reason, message in transitions(previous, status):
        kube.post_event(cr, event_type, reason, message)
    return True
