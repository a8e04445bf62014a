"""Pure renderers: a DeepStackDisaggregation (as stored, defaults applied) -> the manifest
dicts of every child object. No I/O, no Kubernetes client, no kopf: snapshot-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepstack_operator.render.config import render_config_map, revision, runtime_config
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
from deepstack_runtime.config import ConfigError

Manifest = dict[str, Any]
# The longest resource name whose children's names stay within Kubernetes' limits.
MAX_NAME_LENGTH = 36


@dataclass(frozen=True)
class Capabilities:
    """What the target cluster offers beyond the core APIs."""

    pod_monitor: bool = False


def render_all(
    cr: Manifest,
    capabilities: Capabilities = Capabilities(),
    replicas: dict[str, int | None] | None = None,
) -> list[Manifest]:
    """Every child the resource should have, in apply order (config before workloads);
    of the pod groups, the current revision's StatefulSets, sized by `replicas` (the
    rollout plan's; default: the spec's). Raises ConfigError (from
    deepstack_runtime.config) for a spec the runtime rejects."""
    config = runtime_config(cr)
    if len(cr["metadata"]["name"]) > MAX_NAME_LENGTH:  # the CRD says so; older objects
        raise ConfigError(
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters: a pod group's "
            'StatefulSet adds "-language-" and a 6-digit revision, and must stay within 52'
        )
    children: list[Manifest] = [render_config_map(cr, config)]
    children += render_role_services(cr, config)
    children += render_role_statefulsets(cr, config, replicas)
    children += render_router(cr, config)
    children += render_disruption_budgets(cr)
    children += render_autoscalers(cr, config)
    children += render_network_policy(cr, config)
    if capabilities.pod_monitor:
        from deepstack_operator.render.monitoring import render_pod_monitor

        children += render_pod_monitor(cr)
    return children


__all__ = ["Capabilities", "Manifest", "render_all", "revision", "runtime_config"]
