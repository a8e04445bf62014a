from __future__ import annotations

from typing import Any

import pytest

from deepstack_operator.status import (
    Problem,
    RoleState,
    derive_status,
    role_state,
    transitions,
)
from deepstack_operator.transfers import TransferSummary

NOW = "2026-01-01T00:00:00Z"
READY = RoleState(desired=2, replicas=2, ready=2, updated=2, up_to_date=True)
ROLLING = RoleState(desired=2, replicas=2, ready=1, updated=1, up_to_date=True)
MISSING = RoleState(desired=1, exists=False)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize(
    ("roles", "problems", "phase", "expected"),
    [
        (
            {"encode": READY, "language": READY},
            [],
            "Ready",
            {
                "Ready": ("True", "AllReplicasReady"),
                "Progressing": ("False", "Stable"),
                "Degraded": ("False", "AsExpected"),
            },
        ),
        (
            {"encode": READY, "language": ROLLING},
            [],
            "Progressing",
            {
                "Ready": ("False", "RollingOut"),
                "Progressing": ("True", "RollingOut"),
            },
        ),
        (
            {"encode": MISSING, "language": MISSING},
            [],
            "Progressing",
            {
                "Ready": ("False", "Creating"),
                "Progressing": ("True", "Creating"),
            },
        ),
        (
            {"encode": READY, "language": READY},
            [Problem("MissingSecret", "Secret 'regcred' does not exist")],
            "Degraded",
            {"Ready": ("False", "MissingSecret"), "Degraded": ("True", "MissingSecret")},
        ),
        (
            {"encode": READY, "language": RoleState(desired=0, up_to_date=True)},
            [],
            "Pending",
            {
                "Ready": ("False", "ScaledToZero"),
                "Progressing": ("False", "Stable"),
            },
        ),
        (  # a Deployment mid-rollout: enough new pods ready, an old one still there
            {
                "encode": READY,
                "language": RoleState(2, replicas=3, ready=2, updated=2, up_to_date=True),
            },
            [],
            "Progressing",
            {"Ready": ("False", "RollingOut"), "Progressing": ("True", "RollingOut")},
        ),
    ],
)
def test_derive_status(
    roles: dict[str, RoleState], problems: list[Problem], phase: str, expected: dict[str, Any]
) -> None:
    status = derive_status(
        generation=3, roles=roles, problems=problems, url="", previous={}, now=NOW
    )
    assert status["phase"] == phase
    assert status["observedGeneration"] == 3
    got = conditions(status)
    for kind, value in expected.items():
        assert got[kind] == value, kind
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    # The phase and the conditions agree.
    flags = {kind: value[0] == "True" for kind, value in got.items()}
    agreed = (
        "Degraded" if flags["Degraded"] else "Ready" if flags["Ready"]
        else "Progressing" if flags["Progressing"] else "Pending"
    )  # fmt: skip
    assert status["phase"] == agreed


def test_counts_and_summary() -> None:
    status = derive_status(
        generation=1,
        roles={"encode": ROLLING, "language": READY},
        problems=[],
        url="http://r",
        previous={},
        now=NOW,
    )
    assert status["encode"] == {
        "replicas": 2,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "summary": "1/2",
    }
    assert status["url"] == "http://r"


def test_transition_time_kept_while_a_condition_holds() -> None:
    first = derive_status(
        generation=1,
        roles={"encode": READY, "language": READY},
        problems=[],
        url="",
        previous={},
        now=NOW,
    )
    later = derive_status(
        generation=1,
        roles={"encode": READY, "language": READY},
        problems=[],
        url="",
        previous=first,
        now="2026-01-02T00:00:00Z",
    )
    assert later == first  # nothing changed: nothing to write
    flipped = derive_status(
        generation=2,
        roles={"encode": ROLLING, "language": READY},
        problems=[],
        url="",
        previous=first,
        now="2026-01-03T00:00:00Z",
    )
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times["Ready"] == "2026-01-03T00:00:00Z"
    assert times["Degraded"] == NOW


@pytest.mark.parametrize(
    ("workload", "desired", "settled"),
    [
        (None, 1, False),
        (
            {
                "kind": "StatefulSet",
                "metadata": {"generation": 2},
                "status": {"observedGeneration": 1, "readyReplicas": 1, "updatedReplicas": 1},
            },
            1,
            False,
        ),
        (
            {
                "kind": "StatefulSet",
                "metadata": {"generation": 2},
                "status": {
                    "observedGeneration": 2,
                    "readyReplicas": 1,
                    "updatedReplicas": 1,
                    "currentRevision": "a",
                    "updateRevision": "b",
                },
            },
            1,
            False,
        ),
        (
            {
                "kind": "StatefulSet",
                "metadata": {"generation": 2},
                "status": {
                    "observedGeneration": 2,
                    "replicas": 1,
                    "readyReplicas": 1,
                    "updatedReplicas": 1,
                    "currentRevision": "b",
                    "updateRevision": "b",
                },
            },
            1,
            True,
        ),
        (
            {
                "kind": "Deployment",
                "metadata": {"generation": 1},
                "status": {
                    "observedGeneration": 1,
                    "replicas": 2,
                    "readyReplicas": 2,
                    "updatedReplicas": 2,
                },
            },
            2,
            True,
        ),
        (  # mid-rollout: an old pod is still there beside the two new ready ones
            {
                "kind": "Deployment",
                "metadata": {"generation": 2},
                "status": {
                    "observedGeneration": 2,
                    "replicas": 3,
                    "readyReplicas": 3,
                    "updatedReplicas": 2,
                },
            },
            2,
            False,
        ),
        (  # scaling down: one pod more than desired, not yet gone
            {
                "kind": "StatefulSet",
                "metadata": {"generation": 3},
                "status": {
                    "observedGeneration": 3,
                    "replicas": 3,
                    "readyReplicas": 3,
                    "updatedReplicas": 3,
                    "currentRevision": "b",
                    "updateRevision": "b",
                },
            },
            2,
            False,
        ),
    ],
)
def test_role_state(workload: dict[str, Any] | None, desired: int, settled: bool) -> None:
    assert role_state(workload, desired).settled is settled


