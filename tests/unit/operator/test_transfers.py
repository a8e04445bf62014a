"""The transfer-ready gate's pure parts: which pods, what their metrics say, the summary."""

from __future__ import annotations

from typing import Any

import pytest

from deepstack_operator.transfers import (
    awaiting_gate,
    can_check,
    gate_condition,
    metrics_url,
    summarize,
    verified_transport,
)

GATE = "disagg.deepstack.dev/transfer-ready"


def pod(role: str = "language", **conditions: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "labels": {"disagg.deepstack.dev/role": role, "disagg.deepstack.dev/revision": "r1"},
        },
        "spec": {
            "nodeName": "node-1",
            "containers": [{"ports": [{"name": "metrics", "containerPort": 9191}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.244.0.7",
            "conditions": [{"type": k, "status": v} for k, v in conditions.items()],
        },
    }


@pytest.mark.parametrize(
    ("candidate", "awaiting", "checkable"),
    [
        (pod(ContainersReady="True", Ready="False"), True, True),
        (pod(ContainersReady="False", Ready="False"), True, False),  # its server is starting
        (pod(ContainersReady="True", Ready="False", **{GATE: "True"}), False, False),  # done
        (pod(ContainersReady="True", Ready="True"), False, False),  # simulated: not ours
        (pod("encode", ContainersReady="True", Ready="False"), False, False),
        # Created, its containers starting: looked at again soon (no event will say
        # when it runs: pods are not watched).
        ({**pod(), "status": {"phase": "Pending"}}, True, False),
        # Not scheduled: it waits for capacity, not for the operator.
        ({**pod(), "spec": {}, "status": {"phase": "Pending"}}, False, False),
    ],
)
def test_which_pods_await_their_gate(
    candidate: dict[str, Any], awaiting: bool, checkable: bool
) -> None:
    assert awaiting_gate(candidate) is awaiting
    assert can_check(candidate) is checkable


def test_metrics_url_uses_the_pods_metrics_port() -> None:
    assert metrics_url(pod()) == "http://10.244.0.7:9191/metrics"


@pytest.mark.parametrize(
    ("text", "transport"),
    [
        ('deepstack_transfer_verified{transport="tcp"} 1.0\n', "tcp"),
        ('deepstack_transfer_verified{transport="rdma"} 1.0\n', "rdma"),
        ('deepstack_transfer_verified{transport="tcp"} 0.0\n', None),
        ("# HELP x y\nx 1\n", None),
        ("<html>not metrics</html>", None),
    ],
)
def test_verified_transport(text: str, transport: str | None) -> None:
    assert verified_transport(text) == transport


def test_summary_counts_live_language_pods_with_an_open_gate() -> None:
    verified = pod()
    verified["status"]["conditions"].append(gate_condition("tcp", "2026-11-30T00:00:00Z"))
    leaving = pod()
    leaving["status"]["conditions"].append(gate_condition("rdma", "2026-11-30T00:00:00Z"))
    leaving["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    simulated = pod(**{GATE: "True"})  # kwok opens every gate, without a reason
    older = pod()
    older["metadata"]["labels"]["disagg.deepstack.dev/revision"] = "r0"
    older["status"]["conditions"].append(gate_condition("rdma", "2026-11-30T00:00:00Z"))
    summary = summarize([verified, leaving, simulated, older, pod(), pod("encode")], "r1")
    assert (summary.verified, summary.transports) == (1, ("tcp",))
