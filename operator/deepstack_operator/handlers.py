"""The thin kopf layer: watch events become work-queue keys; workers reconcile them.

The operator's process-wide state (queue, reconciler, watch cache, ...) lives in kopf's
`memo` under RUNTIME_MEMO, made at startup.

Only `@kopf.on.event` handlers are used: they add no finalizers and write nothing to the
resource, so kopf itself never makes a no-op reconcile write. When kopf peering pauses
this instance (another operator with a higher priority is active), no events arrive, and
what the queue still holds (requeue timers, events that came just before) is parked by
the peering gate (peering.py) until this instance is the active one again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import kopf
from aiohttp import web
from kubernetes import client, config

from deepstack_operator import names
from deepstack_operator.kube import Kube, WatchCache
from deepstack_operator.metrics import OperatorMetrics, make_app
from deepstack_operator.peering import Peering, PeeringGate
from deepstack_operator.reconcile import Outcome, Reconciler
from deepstack_operator.workqueue import Key, WorkQueue

log = logging.getLogger(__name__)

# Children whose changes (drift, deletion, pods becoming ready) trigger a reconcile of
# their owner and reach the watch cache: kind -> kopf selector, (group, version, plural),
# or (version, plural) for core.
CHILD_KINDS: dict[str, tuple[str, str] | tuple[str, str, str]] = {
    "StatefulSet": ("apps", "v1", "statefulsets"),
    "Deployment": ("apps", "v1", "deployments"),
    "Service": ("v1", "services"),
    "ConfigMap": ("v1", "configmaps"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
}
OWNED = f"app.kubernetes.io/managed-by={names.MANAGED_BY}"
# While paused, parked keys are offered to the peering gate again this often.
PARKED_RECHECK_SECONDS = 2.0
# The key under which __main__ hands kopf's identity of this instance to the handlers.
IDENTITY_MEMO = "peering_identity"
# The key of the operator's Runtime in kopf's memo.
RUNTIME_MEMO = "deepstack_runtime"


class Runtime:
    """The operator's process-wide state, created at startup."""

    def __init__(self) -> None:
        self.metrics = OperatorMetrics()
        self.queue: WorkQueue | None = None
        self.reconciler: Reconciler | None = None
        self.gate: PeeringGate | None = None
        # Keys taken off the queue while another instance was active (_unpark).
        self.parked: set[Key] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.site: web.AppRunner | None = None
        self.cache = WatchCache()


def _runtime(memo: kopf.Memo) -> Runtime | None:
    """None after cleanup (events before startup do not come: kopf starts watching once
    the startup handlers are done)."""
    runtime = memo.get(RUNTIME_MEMO)
    return runtime if isinstance(runtime, Runtime) else None


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        api: client.ApiClient = config.new_client_from_config()  # type: ignore[no-untyped-call]
        return api  # from KUBECONFIG or ~/.kube/config


def _timed_reconcile(state: Runtime, key: Key) -> tuple[Outcome, float]:
    """A reconcile in this worker thread, and the CPU seconds the thread spent on it."""
    assert state.reconciler is not None
    cpu = time.thread_time()
    outcome = state.reconciler.reconcile(*key)
    return outcome, time.thread_time() - cpu


async def _process(state: Runtime, key: Key) -> float | None:
    assert state.gate is not None
    if not await asyncio.to_thread(state.gate.active, key[0]):
        state.parked.add(key)  # another instance acts meanwhile: no reconcile, no writes
        return None
    state.parked.discard(key)
    started = time.monotonic()
    try:
        outcome, cpu = await asyncio.to_thread(_timed_reconcile, state, key)
    except Exception:
        state.metrics.record("error", time.monotonic() - started)
        log.exception("reconcile of %s/%s failed; retrying with backoff", *key)
        raise
    state.metrics.record_cpu(cpu)
    state.metrics.set_phase(key, outcome.phase)
    state.metrics.set_ready(key, outcome.ready if outcome.phase is not None else None)
    state.metrics.record_writes(outcome.writes)
    result = "requeue_after" if outcome.requeue_after else "success"
    state.metrics.record(result, time.monotonic() - started)
    return outcome.requeue_after


