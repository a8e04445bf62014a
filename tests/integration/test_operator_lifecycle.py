"""Operator processes that die, restart, and run in pairs (kopf peering)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from devkit.cluster import REPO, Cluster, wait_for
from devkit.crd import install_crd, minimal
from devkit.metrics import sample
from tests.support.operator import OperatorProcess, get_json, wait_for_status

NAME = "tiny-qwen3-vl-moe"


def test_killed_mid_reconcile_then_restarted_converges(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    install_crd(cluster)
    body = minimal()
    body["spec"]["encode"]["replicas"] = 3
    with OperatorProcess(cluster, "--standalone", log=tmp_path / "first.log") as first:
        cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(body))
        # Kill it as soon as it has begun writing children, before it could finish.
        wait_for(
            lambda: cluster.kubectl(
                "-n",
                namespace,
                "get",
                "configmap",
                "-o",
                "name",
                "-l",
                f"disagg.deepstack.dev/instance={NAME}",
            ).stdout.strip(),
            timeout=60,
            interval=0.02,  # soon enough that the kill lands before it is all done
            what="the first child",
        )
        first.kill()
    status = get_json(cluster, "-n", namespace, "get", "dsd", NAME).get("status") or {}
    assert status.get("phase") != "Ready" or status.get("encode", {}).get("readyReplicas") != 3
    with OperatorProcess(cluster, "--standalone", log=tmp_path / "second.log") as second:
        status = wait_for_status(cluster, namespace, NAME, phase="Ready", observedGeneration=1)
        assert status["encode"]["readyReplicas"] == 3
        assert "Traceback" not in second.logs()


def make_peering(cluster: Cluster, namespace: str) -> str:
    """A KopfPeering in `namespace` (as the chart makes one per watched namespace)."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "kopf-peering.yaml"))
    peering = f"peering-{uuid.uuid4().hex[:6]}"
    cluster.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "kopf.dev/v1",
                "kind": "KopfPeering",
                "metadata": {"name": peering, "namespace": namespace},
            }
        ),
    )
    return peering


def test_second_instance_stays_passive(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """Two operators watching one namespace, peered: only the higher priority one acts."""
    install_crd(cluster)
    peering = make_peering(cluster, namespace)
    common = ("--namespace", namespace, "--peering", peering)
    with (
        OperatorProcess(
            cluster, *common, "--priority", "200", log=tmp_path / "active.log"
        ) as active,
        OperatorProcess(
            cluster, *common, "--priority", "100", log=tmp_path / "passive.log"
        ) as passive,
    ):
        # Both have registered with the peering object before any work arrives. (kopf
        # starts paused and resumes only when no peer has a higher priority.)
        def registered() -> bool:
            obj = get_json(cluster, "-n", namespace, "get", "kopfpeering", peering)
            return len(obj.get("status") or {}) == 2

        wait_for(registered, timeout=60, what="both operators in the peering object")
        cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(minimal()))
        wait_for_status(cluster, namespace, NAME, phase="Ready", observedGeneration=1)
        assert active.reconciles() > 0
        assert passive.reconciles() == 0
        assert passive.reconciles("requeue_after") == 0
        assert "Resuming operations" not in passive.logs()


def reconciles(operator: OperatorProcess) -> float:
    """Every reconcile the operator made, whatever its result."""
    return sum(operator.reconciles(result) for result in ("success", "error", "requeue_after"))


def writes(operator: OperatorProcess) -> float:
    text = operator.metrics()
    return sum(
        sample(text, "deepstack_operator_api_writes_total", operation=operation)
        for operation in ("created", "updated", "deleted", "status")
    )


def test_a_paused_standby_acts_on_nothing_until_the_active_one_is_gone(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """An operator that kopf peering pauses (another one with a higher priority joined)
    reconciles nothing, not even what its own requeue timers bring back, and so writes
    nothing and posts no event (events come from reconciles); when the active one dies,
    it takes over.

    The resource names a pull Secret that does not exist: whoever is active looks at it
    again every 5 s (reconcile.RECHECK_MISSING_SECONDS), from its requeue timer."""
    install_crd(cluster)
    peering = make_peering(cluster, namespace)
    common = ("--namespace", namespace, "--peering", peering)
    body = minimal()
    body["spec"]["runtime"]["imagePullSecrets"] = [{"name": "registry-login"}]
    with OperatorProcess(
        cluster, *common, "--priority", "100", log=tmp_path / "standby.log"
    ) as standby:
        cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(body))
        wait_for_status(cluster, namespace, NAME, phase="Degraded", observedGeneration=1)
        wait_for(
            lambda: standby.reconciles("requeue_after") >= 2,
            timeout=60,
            what="the first operator's requeue timers at work",
        )
        with OperatorProcess(
            cluster, *common, "--priority", "200", log=tmp_path / "active.log"
        ) as active:
            wait_for(
                lambda: "Pausing operations in favour of" in standby.log_path.read_text(),
                timeout=60,
                what="kopf pausing the first operator",
            )
            before = (reconciles(standby), writes(standby))
            wait_for(
                lambda: active.reconciles("requeue_after") >= 3,
                timeout=60,
                what="three reconciles of the active operator from its requeue timers",
            )
            # The Secret appears: the next reconcile writes the status (the active
            # operator's, from its timer: Secrets are not watched).
            cluster.kubectl(
                "-n", namespace, "create", "secret", "docker-registry", "registry-login",
                "--docker-server=registry.example.com", "--docker-username=u",
                "--docker-password=p",
            )  # fmt: skip
            wait_for_status(cluster, namespace, NAME, phase="Ready", observedGeneration=1)
            after = (reconciles(standby), writes(standby))
            # One reconcile may have been under way when kopf paused it; no more.
            assert after[0] - before[0] <= 1, (before, after)
            assert after[1] == before[1], (before, after)
            assert writes(active) > 0
            active.kill()  # no clean exit: its record in the peering object expires
        # The standby takes over once the dead one's record has expired (10 s here).
        taken_over = (reconciles(standby), writes(standby))
        patch = {"spec": {"encode": {"replicas": 2}}}
        cluster.kubectl("-n", namespace, "patch", "dsd", NAME, "--type=merge",
                        "-p", json.dumps(patch))  # fmt: skip
        status = wait_for_status(
            cluster, namespace, NAME, phase="Ready", observedGeneration=2, timeout=120
        )
        assert status["encode"]["readyReplicas"] == 2
        assert reconciles(standby) > taken_over[0]
        assert writes(standby) > taken_over[1]
        assert "Traceback" not in standby.log_path.read_text()
