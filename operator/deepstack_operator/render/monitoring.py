"""A Prometheus Operator PodMonitor for the runtime pods (only where its CRD exists)."""

from __future__ import annotations

from deepstack_operator import names
from deepstack_operator.desired import DesiredState
from deepstack_operator.render.common import Manifest, metadata


def render_pod_monitor(state: DesiredState) -> list[Manifest]:
    if not state.pod_monitor:
        return []
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": metadata(state, f"{state.name}-runtime"),
            "spec": {
                "selector": {
                    "matchLabels": {
                        "app.kubernetes.io/managed-by": names.MANAGED_BY,
                        names.INSTANCE_LABEL: state.name,
                    }
                },
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}],
            },
        }
    ]
