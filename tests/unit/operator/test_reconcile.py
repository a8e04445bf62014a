"""Reconcile scenarios against a fake at the Kube seam (tests/support/fake_kube.py): each
step of a paired rollout, the HPA hand-over, a contract change mid-rollout, pruning,
Degraded on a missing reference and on a refused apply, and convergence of any sequence
of spec changes. The real API server's behaviour is tested in tests/integration."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from deepstack_operator import names
from deepstack_operator.desired import desired_state
from deepstack_operator.render import render_all
from devkit.specs import defaulted, example
from tests.support.fake_kube import (
    VERIFIED_METRICS,
    FakeKube,
    reconcile_until_stable,
    reconciler,
)

NS, NAME = "default", "tiny-qwen3-vl-moe"


def start(cr: dict[str, Any] | None = None) -> tuple[FakeKube, Any, dict[str, Any]]:
    kube = FakeKube()
    cr = cr or example("minimal-cpu")
    kube.put_cr(cr)
    return kube, reconciler(kube), cr


def status(kube: FakeKube) -> dict[str, Any]:
    return dict(kube.objects[(names.KIND, NS, NAME)]["status"])


def condition(kube: FakeKube, kind: str) -> dict[str, Any]:
    (found,) = [c for c in status(kube)["conditions"] if c["type"] == kind]
    return dict(found)


def revisions(kube: FakeKube) -> set[str]:
    return {s["metadata"]["labels"][names.REVISION_LABEL] for s in kube.workloads().values()}


def test_a_new_resource_becomes_ready_through_its_transfer_gate() -> None:
    kube, rec, _ = start()
    reconcile_until_stable(kube, rec, NS, NAME)
    assert status(kube)["phase"] == "Ready"
    assert status(kube)["language"]["transferVerified"] == 1
    assert len(kube.workloads()) == 2
    assert len(kube.workloads("Deployment")) == 1
    gates = [w for w in kube.writes if w.startswith("condition Pod/")]
    assert gates == [f"condition Pod/{NAME}-language-{status(kube)['revision']}-0"]
    before = len(kube.writes)
    rec.reconcile(NS, NAME)  # nothing changed: nothing written
    assert len(kube.writes) == before


def test_a_paired_rollout_step_by_step() -> None:
    kube, rec, cr = start()
    reconcile_until_stable(kube, rec, NS, NAME)
    old = status(kube)["revision"]
    cr = changed(cr, ("image", "next"))
    kube.put_cr(cr)

    first = rec.reconcile(NS, NAME)  # the new pair beside the old one; nothing deleted
    new = kube.objects[(names.KIND, NS, NAME)]["status"]["revision"]
    assert new != old
    assert revisions(kube) == {old, new}
    assert not any(w.startswith("deleted") for w in first.writes)
    assert status(kube)["phase"] == "Progressing"
    assert condition(kube, "Progressing")["reason"] == "PairedRollout"
    assert first.requeue_after is not None

    kube.settle()  # the new pods start; the router rolls to the new contract
    rec.reconcile(NS, NAME)  # gates open
    kube.settle()
    done = rec.reconcile(NS, NAME)  # new pair ready, router settled: the old pair goes
    assert f"deleted StatefulSet/{NAME}-encode-{old}" in done.writes
    assert f"deleted ConfigMap/{NAME}-runtime-{old}" in done.writes
    reconcile_until_stable(kube, rec, NS, NAME)
    assert revisions(kube) == {new}
    assert status(kube)["phase"] == "Ready"


def test_a_new_revision_that_never_turns_ready_keeps_the_old_one() -> None:
    kube, rec, cr = start()
    reconcile_until_stable(kube, rec, NS, NAME)
    old = status(kube)["revision"]
    cr = changed(cr, ("image", "broken"))
    kube.put_cr(cr)
    rec.scraper = lambda pod: ""  # the new language pods never verify a transfer
    for _ in range(5):
        rec.reconcile(NS, NAME)
        kube.settle()
    assert old in revisions(kube)
    assert len(revisions(kube)) == 2
    assert status(kube)["phase"] == "Progressing"


def test_hpa_hand_over_keeps_the_count_and_renders_an_autoscaler() -> None:
    kube, rec, cr = start()
    cr = copy.deepcopy(cr)
    cr["spec"]["language"]["replicas"] = 2
    kube.put_cr(cr)
    reconcile_until_stable(kube, rec, NS, NAME)
    cr["spec"]["autoscaling"] = {"language": {"minReplicas": 1, "maxReplicas": 4}}
    kube.put_cr(defaulted(cr))
    reconcile_until_stable(kube, rec, NS, NAME)
    (hpa,) = kube.workloads("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["maxReplicas"] == 4
    (language,) = [s for n, s in kube.workloads().items() if "-language-" in n]
    assert language["spec"]["replicas"] == 2  # not dropped to 1 when the HPA took over
    kube.scale(language["metadata"]["name"], 3)  # the HPA scales it
    reconcile_until_stable(kube, rec, NS, NAME)
    (language,) = [s for n, s in kube.workloads().items() if "-language-" in n]
    assert language["spec"]["replicas"] == 3
    assert status(kube)["language"]["summary"] == "3/3"


def test_load_scaling_grows_both_groups_and_reports_them_ready() -> None:
    """autoscaling.policy Load: the pods' requests in flight size the groups, and the
    status counts the scaled size as desired (not the spec's replicas)."""
    kube, rec, cr = start()
    reconcile_until_stable(kube, rec, NS, NAME)
    cr = copy.deepcopy(cr)
    cr["spec"]["autoscaling"] = {
        "policy": "Load",
        "encode": {"minReplicas": 1, "maxReplicas": 2, "targetRequestsPerPod": 1},
        "language": {"minReplicas": 1, "maxReplicas": 2, "targetRequestsPerPod": 64},
        "ratio": {"min": 0.5, "max": 1},
    }
    kube.put_cr(defaulted(cr))
    busy = VERIFIED_METRICS + "deepstack_requests_inflight 4.0\n"
    rec.scraper = lambda pod: busy
    for _ in range(6):
        rec.reconcile(NS, NAME)
        kube.settle()
    assert {n.split("-")[-2]: s["spec"]["replicas"] for n, s in kube.workloads().items()} == {
        "encode": 2,
        "language": 2,
    }
    assert status(kube)["phase"] == "Ready"
    assert status(kube)["encode"]["summary"] == "2/2"
    assert any(e[1] == "ScaledOnLoad" for e in kube.events)


def test_a_contract_change_mid_rollout_ends_on_the_latest_revision_alone() -> None:
    kube, rec, cr = start()
    reconcile_until_stable(kube, rec, NS, NAME)
    cr = changed(cr, ("image", "next"))
    kube.put_cr(cr)
    rec.reconcile(NS, NAME)  # a rollout starts
    cr["spec"]["deepstack"]["dtype"] = "float16"  # a new contract before it ends
    kube.put_cr(cr)
    rec.reconcile(NS, NAME)
    assert len(revisions(kube)) == 3  # nothing torn down while nothing new is ready
    reconcile_until_stable(kube, rec, NS, NAME)
    assert revisions(kube) == {status(kube)["revision"]}
    assert condition(kube, "Compatible")["status"] == "True"
    assert len(kube.workloads("ConfigMap")) == 1


def test_a_disabled_router_is_pruned() -> None:
    kube, rec, cr = start()
    reconcile_until_stable(kube, rec, NS, NAME)
    cr = copy.deepcopy(cr)
    cr["spec"]["router"]["enabled"] = False
    kube.put_cr(cr)
    reconcile_until_stable(kube, rec, NS, NAME)
    assert kube.workloads("Deployment") == {}
    assert f"{NAME}-router" not in kube.workloads("Service")
    assert "router" not in status(kube)
    assert "url" not in status(kube)


def test_a_missing_reference_is_degraded_until_it_exists() -> None:
    cr = example("minimal-cpu")
    cr["spec"]["router"]["apiKeySecret"] = {"name": "keys", "key": "api-keys"}
    kube, rec, _ = start(cr)
    outcome = rec.reconcile(NS, NAME)
    assert status(kube)["phase"] == "Degraded"
    assert condition(kube, "Degraded")["reason"] == "MissingSecret"
    assert outcome.requeue_after is not None
    assert ("Warning", "MissingSecret", "Secret 'keys' does not exist in namespace default") in (
        kube.events
    )
    kube.existing.add(("Secret", "keys"))
    reconcile_until_stable(kube, rec, NS, NAME)
    assert status(kube)["phase"] == "Ready"
    assert any(e[1] == "Recovered" for e in kube.events)


def test_a_refused_apply_is_degraded_and_the_next_reconcile_recovers() -> None:
    kube, rec, _ = start()
    kube.fail_apply[("Service", f"{NAME}-router")] = 409
    rec.reconcile(NS, NAME)
    assert condition(kube, "Degraded")["reason"] == "ApplyFailed"
    assert "409" in condition(kube, "Degraded")["message"]
    reconcile_until_stable(kube, rec, NS, NAME)
    assert status(kube)["phase"] == "Ready"
    assert f"{NAME}-router" in kube.workloads("Service")


def test_an_invalid_spec_leaves_what_exists() -> None:
    kube, rec, cr = start()
    reconcile_until_stable(kube, rec, NS, NAME)
    before = copy.deepcopy(kube.workloads())
    cr = copy.deepcopy(cr)
    cr["spec"]["transfer"]["defaultAllocationTokens"] = 17  # not a multiple of blockTokens
    kube.put_cr(cr)
    reported = status(kube)
    rec.reconcile(NS, NAME)
    assert condition(kube, "Degraded")["reason"] == "InvalidSpec"
    assert kube.workloads() == before
    for kept in ("url", "router", "revision", "contract", "encode", "language"):
        assert status(kube)[kept] == reported[kept]
    # A language pod that restarts meanwhile still has its transfer gate opened.
    (pod,) = [n for n in kube.pods() if "-language-" in n]
    del kube.objects[("Pod", NS, pod)]
    kube.settle()
    rec.reconcile(NS, NAME)
    kube.settle()
    assert kube.pods()[pod]["status"]["conditions"][-1] == {"type": "Ready", "status": "True"}


CHANGES = st.sampled_from(
    [
        ("image", "a"),
        ("image", "b"),
        ("dtype", "float16"),
        ("dtype", "bfloat16"),
        ("language", 2),
        ("language", 1),
        ("encode", 0),
        ("encode", 1),
        ("router", False),
        ("router", True),
        ("hpa", True),
        ("hpa", False),
    ]
)


def changed(cr: dict[str, Any], change: tuple[str, Any]) -> dict[str, Any]:
    cr = copy.deepcopy(cr)
    what, value = change
    spec = cr["spec"]
    if what == "image":
        spec["runtime"]["image"] = f"deepstack-runtime:{value}"
    elif what == "dtype":
        spec["deepstack"]["dtype"] = value
    elif what in ("language", "encode"):
        spec[what]["replicas"] = value
    elif what == "router":
        spec["router"]["enabled"] = value
    elif value:
        spec["autoscaling"] = {"language": {"minReplicas": 1, "maxReplicas": 3}}
    else:
        spec.pop("autoscaling", None)
    return defaulted(cr)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(CHANGES, st.integers(0, 2)), min_size=1, max_size=5))
def test_any_sequence_of_changes_converges_without_orphans(
    steps: list[tuple[tuple[str, Any], int]],
) -> None:
    """Changes land between reconciles at any point (`partial` reconciles in between);
    in the end the system is stable (no write, no requeue), only the latest revision
    lives, and every object is one the latest spec renders."""
    kube, rec, cr = start()
    for change, partial in steps:
        cr = changed(cr, change)
        kube.put_cr(cr)
        for _ in range(partial):
            rec.reconcile(NS, NAME)
            kube.settle()
    reconcile_until_stable(kube, rec, NS, NAME, limit=40)
    final = status(kube)
    assert revisions(kube) == {final["revision"]}
    wanted = {(c["kind"], c["metadata"]["name"]) for c in render_all(desired_state(cr))}
    owned = {(k, n) for (k, _, n) in kube.objects if k not in (names.KIND, "Pod")}
    assert owned == wanted
    assert final["phase"] in ("Ready", "Pending")  # Pending: encode held at zero