async def _unpark(state: Runtime) -> None:
    """Queue the parked keys again once the gate lets this instance act on them (kopf's
    re-listing after a resume queues them too; this also covers a gate that opens a
    moment after kopf resumes)."""
    assert state.queue is not None
    assert state.gate is not None
    while True:
        await asyncio.sleep(PARKED_RECHECK_SECONDS)
        for key in sorted(state.parked):
            if await asyncio.to_thread(state.gate.active, key[0]):
                state.parked.discard(key)
                state.queue.add(key)


def _peering(settings: kopf.OperatorSettings, memo: kopf.Memo) -> Peering | None:
    if settings.peering.standalone:
        return None
    identity = memo.get(IDENTITY_MEMO)
    if not identity:
        raise kopf.PermanentError(
            "no peering identity: run the operator as `deepstack-operator` (or "
            "`python -m deepstack_operator`), which tells kopf and the handlers the same one"
        )
    return Peering(
        name=settings.peering.name,
        identity=str(identity),
        priority=settings.peering.priority,
        clusterwide=settings.peering.clusterwide,
    )


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    state = Runtime()
    settings.posting.enabled = False  # we post our own, meaningful events
    settings.peering.lifetime = int(os.environ.get("DEEPSTACK_PEERING_LIFETIME", "30"))
    # Children are watched only if they carry our label (filtered by the API server).
    for selector in CHILD_KINDS.values():
        settings.watching.label_selectors[selector] = OWNED
    state.queue = WorkQueue()
    kube = Kube(_api_client(), state.cache, frozenset(CHILD_KINDS))
    state.reconciler = Reconciler(kube)
    peering = _peering(settings, memo)
    state.gate = PeeringGate(
        peering,
        lambda namespace: kube.get_peering(settings.peering.name, namespace),
        report=state.metrics.set_active,
    )
    workers = int(os.environ.get("DEEPSTACK_OPERATOR_WORKERS", "4"))
    process = functools.partial(_process, state)
    state.tasks = [asyncio.create_task(state.queue.worker(process)) for _ in range(workers)]
    if peering is not None:
        state.tasks.append(asyncio.create_task(_unpark(state)))
    port = int(os.environ.get("DEEPSTACK_OPERATOR_METRICS_PORT", "8080"))
    runner = web.AppRunner(make_app(state.metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(
        runner, os.environ.get("DEEPSTACK_OPERATOR_METRICS_HOST", "0.0.0.0"), port
    ).start()
    state.site = runner
    memo[RUNTIME_MEMO] = state
    log.info("metrics and /healthz on port %d; %d workers", port, workers)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = _runtime(memo)
    memo.pop(RUNTIME_MEMO, None)
    if state is None:
        return
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    if state.queue is not None:
        state.queue.shutdown()
    if state.site is not None:
        await state.site.cleanup()


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL)
async def resource_event(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    state = _runtime(memo)
    if state is not None and state.queue is not None and namespace:
        state.queue.add((namespace, name))


def _child_handler(kind: str) -> Any:
    async def child_event(
        event: Mapping[str, Any],
        labels: Mapping[str, str],
        namespace: str | None,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        state = _runtime(memo)
        if state is None:
            return
        obj = event.get("object")
        if isinstance(obj, dict):
            state.cache.seen(kind, obj, deleted=event.get("type") == "DELETED")
        owner = labels.get(names.INSTANCE_LABEL)
        if owner and namespace and state.queue is not None:
            state.queue.add((namespace, owner))

    child_event.__name__ = f"{kind.lower()}_event"  # kopf's handler id
    return child_event


for _kind, _selector in CHILD_KINDS.items():
    kopf.on.event(*_selector, labels={"app.kubernetes.io/managed-by": names.MANAGED_BY})(
        _child_handler(_kind)
    )
