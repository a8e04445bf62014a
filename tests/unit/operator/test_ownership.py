"""The replica-count handover to an autoscaler, as tables."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deepstack_operator.names import FIELD_MANAGER
from deepstack_operator.ownership import (
    keep_replicas_until_handed_over,
    replica_owners,
    scaled_by_another_manager,
    yield_replicas_to_other_managers,
)
from deepstack_operator.status import router_replicas

HPA = "kube-controller-manager"
KEDA = "keda-operator"


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


@pytest.mark.parametrize(
    ("stored", "applied"),
    [
        # Created just now, or only ever ours: router.replicas.
        (None, 2),
        (live(2, FIELD_MANAGER), 2),
        (live(4), 2),  # nobody owns it (a Deployment from before managed fields)
        # The user's HPA (or KEDA's) wrote it, alone or beside us: theirs from now on.
        (live(5, HPA), None),
        (live(5, FIELD_MANAGER, KEDA), None),
    ],
)
def test_router_replicas_yield_to_another_manager(
    stored: dict[str, Any] | None, applied: int | None
) -> None:
    manifest = rendered(2)
    before = copy.deepcopy(manifest)
    result = yield_replicas_to_other_managers(manifest, stored)
    assert result["spec"].get("replicas") == applied
    assert manifest == before
    # What the apply then adds back never undoes the handover, nor drops the count
    # while it is still ours.
    final = keep_replicas_until_handed_over(result, stored)
    assert final["spec"].get("replicas") == applied


def test_scaled_by_another_manager() -> None:
    assert not scaled_by_another_manager(None)
    assert not scaled_by_another_manager(live(1, FIELD_MANAGER))
    assert scaled_by_another_manager(live(3, FIELD_MANAGER, HPA))
    assert scaled_by_another_manager(live(3, KEDA))


@pytest.mark.parametrize(
    ("stored", "desired"),
    [
        (None, 2),  # not there yet: the spec's count
        (live(2, FIELD_MANAGER), 2),
        (live(5, HPA), 5),  # another manager sizes it: what it asks for is the target
    ],
)
def test_router_desired_count(stored: dict[str, Any] | None, desired: int) -> None:
    assert router_replicas(2, stored) == desired
