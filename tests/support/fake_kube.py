"""A fake at the operator's own seam (deepstack_operator.kube.KubeApi), with the controllers
a reconcile waits on simulated in `settle()`: the StatefulSet and Deployment controllers
(pods follow spec.replicas, status follows the pods), the kubelet (a pod is Ready once its
readiness gates are), garbage collection (a deleted workload's pods go) and an HPA (it
owns spec.replicas once the rendered StatefulSet leaves it out). For the reconcile
scenarios only: the operator's real API I/O is tested against a real API server."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from deepstack_operator import names
from deepstack_operator.kube import KubeApi
from deepstack_operator.reconcile import Outcome, Reconciler

Manifest = dict[str, Any]
Key = tuple[str, str, str]  # kind, namespace, name

VERIFIED_METRICS = 'deepstack_transfer_verified{transport="tcp"} 1.0\n'


@dataclass
class FakeKube:
    objects: dict[Key, Manifest] = field(default_factory=dict)
    kinds: set[str] = field(default_factory=set)  # optional kinds served (PodMonitor)
    existing: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) references
    writes: list[str] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    # (kind, name) -> status of the ApiException its next apply raises
    fail_apply: dict[tuple[str, str], int] = field(default_factory=dict)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- KubeApi -------------------------------------------------------------------------

    def has_kind(self, api_version: str, kind: str) -> bool:
        return kind in self.kinds

    def get_cr(self, namespace: str, name: str) -> Manifest | None:
        obj = self.objects.get((names.KIND, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_owned(
        self, api_version: str, kind: str, namespace: str, cr_name: str
    ) -> list[Manifest]:
        return [
            copy.deepcopy(obj)
            for (k, ns, _), obj in sorted(self.objects.items())
            if k == kind
            and ns == namespace
            and (obj["metadata"].get("labels") or {}).get(names.INSTANCE_LABEL) == cr_name
        ]

    def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool | None:
        return (kind, name) in self.existing

    def apply_if_changed(
        self, manifest: Manifest, live: Manifest | None
    ) -> tuple[str | None, Manifest]:
        meta = manifest["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"])
        status = self.fail_apply.pop((manifest["kind"], meta["name"]), None)
        if status is not None:
            raise ApiException(status=status, reason="Conflict" if status == 409 else "Fail")
        held = self.objects.get(key)
        wanted = copy.deepcopy(manifest)
        # Server-side apply of spec.replicas: applied, it is ours alone; left out, it goes
        # (back to the default of 1) if it was ours alone, else another manager keeps it.
        others = [m for m in _replica_managers(held) if m != names.FIELD_MANAGER]
        if "replicas" in wanted.get("spec", {}):
            managers = [names.FIELD_MANAGER]
        elif others:
            wanted["spec"]["replicas"] = held["spec"]["replicas"]  # type: ignore[index]
            managers = others
        else:
            managers = []
        wanted["metadata"]["managedFields"] = _managed(managers)
        if held is not None and _intent(held) == _intent(wanted):
            return None, copy.deepcopy(held)
        stored = wanted
        stored["metadata"]["uid"] = (held or {}).get("metadata", {}).get("uid") or (
            f"uid-{next(self._counter)}"
        )
        generation = (held or {}).get("metadata", {}).get("generation", 0)
        if held is None or held.get("spec") != wanted.get("spec"):
            generation += 1
        stored["metadata"]["generation"] = generation
        stored["metadata"]["resourceVersion"] = str(next(self._counter))
        if held is not None and "status" in held:
            stored["status"] = held["status"]
        self.objects[key] = stored
        change = "created" if held is None else "updated"
        self.writes.append(f"{change} {key[0]}/{key[2]}")
        return change, copy.deepcopy(stored)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        if self.objects.pop((kind, namespace, name), None) is not None:
            self.writes.append(f"deleted {kind}/{name}")

    def patch_status(self, namespace: str, name: str, status: Manifest) -> None:
        key = (names.KIND, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        merged = dict(self.objects[key].get("status") or {})
        for k, v in status.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = copy.deepcopy(v)
        self.objects[key]["status"] = merged
        self.writes.append("status")

    def set_pod_condition(self, namespace: str, name: str, condition: Manifest) -> None:
        pod = self.objects.get(("Pod", namespace, name))
        if pod is None:
            raise ApiException(status=404, reason="Not Found")
        conditions = [
            c for c in pod["status"].get("conditions", []) if c["type"] != condition["type"]
        ]
        pod["status"]["conditions"] = [*conditions, condition]
        self.writes.append(f"condition Pod/{name}")

    def post_event(self, cr: Manifest, event_type: str, reason: str, message: str) -> None:
        self.events.append((event_type, reason, message))

    # --- the user and the cluster's own controllers ---------------------------------------

    def put_cr(self, cr: Manifest) -> None:
        """Create or update the resource, as `kubectl apply` would (generation moves with
        the spec)."""
        key = (names.KIND, cr["metadata"]["namespace"], cr["metadata"]["name"])
        held = self.objects.get(key)
        obj = copy.deepcopy(cr)
        obj["metadata"]["generation"] = (
            1 if held is None else held["metadata"]["generation"] + (held["spec"] != cr["spec"])
        )
        obj["metadata"]["uid"] = cr["metadata"].get("uid", "cr-uid")
        if held is not None:
            obj["status"] = held.get("status", {})
        self.objects[key] = obj

    def scale(self, name: str, replicas: int, manager: str = "kube-controller-manager") -> None:
        """Another controller (the HPA) writes a workload's spec.replicas."""
        (workload,) = [o for k, o in self.objects.items() if k[2] == name]
        workload["spec"]["replicas"] = replicas
        managers = [*dict.fromkeys([*_replica_managers(workload), manager])]
        workload["metadata"]["managedFields"] = _managed(managers)
        workload["metadata"]["generation"] += 1

    def workloads(self, kind: str = "StatefulSet") -> dict[str, Manifest]:
        return {name: obj for (k, _, name), obj in self.objects.items() if k == kind}

    def pods(self) -> dict[str, Manifest]:
        return self.workloads("Pod")

    def settle(self) -> None:
        """One pass of the StatefulSet/Deployment controllers, the kubelet and the garbage
        collector: pods follow each workload's spec and are Ready when their gates are."""
        owners = {name for kind in ("StatefulSet", "Deployment") for name in self.workloads(kind)}
        for key, pod in list(self.objects.items()):
            if key[0] == "Pod" and pod["metadata"]["ownerReferences"][0]["name"] not in owners:
                del self.objects[key]  # garbage-collected with its workload
        for kind in ("StatefulSet", "Deployment"):
            for name, workload in self.workloads(kind).items():
                self._run(kind, name, workload)

    def _run(self, kind: str, name: str, workload: Manifest) -> None:
        namespace = workload["metadata"]["namespace"]
        want = workload["spec"].get("replicas", 1)
        template = workload["spec"]["template"]
        ready = 0
        for i in range(max(want, 0)):
            pod_name = f"{name}-{i}"
            key = ("Pod", namespace, pod_name)
            pod = self.objects.get(key)
            if pod is None or pod.get("template") != template:
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "template": template,  # the fake's own record of what made it
                    "metadata": {
                        "name": pod_name,
                        "namespace": namespace,
                        "labels": dict(template["metadata"]["labels"]),
                        "ownerReferences": [
                            {
                                "kind": "StatefulSet" if kind == "StatefulSet" else "ReplicaSet",
                                "name": name if kind == "StatefulSet" else f"{name}-rs",
                                "controller": True,
                            }
                        ],
                    },
                    "spec": {
                        "nodeName": "node",
                        "containers": template["spec"]["containers"],
                        "readinessGates": template["spec"].get("readinessGates", []),
                    },
                    "status": {
                        "phase": "Running",
                        "podIP": f"10.0.0.{i + 1}",
                        "conditions": [{"type": "ContainersReady", "status": "True"}],
                    },
                }
                self.objects[key] = pod
            conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
            gated = all(
                conditions.get(g["conditionType"]) == "True" for g in pod["spec"]["readinessGates"]
            )
            pod["status"]["conditions"] = [
                c for c in pod["status"]["conditions"] if c["type"] != "Ready"
            ] + [{"type": "Ready", "status": "True" if gated else "False"}]
            ready += gated
        for key in [k for k in self.objects if k[0] == "Pod" and k[1] == namespace]:
            pod_name = key[2]
            prefix, _, index = pod_name.rpartition("-")
            if prefix == name and index.isdigit() and int(index) >= want:
                del self.objects[key]
        workload["status"] = {
            "observedGeneration": workload["metadata"]["generation"],
            "replicas": want,
            "readyReplicas": ready,
            "updatedReplicas": want,
        }


