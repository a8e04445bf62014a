"""The paired-rollout planner, step by step (deepstack_operator.rollout)."""

from __future__ import annotations

import pytest

from deepstack_operator.rollout import LiveGroup, RolloutPlan, plan_rollout

E, L = "encode", "language"


def live(revision: str, encode: tuple[int, int], language: tuple[int, int]) -> list[LiveGroup]:
    """Both groups of one revision: (replicas, ready) each."""
    return [
        LiveGroup(E, revision, f"x-encode-{revision}", *encode),
        LiveGroup(L, revision, f"x-language-{revision}", *language),
    ]


def names(revision: str) -> tuple[str, str]:
    return (f"x-encode-{revision}", f"x-language-{revision}")


CASES = [
    # (case, target revision, live, router settled, plan)
    (
        "first creation: the target alone",
        "new",
        [],
        False,
        RolloutPlan({E: 1, L: 2}),
    ),
    (
        "steady state: nothing old",
        "new",
        live("new", (1, 1), (2, 2)),
        True,
        RolloutPlan({E: 1, L: 2}),
    ),
    (
        "a new revision appears: the old pair keeps serving, untouched",
        "new",
        live("old", (1, 1), (2, 2)),
        True,
        RolloutPlan({E: 1, L: 2}, names("old"), {"old": "encode 1/1, language 2/2"}),
    ),
    (
        "new pair partly ready: the old stays",
        "new",
        live("old", (1, 1), (2, 2)) + live("new", (1, 1), (2, 1)),
        False,
        RolloutPlan({E: 1, L: 2}, names("old"), {"old": "encode 1/1, language 2/2"}),
    ),
    (
        "new pair ready but the router has not rolled: old routers still need the old pair",
        "new",
        live("old", (1, 1), (2, 2)) + live("new", (1, 1), (2, 2)),
        False,
        RolloutPlan({E: 1, L: 2}, names("old"), {"old": "encode 1/1, language 2/2"}),
    ),
    (
        "new pair ready and the router rolled: the old pair goes",
        "new",
        live("old", (1, 1), (2, 2)) + live("new", (1, 1), (2, 2)),
        True,
        RolloutPlan({E: 1, L: 2}),
    ),
    (
        "an old revision briefly unready is kept: the new one is not ready either",
        "new",
        live("old", (1, 0), (2, 0)) + live("new", (1, 0), (2, 0)),
        False,
        RolloutPlan({E: 1, L: 2}, names("old"), {"old": "encode 0/1, language 0/2"}),
    ),
    (
        "a change during a change: both older revisions stay until the newest is ready",
        "c",
        live("a", (1, 1), (2, 2)) + live("b", (1, 0), (2, 0)) + live("c", (1, 0), (2, 0)),
        True,
        RolloutPlan(
            {E: 1, L: 2},
            tuple(sorted((*names("a"), *names("b")))),
            {"a": "encode 1/1, language 2/2", "b": "encode 0/1, language 0/2"},
        ),
    ),
    (
        "... and all go once it is",
        "c",
        live("a", (1, 1), (2, 2)) + live("b", (1, 0), (2, 0)) + live("c", (1, 1), (2, 2)),
        True,
        RolloutPlan({E: 1, L: 2}),
    ),
    (
        "a partly serving old revision is kept whole",
        "new",
        live("old", (1, 0), (2, 1)) + live("new", (1, 1), (2, 0)),
        True,
        RolloutPlan({E: 1, L: 2}, names("old"), {"old": "encode 0/1, language 1/2"}),
    ),
    (
        "a revert: the old revision is the target again and is ready; the other goes",
        "a",
        live("a", (1, 1), (2, 2)) + live("b", (1, 1), (2, 2)),
        True,
        RolloutPlan({E: 1, L: 2}),
    ),
]


@pytest.mark.parametrize(
    ("target", "live_groups", "router_settled", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(
    target: str, live_groups: list[LiveGroup], router_settled: bool, expected: RolloutPlan
) -> None:
    plan = plan_rollout(
        target=target,
        desired={E: 1, L: 2},
        autoscaled=frozenset(),
        live=live_groups,
        router_settled=router_settled,
    )
    assert plan == expected
    assert plan.in_progress == bool(expected.old_revisions)


def test_an_autoscaled_group_starts_its_new_revision_where_the_old_one_was() -> None:
    """A rollout never shrinks a group an autoscaler has grown; once the new StatefulSet
    exists its count is the autoscaler's again."""
    old = live("old", (5, 5), (2, 2))
    plan = plan_rollout(
        target="new", desired={E: 1, L: 2}, autoscaled=frozenset({E}), live=old,
        router_settled=True,
    )  # fmt: skip
    assert plan.target_replicas == {E: 5, L: 2}
    plan = plan_rollout(
        target="new", desired={E: 1, L: 2}, autoscaled=frozenset({E}),
        live=old + live("new", (5, 3), (2, 2)), router_settled=True,
    )  # fmt: skip
    assert plan.target_replicas == {E: None, L: 2}
    assert plan.keep == names("old")  # 3 of 5 encoders ready: not yet
    plan = plan_rollout(
        target="new", desired={E: 1, L: 2}, autoscaled=frozenset({E}),
        live=old + live("new", (5, 5), (2, 2)), router_settled=True,
    )  # fmt: skip
    assert plan.keep == ()


def test_a_group_scaled_to_zero_does_not_hold_a_rollout() -> None:
    plan = plan_rollout(
        target="new", desired={E: 1, L: 0}, autoscaled=frozenset(),
        live=live("old", (1, 1), (1, 1)) + live("new", (1, 1), (0, 0)), router_settled=True,
    )  # fmt: skip
    assert plan == RolloutPlan({E: 1, L: 0})
