"""Names and labels of the objects the operator owns (one place, so selectors agree)."""

from __future__ import annotations

GROUP = "disagg.deepstack.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DeepStackDisaggregation"
PLURAL = "deepstackdisaggregations"
CONTROLLER = "deepstackdisaggregation"  # the `controller` label of operator metrics
FIELD_MANAGER = "deepstack-operator"
MANAGED_BY = "deepstack-operator"

INSTANCE_LABEL = f"{GROUP}/instance"
ROLE_LABEL = f"{GROUP}/role"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
# On every runtime pod and its StatefulSet: what it must share with its peers (see
# deepstack_operator.rollout).
CONTRACT_LABEL = f"{GROUP}/contract"
REVISION_LABEL = f"{GROUP}/revision"
# The readiness gate of language pods: True once the operator has seen the pod verify a
# real transfer from an encode pod (deepstack_runtime.transfer.check).
TRANSFER_READY_GATE = f"{GROUP}/transfer-ready"

ROLES = ("encode", "language")
ROUTER = "router"


def child_name(cr_name: str, role: str) -> str:
    return f"{cr_name}-{role}"


def workload_name(cr_name: str, role: str, revision: str) -> str:
    """The StatefulSet of one revision of a pod group."""
    return f"{cr_name}-{role}-{revision}"


def config_map_name(cr_name: str, revision: str) -> str:
    return f"{cr_name}-runtime-{revision}"


def network_policy_name(cr_name: str) -> str:
    return f"{cr_name}-runtime"


def selector_labels(cr_name: str, role: str) -> dict[str, str]:
    """Immutable once a workload exists: never add to these."""
    return {INSTANCE_LABEL: cr_name, ROLE_LABEL: role}


def common_labels(cr_name: str, role: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "deepstack-disagg",
        "app.kubernetes.io/instance": cr_name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        INSTANCE_LABEL: cr_name,
    }
    if role is not None:
        labels["app.kubernetes.io/component"] = role
        labels[ROLE_LABEL] = role
    return labels


def owned_selector(cr_name: str) -> str:
    """Label selector of every child of one resource."""
    return f"app.kubernetes.io/managed-by={MANAGED_BY},{INSTANCE_LABEL}={cr_name}"
