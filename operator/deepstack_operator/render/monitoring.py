"""A Prometheus Operator PodMonitor for the runtime pods (only where its CRD exists)."""

from __future__ import annotations

from deepstack_operator import names
from deepstack_operator.render.common import Manifest, cr_name, metadata, spec


def render_pod_monitor(cr: Manifest) -> list[Manifest]:
    if not spec(cr).get("monitoring", {}).get("podMonitor", True):
        return []
    name = cr_name(cr)
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": metadata(cr, f"{name}-runtime"),
            "spec": {
                "selector": {
                    "matchLabels": {
                        "app.kubernetes.io/managed-by": names.MANAGED_BY,
                        names.INSTANCE_LABEL: name,
                    }
                },
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}],
            },
        }
    ]
