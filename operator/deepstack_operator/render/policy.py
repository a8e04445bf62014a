"""PodDisruptionBudgets, HorizontalPodAutoscalers and the NetworkPolicy."""

from __future__ import annotations

from typing import Any

from deepstack_operator import names
from deepstack_operator.desired import DesiredState
from deepstack_operator.render.common import Manifest, metadata


def render_disruption_budgets(state: DesiredState) -> list[Manifest]:
    """One per pod group, and one for the router when it has more than one pod (a
    budget on a single pod would block node drains)."""
    budgets = {role: state.max_unavailable for role in names.ROLES}
    if state.router.enabled and state.router.replicas > 1:
        budgets[names.ROUTER] = 1
    return [
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(state, names.child_name(state.name, role), role),
            "spec": {
                "maxUnavailable": unavailable,
                "selector": {"matchLabels": names.selector_labels(state.name, role)},
            },
        }
        for role, unavailable in budgets.items()
    ]


def render_autoscalers(state: DesiredState) -> list[Manifest]:
    """One per autoscaled group, sizing the current revision's StatefulSet."""
    out = []
    for role in sorted(state.scaled_by_hpa):
        bounds = state.groups[role].scaling
        assert bounds is not None
        name = names.child_name(state.name, role)
        target = names.workload_name(state.name, role, state.revision)
        out.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": metadata(state, name, role),
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "StatefulSet",
                        "name": target,
                    },
                    "minReplicas": bounds.min_replicas,
                    "maxReplicas": bounds.max_replicas,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {
                                    "type": "Utilization",
                                    "averageUtilization": bounds.target_cpu_percent,
                                },
                            },
                        }
                    ],
                },
            }
        )
    return out


def render_network_policy(state: DesiredState) -> list[Manifest]:
    """Ingress to runtime pods: the HTTP API only from the router; encode <-> language
    traffic only between the two groups, on the ports it takes: language pods reach the
    encode bootstrap port, and each group reaches the other's Mooncake ports (encode pods
    write into language pods' memory; over RDMA, the language side's Mooncake also asks
    the encode side's Mooncake for its segment when the handshake lacks it); metrics
    from anywhere (Prometheus). Egress is left open: DNS and the model store vary by
    cluster."""
    if not state.network_policy:
        return []
    name, config = state.name, state.config
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
            "metadata": metadata(state, f"{names.network_policy_name(name)}-{role}", role),
            "spec": {**policy, "policyTypes": ["Ingress"]},
        }
        for role, policy in zip(names.ROLES, policies, strict=True)
    ]
