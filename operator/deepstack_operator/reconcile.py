"""One level-based reconciliation: read -> check references -> render (pure) -> apply what
changed -> prune -> derive status (pure) -> write status if it changed.

Runs in a worker thread; raises only for unexpected failures (the work queue retries those
with backoff). Problems a user must fix become a Degraded condition, not an exception.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import DynamicApiError

from deepstack_operator import names
from deepstack_operator.kube import OWNED_KINDS, Kube, Manifest
from deepstack_operator.render import Capabilities, render_all
from deepstack_operator.status import Problem, derive_status, role_state
from deepstack_runtime.config import ConfigError

log = logging.getLogger(__name__)

# Looking again for a missing Secret/PVC/ServiceAccount: often enough to notice it soon,
# seldom enough never to be a hot loop.
RECHECK_MISSING_SECONDS = 5.0


@dataclass
class Outcome:
    phase: str | None  # None: the resource is gone
    requeue_after: float | None = None
    ready: dict[str, int] = field(default_factory=dict)  # ready pods per role
    writes: list[str] = field(default_factory=list)


def referenced_objects(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(api version, kind, name) of every object the pods need to exist already."""
    refs: list[tuple[str, str, str]] = []
    runtime = spec.get("runtime", {})
    for secret in runtime.get("imagePullSecrets", []):
        refs.append(("v1", "Secret", secret["name"]))
    if runtime.get("serviceAccountName"):
        refs.append(("v1", "ServiceAccount", runtime["serviceAccountName"]))
    pvc = spec.get("model", {}).get("volume", {}).get("persistentVolumeClaim")
    if pvc:
        refs.append(("v1", "PersistentVolumeClaim", pvc["claimName"]))
    for role in names.ROLES:
        for env in spec.get(role, {}).get("env", []):
            source = env.get("valueFrom") or {}
            for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                ref = source.get(key) or {}
                if ref.get("name") and not ref.get("optional", False):
                    refs.append(("v1", kind, ref["name"]))
    return sorted(set(refs))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_message(error: Exception) -> str:
    if isinstance(error, DynamicApiError):
        return str(error.summary())  # type: ignore[no-untyped-call]
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}"
    return str(error)


