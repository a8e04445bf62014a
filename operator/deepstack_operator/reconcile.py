"""One level-based reconciliation: read (the children, one list per kind; the pods) ->
check references -> open the transfer-ready gates of language pods that verified a
transfer (transfers.py) -> plan the rollout (rollout.py; sizes from scaling.py under
autoscaling.policy Load) -> render (pure) -> apply what changed -> prune -> derive status
(pure) -> write status if it changed.

Runs in a worker thread; raises only for unexpected failures (the work queue retries those
with backoff). Problems a user must fix become a Degraded condition, not an exception.
"""

from __future__ import annotations

import datetime
import http.client
import logging
import math
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import DynamicApiError

from deepstack_operator import names, transfers
from deepstack_operator.kube import OWNED_KINDS, Kube, Manifest
from deepstack_operator.ownership import (
    scaled_by_another_manager,
    yield_replicas_to_other_managers,
)
from deepstack_operator.render import Capabilities, render_all, revision, runtime_config
from deepstack_operator.render.common import scaled_by_hpa, scaled_by_load
from deepstack_operator.rollout import LiveGroup, RolloutPlan, plan_rollout
from deepstack_operator.scaling import (
    GroupBounds,
    Recommendation,
    ScalePolicy,
    plan_scale,
    requests_inflight,
)
from deepstack_operator.status import (
    Problem,
    RoleState,
    derive_status,
    role_state,
    transitions,
)
from deepstack_runtime.config import ConfigError

log = logging.getLogger(__name__)

