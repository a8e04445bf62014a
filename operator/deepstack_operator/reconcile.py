"""One level-based reconciliation:

    read the resource -> desired state (desired.py) -> observe (observe.py: children,
    pods, references, the /metrics a decision needs) -> decide (decide.py, pure: gates,
    sizes, rollout plan, rendered children, prune) -> act (act.py: gates, apply, prune)
    -> status (status.assemble, pure) -> act (write it if it changed, events)

Runs in a worker thread; raises only for unexpected failures (the work queue retries those
with backoff). Problems a user must fix become a Degraded condition, not an exception.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deepstack_operator import act, names
from deepstack_operator.decide import Decision, decide, open_gates
from deepstack_operator.desired import DesiredState, desired_state
from deepstack_operator.kube import KubeApi, Manifest
from deepstack_operator.observe import observe, scrape
from deepstack_operator.scaling import Recommendation
from deepstack_operator.status import Problem, assemble
from deepstack_runtime.config import ConfigError

log = logging.getLogger(__name__)

# Looking again for a missing Secret/PVC/ServiceAccount: often enough to notice it soon,
# seldom enough never to be a hot loop.
RECHECK_MISSING_SECONDS = 5.0
# What the operator does not watch (pods), it looks at again this often while it waits on
# them: the last old router pod of a rollout to go, a language pod's transfer check.
RECHECK_PODS_SECONDS = 2.0
# autoscaling.policy Load: how often the pods' load is read.
LOAD_INTERVAL_SECONDS = 5.0


@dataclass
class Outcome:
    phase: str | None  # None: the resource is gone
    requeue_after: float | None = None
    ready: dict[str, int] = field(default_factory=dict)  # ready pods per role
    writes: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(
        self,
        kube: KubeApi,
        *,
        scraper: Callable[[Manifest], str | None] = scrape,
        clock: Callable[[], str] = _now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.scraper = scraper
        self.clock = clock
        self.monotonic = monotonic
        # autoscaling.policy Load: each resource's recent recommendations (scaling.py).
        self._scale_history: dict[tuple[str, str], list[Recommendation]] = {}
        # Each resource's last valid desired state: while its spec is invalid, what
        # exists still follows it (gates open, the status reports the live pods).
        self._last_valid: dict[tuple[str, str], DesiredState] = {}

    def reconcile(self, namespace: str, name: str) -> Outcome:
        key = (namespace, name)
        cr = self.kube.get_cr(namespace, name)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            self._scale_history.pop(key, None)
            self._last_valid.pop(key, None)
            return Outcome(phase=None)  # children go with it: they carry ownerReferences
        problems: list[Problem] = []
        state: DesiredState | None = None
        try:
            state = self._last_valid[key] = desired_state(cr)
        except ConfigError as e:
            problems.append(Problem("InvalidSpec", str(e)))
        # An invalid spec is not applied: what exists stays as the last valid one made it.
        known = state or self._last_valid.get(key)
        obs = observe(self.kube, cr, known, self.scraper)
        problems[:0] = [
            Problem(f"Missing{kind}", f"{kind} {ref!r} does not exist in namespace {namespace}")
            for kind, ref in obs.missing
        ]
        now = self.clock()
        decision = Decision()
        if state is not None:
            decision = decide(
                obs,
                state,
                history=self._scale_history.get(key, []),
                now=now,
                monotonic_now=self.monotonic(),
            )
        elif known is not None:
            decision.gates, decision.awaiting_check = open_gates(obs, known, now)
        acted = act.Acted(children=dict(obs.children))
        act.open_gates(self.kube, obs, decision, acted)
        if decision.scaled is not None:
            self.kube.post_event(cr, "Normal", "ScaledOnLoad", decision.scaled)
        act.apply_children(self.kube, obs, decision, acted)
        act.prune(self.kube, obs, decision, acted)  # nothing while the spec is invalid
        if state is not None and state.scaled_by_load:
            self._scale_history[key] = decision.scale_history
        else:
            self._scale_history.pop(key, None)

        problems += acted.problems
        status = assemble(
            cr=cr,
            state=known,
            problems=problems,
            children=acted.children,
            plan=decision.plan,
            pods=obs.pods,
            now=now,
        )
        if not act.write_status(self.kube, cr, status, acted):
            return Outcome(phase=None)
        outcome = Outcome(phase=status["phase"], writes=acted.writes)
        outcome.ready = {
            role: int(status[role]["readyReplicas"])
            for role in (*names.ROLES, names.ROUTER)
            if role in status
        }
        if problems:
            outcome.requeue_after = RECHECK_MISSING_SECONDS
        elif (decision.plan is not None and decision.plan.in_progress) or (decision.awaiting_check):
            outcome.requeue_after = RECHECK_PODS_SECONDS
        elif state is not None and state.scaled_by_load:
            outcome.requeue_after = LOAD_INTERVAL_SECONDS
        for write in outcome.writes:
            log.info("%s/%s: %s", namespace, name, write)
        return outcome
