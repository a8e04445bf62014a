"""The load-aware autoscaling planner (deepstack_operator.scaling)."""

from __future__ import annotations

import pytest

from deepstack_operator.scaling import (
    GroupBounds,
    Recommendation,
    ScalePolicy,
    plan_scale,
    recommend,
    requests_inflight,
    within_ratio,
)

POLICY = ScalePolicy(
    bounds={"encode": GroupBounds(1, 8, 2.0), "language": GroupBounds(1, 4, 8.0)},
    ratio_min=0.5,
    ratio_max=2.0,
    down_window_seconds=60,
)


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        ({}, {"encode": 1, "language": 1}),  # idle: the minimum
        ({"encode": 2, "language": 2}, {"encode": 1, "language": 1}),
        # Image load: the encoders scale, the language group is left alone.
        ({"encode": 4, "language": 3}, {"encode": 2, "language": 1}),
        # More encoders than 2 per language pod: the ratio adds a language pod.
        ({"encode": 6, "language": 3}, {"encode": 3, "language": 2}),
        # Text load: language scales; the ratio keeps at least one encoder per two.
        ({"encode": 0, "language": 32}, {"encode": 2, "language": 4}),
        # Beyond both maxima: the ratio lowers the encoders the language group can pair.
        ({"encode": 40, "language": 0}, {"encode": 8, "language": 4}),
    ],
)
def test_recommend(load: dict[str, float], expected: dict[str, int]) -> None:
    assert recommend(load, POLICY) == expected


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        ({"encode": 1, "language": 1}, {"encode": 1, "language": 1}),
        ({"encode": 5, "language": 1}, {"encode": 5, "language": 3}),
        ({"encode": 1, "language": 4}, {"encode": 2, "language": 4}),
        ({"encode": 8, "language": 1}, {"encode": 8, "language": 4}),
    ],
)
def test_within_ratio(replicas: dict[str, int], expected: dict[str, int]) -> None:
    got = within_ratio(replicas, POLICY)
    assert got == expected
    assert POLICY.ratio_min <= got["encode"] / got["language"] <= POLICY.ratio_max


def test_a_maximum_that_cannot_hold_the_ratio_lowers_the_other_side() -> None:
    tight = ScalePolicy(
        bounds={"encode": GroupBounds(1, 8, 1.0), "language": GroupBounds(1, 1, 8.0)},
        ratio_min=0.5, ratio_max=2.0, down_window_seconds=60,
    )  # fmt: skip
    assert recommend({"encode": 8}, tight) == {"encode": 2, "language": 1}


def test_up_at_once_down_only_after_the_window() -> None:
    current = {"encode": 1, "language": 1}
    busy = {"encode": 6.0, "language": 4.0}
    replicas, history = plan_scale(now=0, load=busy, current=current, history=[], policy=POLICY)
    assert replicas == {"encode": 3, "language": 2}  # up at once
    # The load is gone: nothing moves while a higher recommendation is in the window.
    for t in (10, 30, 60):
        replicas, history = plan_scale(
            now=t, load={}, current=replicas, history=history, policy=POLICY
        )
        assert replicas == {"encode": 3, "language": 2}, t
    replicas, history = plan_scale(now=61, load={}, current=replicas, history=history,
                                   policy=POLICY)  # fmt: skip
    assert replicas == {"encode": 1, "language": 1}
    assert [r.at for r in history] == [10, 30, 60, 61]


def test_a_restarted_operator_does_not_scale_down_at_once() -> None:
    """No history: the current size is the first recommendation of the window."""
    current = {"encode": 4, "language": 2}
    replicas, history = plan_scale(now=100, load={}, current=current, history=[], policy=POLICY)
    assert replicas == current
    assert history[0] == Recommendation(100, current)


def test_requests_inflight_from_a_pods_metrics() -> None:
    text = (
        "# HELP deepstack_requests_inflight Requests being served, by role.\n"
        "# TYPE deepstack_requests_inflight gauge\n"
        'deepstack_requests_inflight{role="encode"} 3.0\n'
        'deepstack_requests_queued{role="encode"} 2.0\n'
    )
    assert requests_inflight(text) == 3.0
    assert requests_inflight("") == 0.0
    assert requests_inflight("<html>") == 0.0