# Looking again for a missing Secret/PVC/ServiceAccount: often enough to notice it soon,
# seldom enough never to be a hot loop.
RECHECK_MISSING_SECONDS = 5.0
# What the operator does not watch (pods), it looks at again this often while it waits on
# them: the last old router pod of a rollout to go, a language pod's transfer check.
RECHECK_PODS_SECONDS = 2.0
# autoscaling.policy Load: how often the pods' load is read.
LOAD_INTERVAL_SECONDS = 5.0
# A runtime pod's /metrics is a few KiB; more is not read.
MAX_METRICS_BYTES = 1 << 20
# A pod's /metrics that does not answer within this long is asked again next time.
SCRAPE_TIMEOUT_SECONDS = 2.0


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
    api_keys = spec.get("router", {}).get("apiKeySecret")
    if api_keys and spec.get("router", {}).get("enabled", True):
        refs.append(("v1", "Secret", api_keys["name"]))
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
        # autoscaling.policy Load: each resource's recent recommendations (scaling.py).
        self._scale_history: dict[tuple[str, str], list[Recommendation]] = {}

    def capabilities(self) -> Capabilities:
        return Capabilities(
            pod_monitor=self.kube.has_kind("monitoring.coreos.com/v1", "PodMonitor")
        )

    def reconcile(self, namespace: str, name: str) -> Outcome:
        cr = self.kube.get_cr(namespace, name)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            self._scale_history.pop((namespace, name), None)
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
        live_children = self._live_children(cr, capabilities)
        live_sets = [obj for (kind, _), obj in live_children.items() if kind == "StatefulSet"]
        router = self._router(cr, live_children)
        pods = _controlled_pods(
            self.kube.list_owned("v1", "Pod", namespace, name), cr, live_children
        )
        awaiting_check = self._verify_transfers(cr, pods, outcome, problems)
        plan: RolloutPlan | None = None
        try:
            plan = self._plan(cr, live_sets, router, pods)
            children: list[Manifest] | None = render_all(cr, capabilities, plan.target_replicas)
        except ConfigError as e:
            problems.append(Problem("InvalidSpec", str(e)))
            children = None  # leave what exists alone until the spec is fixed

        # Workloads as this reconcile left them: one it just changed reports the change as
        # not yet observed, so the status says Progressing however fast pods roll.
        workloads: dict[tuple[str, str], Manifest] = {}
        if children is not None:
            for child in children:
                key = (child["kind"], child["metadata"]["name"])
                live = live_children.get(key)
                if key == ("Deployment", names.child_name(name, names.ROUTER)):
                    # router.replicas holds until the user's own autoscaler takes over.
                    child = yield_replicas_to_other_managers(child, live)
                try:
                    change, stored = self.kube.apply_if_changed(child, live)
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
                    outcome.writes.append(f"{change} {key[0]}/{key[1]}")
                    workloads[key] = stored
            assert plan is not None
            outcome.writes += self._prune(cr, children, plan, live_children)

        status = self._status(cr, problems, workloads, plan, live_sets, router, pods)
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
        elif (plan is not None and plan.in_progress) or awaiting_check:
            outcome.requeue_after = RECHECK_PODS_SECONDS
        elif scaled_by_load(cr):
            outcome.requeue_after = LOAD_INTERVAL_SECONDS
        if not scaled_by_load(cr):
            self._scale_history.pop((namespace, name), None)
        for write in outcome.writes:
            log.info("%s/%s: %s", namespace, name, write)
        return outcome

    def _owned(self, cr: Manifest, api_version: str, kind: str) -> list[Manifest]:
        """Live children of one kind that this resource controls."""
        meta = cr["metadata"]
        return [
            live
            for live in self.kube.list_owned(api_version, kind, meta["namespace"], meta["name"])
            if any(
                ref.get("uid") == meta["uid"]
                for ref in live["metadata"].get("ownerReferences") or []
            )
        ]

    def _live_children(
        self, cr: Manifest, capabilities: Capabilities
    ) -> dict[tuple[str, str], Manifest]:
        """Every child this resource controls, by (kind, name): one list per kind."""
        found = {}
        for api_version, kind in OWNED_KINDS:
            if kind == "PodMonitor" and not capabilities.pod_monitor:
                continue
            for obj in self._owned(cr, api_version, kind):
                found[(kind, obj["metadata"]["name"])] = obj
        return found

    def _router(
        self, cr: Manifest, live_children: dict[tuple[str, str], Manifest]
    ) -> Manifest | None:
        if not cr.get("spec", {}).get("router", {}).get("enabled", True):
            return None
        return live_children.get(
            ("Deployment", names.child_name(cr["metadata"]["name"], names.ROUTER))
        )

    def _scrape(self, pod: Manifest) -> str | None:
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

    def _scale_on_load(
        self, cr: Manifest, pods: list[Manifest], live_sets: list[Manifest], target: str
    ) -> dict[str, int]:
        """autoscaling.policy Load: the replicas of each group, from the load its ready
        pods report (scaling.py); a group not listed keeps its spec's count."""
        spec, meta = cr["spec"], cr["metadata"]
        autoscaling = spec["autoscaling"]
        bounds: dict[str, GroupBounds] = {}
        for role in names.ROLES:
            if role in autoscaling:
                given = autoscaling[role]
                bounds[role] = GroupBounds(
                    given.get("minReplicas", 1),
                    given["maxReplicas"],
                    float(given.get("targetRequestsPerPod", 4)),
                )
            else:
                fixed = spec.get(role, {}).get("replicas", 1)
                bounds[role] = GroupBounds(fixed, fixed, math.inf)
        ratio = autoscaling.get("ratio") or {}
        policy = ScalePolicy(
            bounds,
            float(ratio.get("min", 0.25)),
            float(ratio.get("max", 4)),
            float(autoscaling.get("scaleDownStabilizationSeconds", 60)),
        )
        groups = [_live_group(s) for s in live_sets]
        live = {g.role: g.replicas for g in groups if g.revision == target}
        current = {role: live.get(role, bounds[role].minimum) for role in names.ROLES}
        load = dict.fromkeys(names.ROLES, 0.0)
        unread: set[str] = set()
        for pod in pods:
            role = (pod["metadata"].get("labels") or {}).get(names.ROLE_LABEL, "")
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (pod.get("status") or {}).get("conditions") or []
            )
            if role in load and ready and (pod.get("status") or {}).get("podIP"):
                text = self._scrape(pod)
                if text is None:
                    unread.add(role)
                else:
                    load[role] += requests_inflight(text)
        for role in unread:
            # A busy pod may be slow to answer: an unread pod never makes its group
            # smaller (its load counts as the group's full target).
            load[role] = max(load[role], current[role] * bounds[role].target_per_pod)
        key = (meta["namespace"], meta["name"])
        replicas, self._scale_history[key] = plan_scale(
            now=time.monotonic(),
            load=load,
            current=current,
            history=self._scale_history.get(key, []),
            policy=policy,
        )
        if replicas != current:
            change = ", ".join(f"{r} {current[r]} -> {replicas[r]}" for r in names.ROLES)
            seen = ", ".join(f"{r} {load[r]:g}" for r in names.ROLES)
            self.kube.post_event(
                cr, "Normal", "ScaledOnLoad", f"{change} (requests in flight: {seen})"
            )
        return replicas

    def _verify_transfers(
        self, cr: Manifest, pods: list[Manifest], outcome: Outcome, problems: list[Problem]
    ) -> int:
        """Open the transfer-ready gate of each language pod that has verified a transfer
        (transfers.py), or of every language pod when the encode group is held at zero
        (text only: there is nothing to verify); the running pods still waiting, counted."""
        spec = cr.get("spec", {})
        no_encoders = (
            "encode" not in (spec.get("autoscaling") or {})
            and spec.get("encode", {}).get("replicas", 1) == 0
        )
        waiting = 0
        for pod in pods:
            if not transfers.can_check(pod):
                waiting += transfers.awaiting_gate(pod)  # its server is still starting
                continue
            if no_encoders:
                condition = transfers.text_only_condition(_now())
            else:
                text = self._scrape(pod)
                transport = transfers.verified_transport(text) if text is not None else None
                if transport is None:
                    waiting += 1
                    continue
                condition = transfers.gate_condition(transport, _now())
            meta = pod["metadata"]
            try:
                self.kube.set_pod_condition(meta["namespace"], meta["name"], condition)
            except ApiException as e:
                if e.status == 404:  # gone meanwhile
                    continue
                if e.status >= 500:
                    raise  # the server's trouble: retry with backoff
                problems.append(Problem("GateFailed", f"Pod {meta['name']}: {_api_message(e)}"))
                continue
            pod.setdefault("status", {}).setdefault("conditions", []).append(condition)
            outcome.writes.append(f"{condition['reason']}: Pod/{meta['name']}")
        return waiting

    def _plan(
        self,
        cr: Manifest,
        live_sets: list[Manifest],
        router: Manifest | None,
        pods: list[Manifest],
    ) -> RolloutPlan:
        spec = cr.get("spec", {})
        autoscaling = spec.get("autoscaling") or {}
        by_hpa = scaled_by_hpa(cr)
        desired = {
            role: (
                autoscaling[role].get("minReplicas", 1)
                if role in by_hpa
                else spec.get(role, {}).get("replicas", 1)
            )
            for role in names.ROLES
        }
        router_spec = spec.get("router", {})
        config = runtime_config(cr)
        if scaled_by_load(cr):
            desired = self._scale_on_load(cr, pods, live_sets, revision(cr, config))
        router_settled = not router_spec.get("enabled", True) or (
            router is not None
            and role_state(router, router_replicas(router_spec, router)).settled
            # A terminating router pod may still get requests until kube-proxy catches
            # up, and it can only use pods of its own contract.
            and _router_contracts(pods) <= {config.contract_hash()}
        )
        return plan_rollout(
            target=revision(cr, config),
            desired=desired,
            autoscaled=frozenset(by_hpa),
            live=[_live_group(s) for s in live_sets],
            router_settled=router_settled,
        )

    def _prune(
        self,
        cr: Manifest,
        children: list[Manifest],
        plan: RolloutPlan,
        live_children: dict[tuple[str, str], Manifest],
    ) -> list[str]:
        """Delete what is ours and no longer wanted; a rollout's old revisions (their
        StatefulSets and the ConfigMaps their pods mount) stay until the plan drops them."""
        wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
        for (kind, name), kept in live_children.items():
            if kind == "StatefulSet" and name in plan.keep:
                wanted.add((kind, name))
                wanted.update(("ConfigMap", config_map) for config_map in _config_maps(kept))
        api_versions = {kind: api_version for api_version, kind in OWNED_KINDS}
        pruned = []
        for kind, name in live_children:  # in the order of OWNED_KINDS
            if (kind, name) not in wanted:
                self.kube.delete(api_versions[kind], kind, cr["metadata"]["namespace"], name)
                pruned.append(f"deleted {kind}/{name}")
        return pruned

    def _status(
        self,
        cr: Manifest,
        problems: list[Problem],
        fresh: dict[tuple[str, str], Manifest],
        plan: RolloutPlan | None,
        live_sets: list[Manifest],
        router: Manifest | None,
        pods: list[Manifest],
    ) -> dict[str, Any]:
        meta, spec = cr["metadata"], cr.get("spec", {})
        autoscaled = spec.get("autoscaling") or {}
        live_by_name = {s["metadata"]["name"]: s for s in live_sets}
        try:
            config = runtime_config(cr)
            target, contract = revision(cr, config), config.contract_hash()
        except ConfigError:  # reported as InvalidSpec; the live revision stays as it is
            previous = cr.get("status") or {}
            target, contract = previous.get("revision", ""), previous.get("contract", "")
        roles: dict[str, RoleState] = {}
        for role in names.ROLES:
            name = names.workload_name(meta["name"], role, target)
            sts = fresh.get(("StatefulSet", name)) or live_by_name.get(name)
            desired = spec.get(role, {}).get("replicas", 1)
            if role in autoscaled and sts is not None:
                desired = sts.get("spec", {}).get("replicas", desired)  # the HPA decides
            roles[role] = role_state(sts, desired)
        router_spec = spec.get("router", {})
        url = ""
        if router_spec.get("enabled", True):
            deployment = fresh.get(("Deployment", names.child_name(meta["name"], names.ROUTER)))
            deployment = deployment or router
            roles[names.ROUTER] = role_state(deployment, router_replicas(router_spec, deployment))
            url = (
                f"http://{meta['name']}-router.{meta['namespace']}.svc:"
                f"{router_spec.get('port', 8000)}"
            )
        # Pods that stay: the current revision's and those the plan keeps (not the pruned).
        current = {names.workload_name(meta["name"], role, target) for role in names.ROLES}
        staying = [
            fresh.get(("StatefulSet", s["metadata"]["name"]), s)
            for s in live_sets
            if plan is None or s["metadata"]["name"] in {*plan.keep, *current}
        ]
        staying += [
            sts
            for (kind, name), sts in fresh.items()
            if kind == "StatefulSet" and name in current and name not in live_by_name
        ]
        live_contracts: dict[str, dict[str, int]] = {}
        for sts in staying:
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
            previous=cr.get("status") or {},
            now=_now(),
            contract=contract,
            revision=target,
            live_contracts=live_contracts,
            old_revisions=plan.old_revisions if plan else None,
            transfer=transfers.summarize(pods, target),
            protocol=spec.get("transfer", {}).get("protocol", "tcp"),
        )

    def _announce(self, cr: Manifest, previous: dict[str, Any], status: dict[str, Any]) -> None:
        for event_type, reason, message in transitions(previous, status):
            self.kube.post_event(cr, event_type, reason, message)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None  # a redirect is an error: the operator fetches only what it asked for


