"""The peering gate: kopf's rule for which operator acts, as a table, and the gate's
reading of the peering object (no cluster: the object is handed in)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from deepstack_operator.peering import CACHE_SECONDS, Peering, PeeringGate, blocking_peers

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)
US = "pod-a/1/aaaa"


def seen(seconds_ago: float) -> str:
    return (NOW - datetime.timedelta(seconds=seconds_ago)).isoformat()


def record(priority: int, seconds_ago: float = 1, lifetime: int = 30) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen(seconds_ago)}


@pytest.mark.parametrize(
    ("records", "blocking"),
    [
        ({}, []),  # alone
        ({US: record(100)}, []),  # only our own record
        ({US: record(100), "b": record(200)}, ["b"]),  # a higher priority: paused
        ({US: record(100), "b": record(100)}, ["b"]),  # the same: kopf pauses both
        ({US: record(100), "b": record(50)}, []),  # a lower one: we act
        ({"b": record(200, seconds_ago=31)}, []),  # its lifetime is over: dead
        ({"b": record(200, seconds_ago=29)}, ["b"]),
        ({"b": {"priority": 200}}, ["b"]),  # no time: seen now (kopf's reading)
        ({"b": {"priority": 200, "lastseen": seen(59)}}, ["b"]),  # no lifetime: 60 s
        ({"b": {"priority": 200, "lastseen": seen(61)}}, []),
        ({"b": {"priority": "high"}}, ["b"]),  # unreadable: it may be acting
        ({"b": {}}, []),  # priority 0 < ours
        ({"b": None}, []),  # a removed record
        ({"b": record(200), "c": record(300), "d": record(1)}, ["b", "c"]),
    ],
)
def test_blocking_peers(records: dict[str, Any], blocking: list[str]) -> None:
    assert blocking_peers(records, identity=US, priority=100, now=NOW) == blocking


def test_naive_and_kopf_timestamps_are_read() -> None:
    # kopf writes an aware ISO time; a naive one is taken as UTC.
    naive = (NOW - datetime.timedelta(seconds=5)).replace(tzinfo=None).isoformat()
    assert blocking_peers(
        {"b": {"priority": 200, "lastseen": naive}}, identity=US, priority=100, now=NOW
    ) == ["b"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gate(
    objects: dict[str | None, dict[str, Any] | Exception | None],
    clusterwide: bool = False,
) -> tuple[PeeringGate, list[str | None], list[tuple[str, bool]], Clock]:
    reads: list[str | None] = []
    reports: list[tuple[str, bool]] = []
    clock = Clock()

    def read(namespace: str | None) -> dict[str, Any] | None:
        reads.append(namespace)
        found = objects.get(namespace)
        if isinstance(found, Exception):
            raise found
        return found

    peering = Peering(name="dsd", identity=US, priority=100, clusterwide=clusterwide)
    g = PeeringGate(
        peering,
        read,
        report=lambda where, active: reports.append((where, active)),
        clock=clock,
        now=lambda: NOW,
    )
    return g, reads, reports, clock


def test_standalone_always_acts_and_reads_nothing() -> None:
    def read(namespace: str | None) -> None:
        raise AssertionError("read")

    assert PeeringGate(None, read).active("ns")


def test_a_higher_peer_pauses_until_it_is_gone() -> None:
    obj: dict[str, Any] = {"status": {US: record(100), "b": record(200)}}
    g, reads, reports, clock = gate({"ns": obj})
    assert not g.active("ns")
    assert reports == [("ns/dsd", False)]
    obj["status"].pop("b")  # it stopped and removed its record
    assert not g.active("ns")  # the answer is kept for CACHE_SECONDS
    assert reads == ["ns"]
    clock.t += CACHE_SECONDS
    assert g.active("ns")
    assert reads == ["ns", "ns"]
    assert reports[-1] == ("ns/dsd", True)


def test_each_namespace_has_its_own_peering_object_unless_clusterwide() -> None:
    paused = {"status": {"b": record(200)}}
    g, reads, _, _ = gate({"ns1": paused, "ns2": {"status": {}}})
    assert not g.active("ns1")
    assert g.active("ns2")
    assert reads == ["ns1", "ns2"]
    g, reads, reports, _ = gate({None: paused}, clusterwide=True)
    assert not g.active("ns1")
    assert not g.active("ns2")
    assert reads == [None]  # one cluster-wide object, read once
    assert reports == [("dsd", False)]


@pytest.mark.parametrize("found", [None, RuntimeError("503 Service Unavailable")])
def test_no_peering_object_or_no_answer_means_not_now(found: Exception | None) -> None:
    """kopf does not resume its watch streams without the peering object either."""
    g, _, _, _ = gate({"ns": found})
    assert not g.active("ns")


class NoReconcile:
    def reconcile(self, namespace: str, name: str) -> None:
        raise AssertionError(f"reconciled {namespace}/{name} while another instance acts")


def test_a_paused_instance_parks_queued_keys_and_acts_on_them_once_active(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the work queue holds when kopf pauses this instance (requeue timers, events
    that came just before) is neither reconciled nor counted; once the other instance
    is gone it is queued again."""
    import asyncio

    from deepstack_operator import handlers
    from deepstack_operator.metrics import OperatorMetrics
    from deepstack_operator.workqueue import WorkQueue

    obj: dict[str, Any] = {"status": {US: record(100), "b": record(200)}}
    clock = Clock()
    peering = Peering(name="dsd", identity=US, priority=100, clusterwide=False)
    metrics = OperatorMetrics()
    state = handlers.Runtime()
    state.metrics = metrics
    state.reconciler = NoReconcile()  # type: ignore[assignment]
    state.gate = PeeringGate(peering, lambda _: obj, clock=clock, now=lambda: NOW)
    monkeypatch.setattr(handlers, "PARKED_RECHECK_SECONDS", 0.01)

    async def scenario() -> None:
        queue = WorkQueue()
        state.queue = queue
        assert await handlers._process(state, ("ns", "x")) is None
        assert state.parked == {("ns", "x")}
        unpark = asyncio.create_task(handlers._unpark(state))
        try:
            await asyncio.sleep(0.05)
            assert len(queue) == 0  # still paused: nothing queued
            obj["status"].pop("b")
            clock.t += CACHE_SECONDS
            async with asyncio.timeout(5):
                while len(queue) == 0:
                    await asyncio.sleep(0.01)
            assert state.parked == set()
        finally:
            unpark.cancel()

    asyncio.run(scenario())
    assert reconciles_counted(metrics) == 0


def reconciles_counted(metrics: Any) -> float:
    from prometheus_client.exposition import generate_latest

    from devkit.metrics import sample

    text = generate_latest(metrics.registry).decode()
    return sum(
        sample(
            text,
            "controller_runtime_reconcile_total",
            controller="deepstackdisaggregation",
            result=result,
        )
        for result in ("success", "error", "requeue_after")
    )
