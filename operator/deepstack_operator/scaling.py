"""Load-aware autoscaling of the encode and language groups (`autoscaling.policy: Load`).

An HPA scales each group alone, on CPU. Here both groups are sized together from their
own load, read from the pods' /metrics: requests in flight per group
(`deepstack_requests_inflight`; for encode pods that is the vision tower's queue, so
image load moves the encoders and text load does not). Each group gets
ceil(load / targetRequestsPerPod) pods within its min/max; then the encode:language ratio
is kept within `autoscaling.ratio` by adding pods to the smaller side (never by taking
load-driven pods away, unless a maximum leaves no other way). Scaling up is immediate;
scaling down waits until every recommendation of the last `scaleDownStabilizationSeconds`
was lower (as the HPA's stabilization window does).

`plan_scale` is pure and table-tested; reconcile.py reads the metrics and applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

ENCODE, LANGUAGE = "encode", "language"


@dataclass(frozen=True)
class GroupBounds:
    minimum: int
    maximum: int
    target_per_pod: float  # requests in flight one pod should carry


@dataclass(frozen=True)
class ScalePolicy:
    bounds: dict[str, GroupBounds]  # encode and language (a fixed group: min == max)
    ratio_min: float  # encode pods per language pod
    ratio_max: float
    down_window_seconds: float


@dataclass(frozen=True)
class Recommendation:
    at: float  # monotonic seconds
    replicas: dict[str, int]


def _clamp(value: int, bounds: GroupBounds) -> int:
    return max(bounds.minimum, min(bounds.maximum, value))


def within_ratio(replicas: dict[str, int], policy: ScalePolicy) -> dict[str, int]:
    """`replicas` with encode/language brought inside [ratio_min, ratio_max], raising the
    smaller side where its maximum allows, else lowering the larger one."""
    e, lang = replicas[ENCODE], replicas[LANGUAGE]
    be, bl = policy.bounds[ENCODE], policy.bounds[LANGUAGE]
    if be.maximum == 0 or bl.maximum == 0:
        return {ENCODE: e, LANGUAGE: lang}  # a group held at zero: no ratio to keep
    if e > policy.ratio_max * lang:
        lang = _clamp(max(lang, math.ceil(e / policy.ratio_max)), bl)
        if e > policy.ratio_max * lang:
            e = _clamp(math.floor(policy.ratio_max * lang), be)
    if e < policy.ratio_min * lang:
        e = _clamp(max(e, math.ceil(policy.ratio_min * lang)), be)
        if e < policy.ratio_min * lang:
            lang = _clamp(math.floor(e / policy.ratio_min), bl)
    return {ENCODE: e, LANGUAGE: lang}


def recommend(load: dict[str, float], policy: ScalePolicy) -> dict[str, int]:
    """What the load alone asks for, within each group's bounds and the ratio."""
    raw = {
        role: _clamp(math.ceil(load.get(role, 0.0) / bounds.target_per_pod), bounds)
        for role, bounds in policy.bounds.items()
    }
    return within_ratio(raw, policy)


def plan_scale(
    *,
    now: float,
    load: dict[str, float],
    current: dict[str, int],
    history: list[Recommendation],
    policy: ScalePolicy,
) -> tuple[dict[str, int], list[Recommendation]]:
    """(replicas to apply, the history to keep for next time).

    When nothing recent is remembered (the first time a resource is seen, or after a
    pause longer than the window) the current size counts as a recommendation, so that
    a restarted operator never scales down at once."""
    kept = [r for r in history if now - r.at <= policy.down_window_seconds]
    if not kept:
        kept = [Recommendation(now, dict(current))]
    kept.append(Recommendation(now, recommend(load, policy)))
    highest = {
        role: _clamp(max(r.replicas[role] for r in kept), policy.bounds[role])
        for role in (ENCODE, LANGUAGE)
    }
    return within_ratio(highest, policy), kept


def requests_inflight(metrics_text: str) -> float:
    """`deepstack_requests_inflight` from a runtime pod's /metrics (0 if absent)."""
    total = 0.0
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                # A value that is no count (NaN, infinite, negative) is not load.
                if sample.name == "deepstack_requests_inflight" and math.isfinite(sample.value):
                    total += max(sample.value, 0.0)
    except ValueError:
        return 0.0
    return total
