"""All Kubernetes API I/O of the reconciler (synchronous; the reconciler runs in threads).

`KubeApi` is the seam: the reconciler sees only it (tests put a fake behind it).

Writes go through server-side apply under one field manager. Before a write, a dry-run
apply shows what the server would store; if that equals the live object, nothing is
written, so a no-op reconcile leaves every resourceVersion as it was. The dry-run itself
is skipped when the same manifest was already found current at the object's present
generation (apply_if_changed).

Reads of the children the operator watches come from a cache the watch events keep
(WatchCache): a reconcile then costs no list of them, which is where the operator's time
went at scale (one list per kind per reconcile). A kind is listed for real the first time
a resource asks, and again every RESYNC_SECONDS, so that a watch event lost in a
reconnection is made good.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
import uuid
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError, ResourceNotFoundError

from deepstack_operator import names
from deepstack_runtime.config import stable_digest

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


# Whether an optional API (PodMonitor) exists is asked again this often: installing the
# Prometheus Operator later is noticed, and a reconcile never waits on discovery.
KIND_RECHECK_SECONDS = 60.0
# The watch cache's lists are redone this often per resource and kind.
RESYNC_SECONDS = 60.0


class KubeApi(Protocol):
    """What a reconcile reads and writes (kube.Kube; a fake in the unit tests)."""

    def has_kind(self, api_version: str, kind: str) -> bool: ...

    def get_cr(self, namespace: str, name: str) -> Manifest | None: ...

    def list_owned(
        self, api_version: str, kind: str, namespace: str, cr_name: str
    ) -> list[Manifest]: ...

    def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool | None: ...

    def apply_if_changed(
        self, manifest: Manifest, live: Manifest | None
    ) -> tuple[str | None, Manifest]: ...

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...

    def patch_status(self, namespace: str, name: str, status: Manifest) -> None: ...

    def set_pod_condition(self, namespace: str, name: str, condition: Manifest) -> None: ...

    def post_event(self, cr: Manifest, event_type: str, reason: str, message: str) -> None: ...


def revision_number(value: object) -> int:
    """A resourceVersion as a number, to keep the newer of two copies (etcd's revisions
    are numbers; anything else counts as newest, so it always replaces)."""
    return int(str(value)) if str(value).isdigit() else 1 << 62


def _revision_number(obj: Manifest) -> int:
    return revision_number(obj.get("metadata", {}).get("resourceVersion", ""))


class WatchCache:
    """The watched children of each resource, by (namespace, owner): as the last list or
    watch event showed them, whichever is newer; thread-safe."""

    def __init__(self, resync_seconds: float = RESYNC_SECONDS) -> None:
        self.resync_seconds = resync_seconds
        self._lock = threading.Lock()
        # (kind, namespace, owner) -> {name: object}
        self._objects: dict[tuple[str, str, str], dict[str, Manifest]] = {}
        self._listed: dict[tuple[str, str, str], float] = {}
        # (kind, namespace, name) -> resourceVersion at deletion (a list older than the
        # deletion must not bring the object back)
        self._deleted: dict[tuple[str, str, str], int] = {}

    @staticmethod
    def _owner(obj: Manifest) -> str:
        return str((obj.get("metadata", {}).get("labels") or {}).get(names.INSTANCE_LABEL, ""))

    def lookup(self, kind: str, namespace: str, owner: str) -> list[Manifest] | None:
        """The cached children, or None when they must be listed (never, or too long ago)."""
        key = (kind, namespace, owner)
        with self._lock:
            listed = self._listed.get(key)
            if listed is None or time.monotonic() - listed > self.resync_seconds:
                return None
            return list(self._objects.get(key, {}).values())

    def listed(
        self, kind: str, namespace: str, owner: str, items: list[Manifest], version: int
    ) -> None:
        """A fresh list, taken at resourceVersion `version`: it replaces what the cache
        holds, except objects a watch event showed newer (created meanwhile) or deleted
        since. Deletions the list already shows need no tombstone any more."""
        key = (kind, namespace, owner)
        with self._lock:
            listed_at = version
            held = self._objects.get(key, {})
            fresh: dict[str, Manifest] = {}
            for obj in items:
                name = obj["metadata"]["name"]
                if self._deleted.get((kind, namespace, name), -1) >= _revision_number(obj):
                    continue
                newer = held.get(name)
                use_newer = newer is not None and _revision_number(newer) > _revision_number(obj)
                fresh[name] = newer if newer is not None and use_newer else obj
            for name, obj in held.items():
                if name not in fresh and _revision_number(obj) > listed_at:
                    fresh[name] = obj  # created after the list was taken
            self._objects[key] = fresh
            self._listed[key] = time.monotonic()
            names_here = {o["metadata"]["name"] for o in items}
            for gone in [
                k
                for k, at in self._deleted.items()
                if k[:2] == (kind, namespace) and at <= listed_at and k[2] not in names_here
            ]:
                del self._deleted[gone]

    def seen(self, kind: str, obj: Manifest, deleted: bool = False) -> None:
        """A watch event (or the answer to our own write)."""
        meta = obj.get("metadata", {})
        namespace, name, owner = meta.get("namespace", ""), meta.get("name", ""), self._owner(obj)
        key = (kind, namespace, owner)
        with self._lock:
            held = self._objects.setdefault(key, {})
            old = held.get(name)
            if old is not None and _revision_number(old) > _revision_number(obj):
                return  # an older copy than ours
            if deleted:
                held.pop(name, None)
                self._deleted[(kind, namespace, name)] = _revision_number(obj)
            else:
                held[name] = obj
                self._deleted.pop((kind, namespace, name), None)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """After our own delete."""
        with self._lock:
            for (k, ns, _), held in self._objects.items():
                if k == kind and ns == namespace:
                    held.pop(name, None)


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
    """KubeApi over the Kubernetes client. `watched` are the kinds whose watch events
    reach `cache` (handlers.py); the others are listed on every read."""

    def __init__(
        self,
        api_client: client.ApiClient,
        cache: WatchCache | None = None,
        watched: frozenset[str] = frozenset(),
    ) -> None:
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
        self.cache = cache
        self.watched = watched
        self._kinds: dict[tuple[str, str], tuple[bool, float]] = {}

    def resource(self, api_version: str, kind: str) -> Any:
        with self._lock:
            key = (api_version, kind)
            if key not in self._resources:
                self._resources[key] = self.dynamic.resources.get(
                    api_version=api_version, kind=kind
                )
            return self._resources[key]

    def has_kind(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves `kind` (asked again every KIND_RECHECK_SECONDS:
        the client's discovery reloads everything on each miss)."""
        with self._lock:
            known = self._kinds.get((api_version, kind))
        if known is not None and time.monotonic() - known[1] < KIND_RECHECK_SECONDS:
            return known[0]
        try:
            self.resource(api_version, kind)
            found = True
        except ResourceNotFoundError:
            found = False
        with self._lock:
            self._kinds[(api_version, kind)] = (found, time.monotonic())
        return found

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
        cached = kind in self.watched and self.cache is not None
        if cached:
            assert self.cache is not None
            held = self.cache.lookup(kind, namespace, cr_name)
            if held is not None:
                return held
        objs = self.resource(api_version, kind).get(
            namespace=namespace, label_selector=names.owned_selector(cr_name)
        )
        items: list[Manifest] = [item.to_dict() for item in objs.items]
        if cached:
            assert self.cache is not None
            version = revision_number(objs.metadata.resourceVersion)
            self.cache.listed(kind, namespace, cr_name, items, version)
        return items

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
        key = (manifest["kind"], meta["namespace"], meta["name"])
        digest = stable_digest(manifest)
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
        if self.cache is not None and manifest["kind"] in self.watched:
            self.cache.seen(manifest["kind"], stored)
        return ("created" if live is None else "updated"), stored

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._current.pop((kind, namespace, name), None)
        if self.cache is not None:
            self.cache.forget(kind, namespace, name)
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
