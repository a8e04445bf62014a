"""Operator processes that die, restart, and run in pairs (kopf peering)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tests.support.cluster import REPO, Cluster, wait_for
from tests.support.crd import install_crd, minimal
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


def test_second_instance_stays_passive(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """Two operators watching one namespace, peered: only the higher priority one acts."""
    install_crd(cluster)
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
