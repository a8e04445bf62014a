"""The thin kopf layer: watch events become work-queue keys; workers reconcile them.

Only `@kopf.on.event` handlers are used: they add no finalizers and write nothing to the
resource, so kopf itself never makes a no-op reconcile write. When kopf peering pauses
this instance (another operator with a higher priority is active), no events arrive, and
what the queue still holds (requeue timers, events that came just before) is parked by
the peering gate (peering.py) until this instance is the active one again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import kopf
from aiohttp import web
from kubernetes import client, config

from deepstack_operator import names
from deepstack_operator.kube import Kube
from deepstack_operator.metrics import OperatorMetrics, make_app
from deepstack_operator.peering import Peering, PeeringGate
from deepstack_operator.reconcile import Reconciler
from deepstack_operator.workqueue import Key, WorkQueue

log = logging.getLogger(__name__)

# Children whose changes (drift, deletion, pods becoming ready) trigger a reconcile of
# their owner, as kopf selectors: (group, version, plural), or (version, plural) for core.
CHILD_KINDS: tuple[tuple[str, str] | tuple[str, str, str], ...] = (
    ("apps", "v1", "statefulsets"),
    ("apps", "v1", "deployments"),
    ("v1", "services"),
    ("v1", "configmaps"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
)
OWNED = f"app.kubernetes.io/managed-by={names.MANAGED_BY}"
# While paused, parked keys are offered to the peering gate again this often.
PARKED_RECHECK_SECONDS = 2.0
# The key under which __main__ hands kopf's identity of this instance to the handlers.
IDENTITY_MEMO = "peering_identity"


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


STATE = Runtime()


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        api: client.ApiClient = config.new_client_from_config()  # type: ignore[no-untyped-call]
        return api  # from KUBECONFIG or ~/.kube/config


async def _process(key: Key) -> float | None:
    assert STATE.reconciler is not None
    assert STATE.gate is not None
    if not await asyncio.to_thread(STATE.gate.active, key[0]):
        STATE.parked.add(key)  # another instance acts meanwhile: no reconcile, no writes
        return None
    STATE.parked.discard(key)
    started = time.monotonic()
    try:
        outcome = await asyncio.to_thread(STATE.reconciler.reconcile, *key)
    except Exception:
        STATE.metrics.record("error", time.monotonic() - started)
        log.exception("reconcile of %s/%s failed; retrying with backoff", *key)
        raise
    STATE.metrics.set_phase(key, outcome.phase)
    STATE.metrics.set_ready(key, outcome.ready if outcome.phase is not None else None)
    STATE.metrics.record_writes(outcome.writes)
    result = "requeue_after" if outcome.requeue_after else "success"
    STATE.metrics.record(result, time.monotonic() - started)
    return outcome.requeue_after


async def _unpark() -> None:
    """Queue the parked keys again once the gate lets this instance act on them (kopf's
    re-listing after a resume queues them too; this also covers a gate that opens a
    moment after kopf resumes)."""
    assert STATE.queue is not None
    assert STATE.gate is not None
    while True:
        await asyncio.sleep(PARKED_RECHECK_SECONDS)
        for key in sorted(STATE.parked):
            if await asyncio.to_thread(STATE.gate.active, key[0]):
                STATE.parked.discard(key)
                STATE.queue.add(key)


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
    settings.posting.enabled = False  # we post our own, meaningful events
    settings.peering.lifetime = int(os.environ.get("DEEPSTACK_PEERING_LIFETIME", "30"))
    # Children are watched only if they carry our label (filtered by the API server).
    for selector in CHILD_KINDS:
        settings.watching.label_selectors[selector] = OWNED
    STATE.queue = WorkQueue()
    kube = Kube(_api_client())
    STATE.reconciler = Reconciler(kube)
    peering = _peering(settings, memo)
    STATE.gate = PeeringGate(
        peering,
        lambda namespace: kube.get_peering(settings.peering.name, namespace),
        report=STATE.metrics.set_active,
    )
    workers = int(os.environ.get("DEEPSTACK_OPERATOR_WORKERS", "4"))
    STATE.tasks = [asyncio.create_task(STATE.queue.worker(_process)) for _ in range(workers)]
    if peering is not None:
        STATE.tasks.append(asyncio.create_task(_unpark()))
    port = int(os.environ.get("DEEPSTACK_OPERATOR_METRICS_PORT", "8080"))
    runner = web.AppRunner(make_app(STATE.metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(
        runner, os.environ.get("DEEPSTACK_OPERATOR_METRICS_HOST", "0.0.0.0"), port
    ).start()
    STATE.site = runner
    log.info("metrics and /healthz on port %d; %d workers", port, workers)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    for task in STATE.tasks:
        task.cancel()
    await asyncio.gather(*STATE.tasks, return_exceptions=True)
    if STATE.queue is not None:
        STATE.queue.shutdown()
    if STATE.site is not None:
        await STATE.site.cleanup()


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL)
async def resource_event(namespace: str | None, name: str, **_: Any) -> None:
    if STATE.queue is not None and namespace:
        STATE.queue.add((namespace, name))


async def _child_event(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    owner = labels.get(names.INSTANCE_LABEL)
    if owner and namespace and STATE.queue is not None:
        STATE.queue.add((namespace, owner))


for _selector in CHILD_KINDS:
    kopf.on.event(*_selector, labels={"app.kubernetes.io/managed-by": names.MANAGED_BY})(
        _child_event
    )
