"""Which pods the reconciler listens to: only those its own workloads made."""

from __future__ import annotations

from typing import Any

from deepstack_operator.decide import router_contracts as _router_contracts
from deepstack_operator.observe import controlled_pods

CR = {"metadata": {"name": "demo", "namespace": "ns"}}
LIVE: dict[tuple[str, str], dict[str, Any]] = {
    ("StatefulSet", "demo-language-abc123"): {},
    ("Deployment", "demo-router"): {},
}


def pod(role: str, owner_kind: str, owner: str, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{owner}-x",
            "labels": {"disagg.deepstack.dev/role": role, "disagg.deepstack.dev/contract": owner},
            "ownerReferences": [{"kind": owner_kind, "name": owner, "controller": True}],
        },
        "status": {"phase": phase},
    }


def test_only_pods_of_our_workloads() -> None:
    ours = [
        pod("language", "StatefulSet", "demo-language-abc123"),
        pod("router", "ReplicaSet", "demo-router-7d9f"),
    ]
    strangers = [
        pod("language", "StatefulSet", "someone-else"),
        pod("router", "ReplicaSet", "other-router-1"),
        {"metadata": {"name": "bare", "labels": {"disagg.deepstack.dev/role": "language"}}},
    ]
    assert controlled_pods(ours + strangers, CR["metadata"]["name"], LIVE) == ours


def test_an_evicted_router_pod_holds_no_rollout() -> None:
    pods = [
        pod("router", "ReplicaSet", "demo-router-new"),
        pod("router", "ReplicaSet", "demo-router-old", phase="Failed"),
    ]
    assert _router_contracts(pods) == {"demo-router-new"}
