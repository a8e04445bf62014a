"""Pure renderers: a DesiredState -> the manifest dicts of every child object. No I/O, no
Kubernetes client, no kopf, no raw spec: snapshot-tested.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepstack_operator.desired import DesiredState
from deepstack_operator.render.common import Manifest
from deepstack_operator.render.config import render_config_map
from deepstack_operator.render.monitoring import render_pod_monitor
from deepstack_operator.render.policy import (
    render_autoscalers,
    render_disruption_budgets,
    render_network_policy,
)
from deepstack_operator.render.workloads import (
    render_role_services,
    render_role_statefulsets,
    render_router,
)


@dataclass(frozen=True)
class Capabilities:
    """What the target cluster offers beyond the core APIs."""

    pod_monitor: bool = False


def render_all(
    state: DesiredState,
    capabilities: Capabilities = Capabilities(),
    replicas: dict[str, int | None] | None = None,
) -> list[Manifest]:
    """Every child the resource should have, in apply order (config before workloads);
    of the pod groups, the current revision's StatefulSets, sized by `replicas` (the
    rollout plan's; default: the spec's)."""
    children: list[Manifest] = [render_config_map(state)]
    children += render_role_services(state)
    children += render_role_statefulsets(state, replicas)
    children += render_router(state)
    children += render_disruption_budgets(state)
    children += render_autoscalers(state)
    children += render_network_policy(state)
    if capabilities.pod_monitor:
        children += render_pod_monitor(state)
    return children


__all__ = ["Capabilities", "Manifest", "render_all"]
