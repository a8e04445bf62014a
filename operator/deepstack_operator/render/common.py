"""Pieces every renderer uses: metadata with owner references."""

from __future__ import annotations

from typing import Any

from deepstack_operator import names
from deepstack_operator.desired import DesiredState

Manifest = dict[str, Any]


def owner_reference(state: DesiredState) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": state.name,
        "uid": state.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(state: DesiredState, name: str, role: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": state.namespace,
        "labels": names.common_labels(state.name, role),
        "ownerReferences": [owner_reference(state)],
    }


def revision_labels(state: DesiredState) -> dict[str, str]:
    return {names.CONTRACT_LABEL: state.contract, names.REVISION_LABEL: state.revision}
