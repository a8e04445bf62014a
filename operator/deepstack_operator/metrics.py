"""Operator metrics under the names controller-runtime operators use, plus an inventory
of resources by phase; served with /healthz on one HTTP port."""

from __future__ import annotations

import contextlib
from collections import Counter as Tally

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from deepstack_operator import names

RESULTS = ("success", "error", "requeue_after")
PHASES = ("Pending", "Progressing", "Ready", "Degraded")
WRITE_OPERATIONS = ("created", "updated", "deleted", "status")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconcile_total = Counter(
            "controller_runtime_reconcile",
            "Reconciliations per controller and result.",
            ["controller", "result"],
            registry=self.registry,
        )
        self.reconcile_time = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Time per reconciliation.",
            ["controller"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "controller_runtime_reconcile_errors",
            "Reconciliations that failed.",
            ["controller"],
            registry=self.registry,
        )
        self.reconcile_cpu = Counter(
            "deepstack_operator_reconcile_cpu_seconds",
            "CPU time the reconciling threads spent in reconciles.",
            registry=self.registry,
        )
        self.resources = Gauge(
            "deepstack_operator_resources",
            "DeepStackDisaggregation resources by phase.",
            ["phase"],
            registry=self.registry,
        )
        self.writes = Counter(
            "deepstack_operator_api_writes",
            "Writes the operator made to the API server (dry runs excluded), by operation.",
            ["operation"],
            registry=self.registry,
        )
        self.ready_replicas = Gauge(
            "deepstack_operator_ready_replicas",
            "Ready pods of each role of each resource (from its status).",
            ["resource_namespace", "resource", "role"],
            registry=self.registry,
        )
        # client-go's leader-election gauge, for kopf peering: one series per peering object.
        self.active = Gauge(
            "leader_election_master_status",
            "1 while this instance is the active one of its kopf peering, 0 while paused.",
            ["name"],
            registry=self.registry,
        )
        for operation in WRITE_OPERATIONS:
            self.writes.labels(operation=operation)
        c = names.CONTROLLER
        for result in RESULTS:
            self.reconcile_total.labels(controller=c, result=result)
        self.reconcile_errors.labels(controller=c)
        self.reconcile_time.labels(controller=c)
        for phase in PHASES:
            self.resources.labels(phase=phase).set(0)
        self._phases: dict[tuple[str, str], str] = {}

    def record_cpu(self, seconds: float) -> None:
        self.reconcile_cpu.inc(max(seconds, 0.0))

    def record(self, result: str, seconds: float) -> None:
        c = names.CONTROLLER
        self.reconcile_total.labels(controller=c, result=result).inc()
        self.reconcile_time.labels(controller=c).observe(seconds)
        if result == "error":
            self.reconcile_errors.labels(controller=c).inc()

    def record_writes(self, writes: list[str]) -> None:
        """`writes` as a reconcile reports them: "created Kind/name", ..., "status"."""
        for write in writes:
            self.writes.labels(operation=write.split(" ", 1)[0]).inc()

    def set_active(self, peering: str, active: bool) -> None:
        self.active.labels(name=peering).set(1 if active else 0)

    def set_ready(self, key: tuple[str, str], ready: dict[str, int] | None) -> None:
        """Per-role ready counts of one resource; None removes its series."""
        namespace, name = key
        for role in ("encode", "language", "router"):
            labels = {"resource_namespace": namespace, "resource": name, "role": role}
            if ready is not None and role in ready:
                self.ready_replicas.labels(**labels).set(ready[role])
            else:
                with contextlib.suppress(KeyError):
                    self.ready_replicas.remove(*labels.values())

    def set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        counts = Tally(self._phases.values())
        for p in PHASES:
            self.resources.labels(phase=p).set(counts.get(p, 0))


def make_app(metrics: OperatorMetrics) -> web.Application:
    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # Served by the operator's own event loop: an answer means the loop is alive.
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", healthz)
    return app
