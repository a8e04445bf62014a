"""The replica-count handover to an autoscaler, as a table."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deepstack_operator.names import FIELD_MANAGER
from deepstack_operator.ownership import keep_replicas_until_handed_over, replica_owners

HPA = "kube-controller-manager"


def live(replicas: int, *owners: str) -> dict[str, Any]:
    fields: list[dict[str, Any]] = [
        {"manager": m, "operation": "Apply" if m == FIELD_MANAGER else "Update",
         "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}}
        for m in owners
    ]  # fmt: skip
    other = {"manager": "kubectl", "fieldsV1": {"f:metadata": {"f:labels": {}}}}
    return {"metadata": {"managedFields": [*fields, other]}, "spec": {"replicas": replicas}}


def rendered(replicas: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"serviceName": "x"}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"kind": "StatefulSet", "spec": spec}


@pytest.mark.parametrize(
    ("manifest", "stored", "applied"),
    [
        # Not autoscaled: the spec's count, whatever is live.
        (rendered(2), live(3, FIELD_MANAGER), 2),
        # Autoscaling just turned on, the autoscaler has not written yet: keep the count.
        (rendered(None), live(3, FIELD_MANAGER), 3),
        # The autoscaler wrote it (it owns it now, alone or with us): leave it out.
        (rendered(None), live(5, HPA), None),
        (rendered(None), live(5, FIELD_MANAGER, HPA), None),
        # Created just now: nothing to keep.
        (rendered(None), None, None),
        # Never ours: leaving it out drops nothing.
        (rendered(None), live(4), None),
    ],
)
def test_keep_replicas_until_handed_over(
    manifest: dict[str, Any], stored: dict[str, Any] | None, applied: int | None
) -> None:
    before = copy.deepcopy(manifest)
    result = keep_replicas_until_handed_over(manifest, stored)
    assert result["spec"].get("replicas") == applied
    assert manifest == before  # a new manifest, the rendered one untouched


def test_replica_owners_reads_managed_fields() -> None:
    assert replica_owners(live(1, FIELD_MANAGER, HPA)) == {FIELD_MANAGER, HPA}
    assert replica_owners({"metadata": {}}) == set()
