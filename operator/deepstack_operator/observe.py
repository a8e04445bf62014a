"""Observe: everything one reconcile reads, in one place and before anything is written.

The resource itself, the children it controls (one list per kind, or the watch cache's
copy, see kube.py), its pods, whether the objects its pods need exist, and the /metrics
of the pods a decision needs (language pods awaiting their transfer check; every ready
pod under autoscaling.policy Load). What is read is then decided on without I/O
(decide.py).
"""

from __future__ import annotations

import http.client
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deepstack_operator import names, transfers
from deepstack_operator.desired import DesiredState
from deepstack_operator.kube import OWNED_KINDS, KubeApi, Manifest
from deepstack_operator.render import Capabilities

# A runtime pod's /metrics is a few KiB; more is not read.
MAX_METRICS_BYTES = 1 << 20
# A pod's /metrics that does not answer within this long is asked again next time.
SCRAPE_TIMEOUT_SECONDS = 2.0


@dataclass
class Observation:
    cr: Manifest
    capabilities: Capabilities
    # Every child this resource controls, by (kind, name).
    children: dict[tuple[str, str], Manifest]
    pods: list[Manifest]  # those its own workloads made
    # (kind, name) of referenced objects that do not exist (not allowed to look: not
    # missing, the pods will say so themselves).
    missing: list[tuple[str, str]] = field(default_factory=list)
    # /metrics of the pods a decision needs, by pod name; None: could not be read.
    metrics: dict[str, str | None] = field(default_factory=dict)

    @property
    def live_sets(self) -> list[Manifest]:
        return [obj for (kind, _), obj in self.children.items() if kind == "StatefulSet"]

    def router(self) -> Manifest | None:
        name = names.child_name(self.cr["metadata"]["name"], names.ROUTER)
        return self.children.get(("Deployment", name))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None  # a redirect is an error: the operator fetches only what it asked for


# Pods' /metrics are fetched directly: never through a proxy, never redirected elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def scrape(pod: Manifest) -> str | None:
    """A runtime pod's /metrics; None when it cannot be read (no answer in time, an
    error, a redirect, a body over MAX_METRICS_BYTES)."""
    url = transfers.metrics_url(pod)
    if url is None:
        return None
    try:
        with _DIRECT.open(url, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
            body = response.read(MAX_METRICS_BYTES + 1)
    except (OSError, http.client.HTTPException, ValueError):
        return None
    if len(body) > MAX_METRICS_BYTES:
        return None
    return str(body.decode(errors="replace"))


def serving(pod: Manifest) -> bool:
    """Ready, with an address: its /metrics can be read and its load counts."""
    status = pod.get("status") or {}
    return bool(status.get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def pods_to_scrape(state: DesiredState | None, pods: list[Manifest]) -> list[Manifest]:
    """Language pods whose transfer check can be read (unless there is no encoder to
    check against); under policy Load, every ready pod of a group."""
    if state is None:
        return []
    wanted = []
    for pod in pods:
        role = (pod["metadata"].get("labels") or {}).get(names.ROLE_LABEL, "")
        if (transfers.can_check(pod) and not state.no_encoders) or (
            state.scaled_by_load and role in names.ROLES and serving(pod)
        ):
            wanted.append(pod)
    return wanted


def observe(
    kube: KubeApi,
    cr: Manifest,
    state: DesiredState | None,
    scraper: Callable[[Manifest], str | None] = scrape,
) -> Observation:
    meta = cr["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    capabilities = Capabilities(pod_monitor=kube.has_kind("monitoring.coreos.com/v1", "PodMonitor"))
    children: dict[tuple[str, str], Manifest] = {}
    for api_version, kind in OWNED_KINDS:
        if kind == "PodMonitor" and not capabilities.pod_monitor:
            continue
        for obj in kube.list_owned(api_version, kind, namespace, name):
            if _controlled_by(obj, meta["uid"]):
                children[(kind, obj["metadata"]["name"])] = obj
    pods = controlled_pods(kube.list_owned("v1", "Pod", namespace, name), name, children)
    missing = [
        (kind, ref)
        for api_version, kind, ref in (state.references if state is not None else ())
        if kube.exists(api_version, kind, namespace, ref) is False
    ]
    metrics = {pod["metadata"]["name"]: scraper(pod) for pod in pods_to_scrape(state, pods)}
    return Observation(cr, capabilities, children, pods, missing, metrics)


def _controlled_by(obj: Manifest, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def controlled_pods(
    pods: list[Manifest], cr_name: str, children: dict[tuple[str, str], Manifest]
) -> list[Manifest]:
    """The pods our own workloads made: a pod that merely carries our labels is not
    scraped, not gated and holds no rollout."""
    sets = {name for kind, name in children if kind == "StatefulSet"}
    router_prefix = names.child_name(cr_name, names.ROUTER) + "-"
    mine = []
    for pod in pods:
        for ref in pod["metadata"].get("ownerReferences") or []:
            if not ref.get("controller"):
                continue
            if (ref.get("kind") == "StatefulSet" and ref.get("name") in sets) or (
                ref.get("kind") == "ReplicaSet"
                and str(ref.get("name", "")).startswith(router_prefix)
            ):
                mine.append(pod)
    return mine
