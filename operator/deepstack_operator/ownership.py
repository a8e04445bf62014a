"""Handing `spec.replicas` over to another controller without server-side apply dropping it.

Two ways a workload's count becomes someone else's:
- A pod group gets an autoscaler of ours: the rendered StatefulSet stops carrying
  `spec.replicas` (the HorizontalPodAutoscaler owns the count).
- The router's Deployment is scaled by a controller of the user's (their own HPA, a KEDA
  ScaledObject, `kubectl scale`): `router.replicas` is the count until then, and the
  operator stops applying it once another field manager has written it
  (`yield_replicas_to_other_managers`).
Applied without the field while we still own it, server-side apply would remove it and
the workload would fall to the default of one replica until the other controller acts.
So we keep applying the live count until another manager has written the field; from
then on it is theirs and we leave it out (`keep_replicas_until_handed_over`).
"""

from __future__ import annotations

import copy
from typing import Any

from deepstack_operator.names import FIELD_MANAGER

Manifest = dict[str, Any]


def replica_owners(live: Manifest) -> set[str]:
    """Managers recorded as owning `spec.replicas` of a live object."""
    owners = set()
    for entry in live.get("metadata", {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if "f:replicas" in fields:
            owners.add(str(entry.get("manager", "")))
    return owners


def scaled_by_another_manager(live: Manifest | None) -> bool:
    """Another field manager than ours has written `spec.replicas` of `live` (and so
    owns it, alone or with us)."""
    return live is not None and bool(replica_owners(live) - {FIELD_MANAGER})


def yield_replicas_to_other_managers(manifest: Manifest, live: Manifest | None) -> Manifest:
    """`manifest` without `spec.replicas` once another manager has written that field of
    the live object (the count is theirs from then on); unchanged otherwise."""
    if "replicas" not in manifest.get("spec", {}) or not scaled_by_another_manager(live):
        return manifest
    yielded = copy.deepcopy(manifest)
    del yielded["spec"]["replicas"]
    return yielded


def keep_replicas_until_handed_over(manifest: Manifest, live: Manifest | None) -> Manifest:
    """`manifest`, with the live replica count added while we alone own that field and
    the manifest leaves it out; unchanged otherwise."""
    if live is None or "replicas" in manifest.get("spec", {}):
        return manifest
    if replica_owners(live) != {FIELD_MANAGER}:
        return manifest  # handed over already (or never ours): leaving it out drops nothing
    replicas = (live.get("spec") or {}).get("replicas")
    if replicas is None:
        return manifest
    kept = copy.deepcopy(manifest)
    kept["spec"]["replicas"] = replicas
    return kept