def _managed(managers: list[str]) -> list[Manifest]:
    return [{"manager": m, "fieldsV1": {"f:spec": {"f:replicas": {}}}} for m in managers]


def _replica_managers(obj: Manifest | None) -> list[str]:
    return [
        str(entry["manager"])
        for entry in (obj or {}).get("metadata", {}).get("managedFields") or []
    ]


def _intent(obj: Manifest) -> Manifest:
    keep = ("labels", "annotations", "name", "managedFields")
    meta = {k: v for k, v in obj["metadata"].items() if k in keep}
    return {"metadata": meta, "spec": obj.get("spec"), "data": obj.get("data")}


def reconciler(kube: KubeApi, clock: list[float] | None = None) -> Reconciler:
    ticks = clock if clock is not None else [0.0]
    return Reconciler(
        kube,
        scraper=lambda pod: VERIFIED_METRICS,
        clock=lambda: "2026-12-07T00:00:00Z",
        monotonic=lambda: ticks[0],
    )


def reconcile_until_stable(
    kube: FakeKube, reconciler: Reconciler, namespace: str, name: str, limit: int = 30
) -> list[Outcome]:
    """Reconcile and let the cluster's controllers act, until a reconcile writes nothing
    and asks for no requeue. Fails when it does not settle within `limit` rounds (a
    flapping or endless plan)."""
    outcomes = []
    for _ in range(limit):
        outcome = reconciler.reconcile(namespace, name)
        outcomes.append(outcome)
        kube.settle()
        if not outcome.writes and outcome.requeue_after is None:
            return outcomes
    raise AssertionError(
        f"not stable after {limit} reconciles; last writes: {outcomes[-1].writes}, "
        f"requeue {outcomes[-1].requeue_after}"
    )
