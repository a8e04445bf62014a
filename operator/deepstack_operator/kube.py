"""All Kubernetes API I/O of the reconciler (synchronous; the reconciler runs in threads).

Writes go through server-side apply under one field manager. Before a write, a dry-run
apply shows what the server would store; if that equals the live object, nothing is
written, so a no-op reconcile leaves every resourceVersion as it was. The dry-run itself
is skipped when the same manifest was already found current at the object's present
generation (apply_if_changed).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import threading
import uuid
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError, ResourceNotFoundError

from deepstack_operator import names
from deepstack_operator.ownership import keep_replicas_until_handed_over

Manifest = dict[str, Any]

# Kinds the operator may own, in the order children are pruned.
OWNED_KINDS: tuple[tuple[str, str], ...] = (
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
)
PEERING_API_VERSION = "kopf.dev/v1"
# Fields that differ between two reads of the same object without a change of intent.
_VOLATILE_METADATA = (
    "managedFields",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "uid",
    "selfLink",
)


def _digest(manifest: Manifest) -> str:
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def _version(obj: Manifest) -> str:
    """Changes with every change of the spec (of anything, for kinds without a
    generation), and when the object is recreated."""
    meta = obj.get("metadata", {})
    uid = meta.get("uid", "")  # a deleted and recreated object starts again at 1
    if meta.get("generation"):
        return f"{uid} generation {meta['generation']}"
    return f"{uid} resourceVersion {meta.get('resourceVersion', '')}"


def _metadata_holds(manifest: Manifest, live: Manifest) -> bool:
    """The labels, annotations and owner references we set are all still on `live`
    (an edit of metadata changes no generation)."""
    want, have = manifest["metadata"], live.get("metadata", {})
    for field in ("labels", "annotations"):
        held = have.get(field) or {}
        if any(held.get(k) != v for k, v in (want.get(field) or {}).items()):
            return False
    owners = {r.get("uid") for r in have.get("ownerReferences") or []}
    return all(r.get("uid") in owners for r in want.get("ownerReferences") or [])


def comparable(obj: Manifest) -> Manifest:
    """The parts of an object a reconcile may change."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k not in _VOLATILE_METADATA}
    return {k: v for k, v in obj.items() if k not in ("status", "metadata")} | {"metadata": meta}


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.dynamic = DynamicClient(api_client)  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(api_client)
        self.events = client.EventsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._resources: dict[tuple[str, str], Any] = {}
        # (kind, namespace, name) -> (digest of the manifest, version of the object) when
        # the two were last seen to agree (apply_if_changed).
        self._current: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._lock = threading.Lock()

    def resource(self, api_version: str, kind: str) -> Any:
        with self._lock:
            key = (api_version, kind)
            if key not in self._resources:
                self._resources[key] = self.dynamic.resources.get(
                    api_version=api_version, kind=kind
                )
            return self._resources[key]

    def has_kind(self, api_version: str, kind: str) -> bool:
        try:
            self.resource(api_version, kind)
            return True
        except ResourceNotFoundError:
            return False

    # --- reads ----------------------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            obj = self.resource(api_version, kind).get(name=name, namespace=namespace)
        except NotFoundError:
            return None
        result: Manifest = obj.to_dict()
        return result

    def get_cr(self, namespace: str, name: str) -> Manifest | None:
        return self.get(names.API_VERSION, names.KIND, namespace, name)

    def get_peering(self, name: str, namespace: str | None) -> Manifest | None:
        """kopf's peering object: the KopfPeering in `namespace`, or the cluster's
        ClusterKopfPeering (namespace None); None when it (or its kind) does not exist."""
        kind = "KopfPeering" if namespace else "ClusterKopfPeering"
        try:
            return self.get(PEERING_API_VERSION, kind, namespace or "", name)
        except ResourceNotFoundError:
            return None

    def list_owned(
        self, api_version: str, kind: str, namespace: str, cr_name: str
    ) -> list[Manifest]:
        objs = self.resource(api_version, kind).get(
            namespace=namespace, label_selector=names.owned_selector(cr_name)
        )
        return [item.to_dict() for item in objs.items]

    def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool | None:
        """Existence only (for Secrets the content is fetched but never kept or logged);
        None when the operator may not look (a cluster-wide operator reads no Secret)."""
        try:
            return self.get(api_version, kind, namespace, name) is not None
        except ForbiddenError:
            return None

    # --- writes ---------------------------------------------------------------------

    def apply(self, manifest: Manifest, *, dry_run: bool = False) -> Manifest:
        resource = self.resource(manifest["apiVersion"], manifest["kind"])
        kwargs: dict[str, Any] = {"field_manager": names.FIELD_MANAGER, "force_conflicts": True}
        if dry_run:
            kwargs["dry_run"] = "All"
        obj = resource.server_side_apply(
            body=manifest, namespace=manifest["metadata"]["namespace"], **kwargs
        )
        result: Manifest = obj.to_dict()
        return result

    def apply_if_changed(
        self, manifest: Manifest, live: Manifest | None
    ) -> tuple[str | None, Manifest]:
        """Apply `manifest` unless the server already holds exactly that. `live` is the
        object as just read (None: absent). Returns ("created" | "updated" | None when
        nothing was written, the object as stored).

        Whether a write would change anything is asked of the server (a dry-run apply),
        except when this same manifest was found or made current at this same spec
        generation (resourceVersion for kinds without one) and the metadata we set is
        still there: most reconciles follow a status change of a child, not a change."""
        meta = manifest["metadata"]
        manifest = keep_replicas_until_handed_over(manifest, live)
        key = (manifest["kind"], meta["namespace"], meta["name"])
        digest = _digest(manifest)
        if live is not None:
            if self._current.get(key) == (digest, _version(live)) and _metadata_holds(
                manifest, live
            ):
                return None, live
            would_be = self.apply(manifest, dry_run=True)
            if comparable(would_be) == comparable(live):
                self._current[key] = (digest, _version(live))
                return None, live
        stored = self.apply(manifest)
        self._current[key] = (digest, _version(stored))
        return ("created" if live is None else "updated"), stored

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._current.pop((kind, namespace, name), None)
        with contextlib.suppress(NotFoundError):
            self.resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )

    def patch_status(self, namespace: str, name: str, status: Manifest) -> None:
        """Merge-patch the status subresource (the spec is never touched)."""
        self.custom.patch_namespaced_custom_object_status(
            names.GROUP, names.VERSION, namespace, names.PLURAL, name, {"status": status}
        )

    def set_pod_condition(self, namespace: str, name: str, condition: Manifest) -> None:
        """Add or replace one condition of a pod's status (a readiness gate's): a
        strategic merge keyed by the condition type leaves the kubelet's alone."""
        self.core.patch_namespaced_pod_status(
            name, namespace, {"status": {"conditions": [condition]}}
        )

    def post_event(self, cr: Manifest, event_type: str, reason: str, message: str) -> None:
        """An events.k8s.io/v1 Event about the resource (best effort)."""
        meta = cr["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        body = client.EventsV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]
            ),
            event_time=now,
            action="Reconcile",
            reason=reason,
            note=message[:1024],
            type=event_type,
            reporting_controller=f"{names.GROUP}/operator",
            reporting_instance=names.FIELD_MANAGER,
            regarding=client.V1ObjectReference(
                api_version=names.API_VERSION,
                kind=names.KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
            ),
        )
        with contextlib.suppress(ApiException):  # advisory: never fail a reconcile over one
            self.events.create_namespaced_event(meta["namespace"], body)