class Reconciler:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def capabilities(self) -> Capabilities:
        return Capabilities(
            pod_monitor=self.kube.has_kind("monitoring.coreos.com/v1", "PodMonitor")
        )

    def reconcile(self, namespace: str, name: str) -> Outcome:
        cr = self.kube.get_cr(namespace, name)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            return Outcome(phase=None)  # children go with it: they carry ownerReferences
        spec = cr.get("spec", {})
        outcome = Outcome(phase=None)
        problems = [
            Problem(f"Missing{kind}", f"{kind} {ref!r} does not exist in namespace {namespace}")
            for api_version, kind, ref in referenced_objects(spec)
            # Not allowed to look (None) is not "missing": the pods will say so themselves.
            if self.kube.exists(api_version, kind, namespace, ref) is False
        ]
        capabilities = self.capabilities()
        try:
            children: list[Manifest] | None = render_all(cr, capabilities)
        except ConfigError as e:
            problems.append(Problem("InvalidSpec", str(e)))
            children = None  # leave what exists alone until the spec is fixed

        # Workloads as this reconcile left them: one it just changed reports the change as
        # not yet observed, so the status says Progressing however fast pods roll.
        workloads: dict[tuple[str, str], Manifest] = {}
        if children is not None:
            for child in children:
                try:
                    change, stored = self.kube.apply_if_changed(child)
                except (DynamicApiError, ApiException) as e:
                    if getattr(e, "status", 500) >= 500:
                        raise  # the server's trouble: retry with backoff
                    problems.append(
                        Problem(
                            "ApplyFailed",
                            f"{child['kind']} {child['metadata']['name']}: {_api_message(e)}",
                        )
                    )
                    continue
                if change:
                    outcome.writes.append(f"{change} {child['kind']}/{child['metadata']['name']}")
                    workloads[(child["kind"], child["metadata"]["name"])] = stored
            outcome.writes += self._prune(cr, children, capabilities)

        status = self._status(cr, problems, workloads)
        previous = cr.get("status") or {}
        if status != previous:
            # A merge patch removes a field only when told to (for example the router's).
            gone = {key: None for key in previous if key not in status}
            try:
                self.kube.patch_status(namespace, name, {**gone, **status})
            except ApiException as e:
                if e.status == 404:  # deleted while we worked: nothing left to report on
                    return Outcome(phase=None)
                raise
            outcome.writes.append("status")
            self._announce(cr, previous, status)
        outcome.phase = status["phase"]
        outcome.ready = {
            role: int(status[role]["readyReplicas"])
            for role in (*names.ROLES, names.ROUTER)
            if role in status
        }
        if problems:
            outcome.requeue_after = RECHECK_MISSING_SECONDS
        for write in outcome.writes:
            log.info("%s/%s: %s", namespace, name, write)
        return outcome

    def _prune(
        self, cr: Manifest, children: list[Manifest], capabilities: Capabilities
    ) -> list[str]:
        meta = cr["metadata"]
        wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
        pruned = []
        for api_version, kind in OWNED_KINDS:
            if kind == "PodMonitor" and not capabilities.pod_monitor:
                continue
            for live in self.kube.list_owned(api_version, kind, meta["namespace"], meta["name"]):
                live_meta = live["metadata"]
                ours = any(
                    ref.get("uid") == meta["uid"] for ref in live_meta.get("ownerReferences") or []
                )
                if ours and (kind, live_meta["name"]) not in wanted:
                    self.kube.delete(api_version, kind, meta["namespace"], live_meta["name"])
                    pruned.append(f"deleted {kind}/{live_meta['name']}")
        return pruned

    def _workload(
        self, kind: str, namespace: str, name: str, fresh: dict[tuple[str, str], Manifest]
    ) -> Manifest | None:
        return fresh.get((kind, name)) or self.kube.get("apps/v1", kind, namespace, name)

    def _status(
        self, cr: Manifest, problems: list[Problem], fresh: dict[tuple[str, str], Manifest]
    ) -> dict[str, Any]:
        meta, spec = cr["metadata"], cr.get("spec", {})
        autoscaled = spec.get("autoscaling") or {}
        roles = {}
        for role in names.ROLES:
            sts = self._workload(
                "StatefulSet", meta["namespace"], names.child_name(meta["name"], role), fresh
            )
            desired = spec.get(role, {}).get("replicas", 1)
            if role in autoscaled and sts is not None:
                desired = sts.get("spec", {}).get("replicas", desired)  # the HPA decides
            roles[role] = role_state(sts, desired)
        router = spec.get("router", {})
        url = ""
        if router.get("enabled", True):
            deployment = self._workload(
                "Deployment", meta["namespace"], names.child_name(meta["name"], names.ROUTER), fresh
            )
            roles[names.ROUTER] = role_state(deployment, router.get("replicas", 1))
            url = f"http://{meta['name']}-router.{meta['namespace']}.svc:{router.get('port', 8000)}"
        return derive_status(
            generation=meta.get("generation", 0),
            roles=roles,
            problems=problems,
            url=url,
            previous=cr.get("status") or {},
            now=_now(),
        )

    def _announce(self, cr: Manifest, previous: dict[str, Any], status: dict[str, Any]) -> None:
        """Events for the transitions a person wants to hear about."""
        before, after = previous.get("phase"), status["phase"]
        if before == after:
            return
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        if after == "Degraded":
            self.kube.post_event(cr, "Warning", degraded["reason"], degraded["message"])
            return
        if before == "Degraded":
            self.kube.post_event(cr, "Normal", "Recovered", f"no longer degraded; now {after}")
        if after == "Ready":
            self.kube.post_event(cr, "Normal", "Ready", "all replicas are ready")
        elif after == "Progressing" and before == "Ready":
            self.kube.post_event(cr, "Normal", "RollingOut", "a change is rolling out")
