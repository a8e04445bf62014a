"""PodDisruptionBudgets, HorizontalPodAutoscalers and the NetworkPolicy."""

from __future__ import annotations

from typing import Any

from deepstack_operator import names
from deepstack_operator.render.common import Manifest, cr_name, metadata, scaled_by_hpa, spec
from deepstack_operator.render.config import revision
from deepstack_runtime.config import RuntimeConfig


def render_disruption_budgets(cr: Manifest) -> list[Manifest]:
    """One per pod group, and one for the router when it has more than one pod (a
    budget on a single pod would block node drains)."""
    max_unavailable = spec(cr).get("rollout", {}).get("maxUnavailable", 1)
    budgets = {role: max_unavailable for role in names.ROLES}
    router = spec(cr).get("router", {})
    if router.get("enabled", True) and router.get("replicas", 1) > 1:
        budgets[names.ROUTER] = 1
    return [
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(cr, names.child_name(cr_name(cr), role), role),
            "spec": {
                "maxUnavailable": unavailable,
                "selector": {"matchLabels": names.selector_labels(cr_name(cr), role)},
            },
        }
        for role, unavailable in budgets.items()
    ]


def render_autoscalers(cr: Manifest, config: RuntimeConfig) -> list[Manifest]:
    """One per autoscaled group, sizing the current revision's StatefulSet."""
    autoscaling = spec(cr).get("autoscaling") or {}
    out = []
    for role in sorted(scaled_by_hpa(cr)):
        bounds = autoscaling[role]
        name = names.child_name(cr_name(cr), role)
        target = names.workload_name(cr_name(cr), role, revision(cr, config))
        out.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": metadata(cr, name, role),
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "StatefulSet",
                        "name": target,
                    },
                    "minReplicas": bounds.get("minReplicas", 1),
                    "maxReplicas": bounds["maxReplicas"],
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {
                                    "type": "Utilization",
                                    "averageUtilization": bounds.get(
                                        "targetCPUUtilizationPercentage", 80
                                    ),
                                },
                            },
                        }
                    ],
                },
            }
        )
    return out


def render_network_policy(cr: Manifest, config: RuntimeConfig) -> list[Manifest]:
    """Ingress to runtime pods: the HTTP API only from the router; encode <-> language
    traffic only between the two groups, on the ports it takes: language pods reach the
    encode bootstrap port, and each group reaches the other's Mooncake ports (encode pods
    write into language pods' memory; over RDMA, the language side's Mooncake also asks
    the encode side's Mooncake for its segment when the handshake lacks it); metrics
    from anywhere (Prometheus). Egress is left open: DNS and the model store vary by
    cluster."""
    if not spec(cr).get("networkPolicy", {}).get("enabled", True):
        return []
    name = cr_name(cr)
    t = config.transfer

    def pods(role: str) -> dict[str, Any]:
        return {"podSelector": {"matchLabels": names.selector_labels(name, role)}}

    def tcp(port: int | str) -> dict[str, Any]:
        return {"protocol": "TCP", "port": port}

    # Mooncake's handshake RPC port and, over tcp, its data port: each picked by Mooncake
    # within this range (the runtime sets it, and checks that Mooncake kept to it).
    mooncake = {"protocol": "TCP", "port": t.mooncake_min_port, "endPort": t.mooncake_max_port}
    router_in = {"from": [pods(names.ROUTER)], "ports": [tcp(config.http_port)]}
    metrics_in = {"ports": [tcp(config.metrics_port)]}
    policies = [
        {
            "podSelector": {"matchLabels": names.selector_labels(name, "encode")},
            "ingress": [
                router_in,
                metrics_in,
                {"from": [pods("language")], "ports": [tcp(t.bootstrap_port), mooncake]},
            ],
        },
        {
            "podSelector": {"matchLabels": names.selector_labels(name, "language")},
            "ingress": [router_in, metrics_in, {"from": [pods("encode")], "ports": [mooncake]}],
        },
    ]
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata(cr, f"{names.network_policy_name(name)}-{role}", role),
            "spec": {**policy, "policyTypes": ["Ingress"]},
        }
        for role, policy in zip(names.ROLES, policies, strict=True)
    ]