def test_a_paired_rollout_is_progressing_until_the_old_pair_is_gone() -> None:
    """The new revision's groups may be complete, but while the old pair still serves
    (the router has not rolled) the resource is not Ready; the status names both."""
    common: dict[str, Any] = {
        "generation": 3,
        "roles": {"encode": READY, "language": READY},
        "problems": [],
        "url": "",
        "previous": {},
        "now": NOW,
        "contract": "c2",
        "revision": "r2",
    }
    rolling = derive_status(
        **common,
        live_contracts={"c1": {"encode": 2, "language": 2}, "c2": {"encode": 2, "language": 2}},
        old_revisions={"r1": "encode 2/2, language 2/2"},
    )
    assert rolling["phase"] == "Progressing"
    assert conditions(rolling)["Ready"] == ("False", "PairedRollout")
    assert conditions(rolling)["Compatible"] == ("False", "MixedContracts")
    progressing = next(c for c in rolling["conditions"] if c["type"] == "Progressing")
    assert (
        "revision r1 (encode 2/2, language 2/2) serves until r2 is ready"
        in (progressing["message"])
    )
    assert (rolling["contract"], rolling["revision"]) == ("c2", "r2")
    done = derive_status(**common, live_contracts={"c2": {"encode": 2, "language": 2}})
    assert done["phase"] == "Ready"
    assert conditions(done)["Compatible"] == ("True", "SingleContract")


@pytest.mark.parametrize(
    ("live", "expected"),
    [
        ({}, ("True", "SingleContract")),
        ({"new": {"encode": 1}}, ("True", "SingleContract")),
        ({"old": {"encode": 1, "language": 1}}, ("False", "ContractPending")),
        ({"old": {"language": 1}, "new": {"encode": 1}}, ("False", "MixedContracts")),
    ],
)
def test_compatible(live: dict[str, dict[str, int]], expected: tuple[str, str]) -> None:
    status = derive_status(
        generation=1, roles={"encode": READY, "language": READY}, problems=[], url="",
        previous={}, now=NOW, contract="new", live_contracts=live,
    )  # fmt: skip
    assert conditions(status)["Compatible"] == expected


@pytest.mark.parametrize(
    ("summary", "protocol", "expected"),
    [
        (TransferSummary(0, ()), "tcp", ("False", "Unverified")),
        (TransferSummary(2, ("tcp",)), "tcp", ("True", "TransferVerified")),
        (TransferSummary(1, ("rdma",)), "rdma", ("True", "TransferVerified")),
        (TransferSummary(2, ("rdma", "tcp")), "rdma", ("True", "TCPFallback")),
    ],
)
def test_transfer_ready_says_what_was_verified(
    summary: TransferSummary, protocol: str, expected: tuple[str, str]
) -> None:
    """Ready pods are not proof: only a verified transfer is; RDMA asked for and TCP
    taken is said, never hidden."""
    status = derive_status(
        generation=1, roles={"encode": READY, "language": READY}, problems=[], url="",
        previous={}, now=NOW, transfer=summary, protocol=protocol,
    )  # fmt: skip
    assert conditions(status)["TransferReady"] == expected
    assert status["language"]["transferVerified"] == summary.verified
    assert status["language"]["transports"] == list(summary.transports)
    assert status["phase"] == "Ready"  # serving does not wait on the condition


def test_a_fallback_to_tcp_is_announced_once_as_a_warning() -> None:
    common: dict[str, Any] = {
        "generation": 1, "roles": {"encode": READY, "language": READY}, "problems": [],
        "url": "", "now": NOW, "protocol": "rdma",
    }  # fmt: skip
    before = derive_status(**common, previous={}, transfer=TransferSummary(0, ()))
    fallback = derive_status(**common, previous=before, transfer=TransferSummary(1, ("tcp",)))
    warnings = [e for e in transitions(before, fallback) if e[1] == "TCPFallback"]
    assert len(warnings) == 1
    assert warnings[0][0] == "Warning"
    assert "RDMA was asked for" in warnings[0][2]
    again = derive_status(**common, previous=fallback, transfer=TransferSummary(2, ("tcp",)))
    assert transitions(fallback, again) == []  # said once, not at every status


def test_phase_transitions_are_announced() -> None:
    ready = derive_status(generation=1, roles={"encode": READY, "language": READY},
                          problems=[], url="", previous={}, now=NOW)  # fmt: skip
    rolling = derive_status(generation=2, roles={"encode": READY, "language": ROLLING},
                            problems=[], url="", previous=ready, now=NOW)  # fmt: skip
    assert transitions({}, ready) == [("Normal", "Ready", "all replicas are ready")]
    assert transitions(ready, rolling) == [("Normal", "RollingOut", "a change is rolling out")]