# Pods' /metrics are fetched directly: never through a proxy, never redirected elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def _controlled_pods(
    pods: list[Manifest], cr: Manifest, live_children: dict[tuple[str, str], Manifest]
) -> list[Manifest]:
    """The pods our own workloads made: a pod that merely carries our labels is not
    scraped, not gated and holds no rollout."""
    sets = {name for kind, name in live_children if kind == "StatefulSet"}
    router_prefix = names.child_name(cr["metadata"]["name"], names.ROUTER) + "-"
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


def router_replicas(router_spec: dict[str, Any], deployment: Manifest | None) -> int:
    """The router's desired count: router.replicas, or the live Deployment's once another
    controller (the user's HPA, KEDA) scales it."""
    given = int(router_spec.get("replicas", 1))
    if deployment is None or not scaled_by_another_manager(deployment):
        return given
    return int((deployment.get("spec") or {}).get("replicas", given))


def _router_contracts(pods: list[Manifest]) -> set[str]:
    """The contracts of the router pods that exist, terminating ones included (they may
    still get requests); failed or finished ones (evicted, for example) do not count."""
    return {
        (pod["metadata"].get("labels") or {}).get(names.CONTRACT_LABEL, "")
        for pod in pods
        if (pod["metadata"].get("labels") or {}).get(names.ROLE_LABEL) == names.ROUTER
        and (pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded")
    }


def _live_group(sts: Manifest) -> LiveGroup:
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


def _config_maps(sts: Manifest) -> list[str]:
    """The ConfigMaps a StatefulSet's pods mount."""
    volumes = (((sts.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes")
    return [v["configMap"]["name"] for v in volumes or [] if v.get("configMap")]
