"""Paired rollouts: how the encode and language groups move from one revision to the next
without a request ever meeting a mismatched pair, and without losing capacity.

A revision is what an encode pod and a language pod must share to work together: the
embedding contract (RuntimeConfig.contract) and the image. Each revision of a group is its
own StatefulSet, `<name>-<role>-<revision>`. Any other change (resources, env, probes'
timing, replicas) rolls in place inside the current revision's StatefulSets, under
`rollout.maxUnavailable`.

A change of revision is a surge of whole pairs:

  1. the new revision's encode and language StatefulSets are created at full size beside
     the old ones, which keep serving untouched;
  2. each router serves only pods of its own contract (a router of the new revision turns
     ready once it sees a pair of that contract), so traffic moves to the new pair as the
     router Deployment rolls;
  3. once every group of the new revision is ready at its desired size and the router has
     rolled, the old revisions are deleted (their pods drain as any deleted pod does).

A new revision that never becomes ready never takes the old one down: every older
revision stays, as it is, until the new one is complete (one that was itself never
finished included: telling a revision that never served from one that is only briefly
unready would need a memory the planner does not keep, and deleting the wrong one is an
outage).

`plan_rollout` decides each step from what is live; it is pure and table-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LiveGroup:
    """One live StatefulSet of a role."""

    role: str
    revision: str
    name: str
    replicas: int  # spec.replicas
    ready: int  # status.readyReplicas


@dataclass(frozen=True)
class RolloutPlan:
    # Replicas to apply to the target revision's StatefulSet of each role; None leaves the
    # count to its HorizontalPodAutoscaler.
    target_replicas: dict[str, int | None]
    # Names of the older StatefulSets to leave as they are (all others are deleted).
    keep: tuple[str, ...] = ()
    # Old revisions still serving while the new one comes up: {revision: "encode 1/1, ..."}.
    old_revisions: dict[str, str] = field(default_factory=dict)

    @property
    def in_progress(self) -> bool:
        return bool(self.old_revisions)


def plan_rollout(
    *,
    target: str,
    desired: dict[str, int],
    autoscaled: frozenset[str],
    live: list[LiveGroup],
    router_settled: bool,
) -> RolloutPlan:
    """The next step towards `target`.

    desired      replicas per role from the spec (for an autoscaled role: its minimum)
    autoscaled   the roles an autoscaler sizes: their target StatefulSet, once it exists,
                 keeps the autoscaler's count; a new one starts at the size the old
                 revision had reached, so that a rollout never shrinks a scaled-up group
    live         every StatefulSet of the resource, of any revision
    router_settled  the router Deployment has rolled (or there is none): old pairs must
                 outlive the last router that can only use them
    """
    roles = sorted(desired)
    current = {g.role: g for g in live if g.revision == target}
    older = [g for g in live if g.revision != target]

    target_replicas: dict[str, int | None] = {}
    for role in roles:
        if role in autoscaled and role in current:
            target_replicas[role] = None
        elif role in autoscaled:
            reached = [g.replicas for g in older if g.role == role]
            target_replicas[role] = max([desired[role], *reached])
        else:
            target_replicas[role] = desired[role]

    def size(role: str) -> int:
        wanted = target_replicas[role]
        return current[role].replicas if wanted is None else wanted

    complete = router_settled and all(
        role in current and current[role].ready >= size(role) for role in roles
    )
    if complete or not older:
        return RolloutPlan(target_replicas)

    # Keep every old revision, whole (its groups as they are).
    by_revision: dict[str, list[LiveGroup]] = {}
    for group in older:
        by_revision.setdefault(group.revision, []).append(group)
    keep: list[str] = []
    old_revisions: dict[str, str] = {}
    for revision, groups in sorted(by_revision.items()):
        keep += [g.name for g in groups]
        old_revisions[revision] = ", ".join(
            f"{g.role} {g.ready}/{g.replicas}" for g in sorted(groups, key=lambda g: g.role)
        )
    return RolloutPlan(target_replicas, tuple(sorted(keep)), old_revisions)
