"""The local control plane from `make cluster` is a real, healthy Kubernetes API."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from devkit.cluster import REPO, SIMULATED_PLACEMENT, Cluster, wait_for
from tests.support.node import NODE_NAME, PAUSE_IMAGE, STATE, kill_node_processes


def pinned() -> dict[str, str]:
    values = {}
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def test_readyz_is_ok(cluster: Cluster) -> None:
    out = cluster.kubectl("get", "--raw", "/readyz?verbose").stdout
    assert "readyz check passed" in out
    assert "[+]etcd ok" in out


def test_server_reports_pinned_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == pinned()["KUBE_VERSION"]


def test_at_least_two_nodes_ready(cluster: Cluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    ready = [
        n["metadata"]["name"]
        for n in nodes
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
    ]
    assert len(ready) >= 2, f"ready nodes: {ready}"


def test_controllers_and_scheduler_run_pods(cluster: Cluster, namespace: str) -> None:
    """A Deployment's pods are created by kube-controller-manager, bound by
    kube-scheduler and marked Running by kwok: the whole control plane works."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "probe"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "probe"}},
            "template": {
                "metadata": {"labels": {"app": "probe"}},
                "spec": {
                    **SIMULATED_PLACEMENT,
                    "containers": [{"name": "probe", "image": "busybox:1.36"}],
                },
            },
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(deployment))
    cluster.kubectl("-n", namespace, "rollout", "status", "deployment/probe", "--timeout=120s")
    pods = json.loads(cluster.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)
    assert len(pods["items"]) == 2
    assert all(p["spec"].get("nodeName") for p in pods["items"])
    assert all(p["status"]["phase"] == "Running" for p in pods["items"])


def test_binaries_print_pinned_versions(cluster: Cluster) -> None:
    versions = pinned()
    for tool in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        out = subprocess.run(
            [str(cluster.bin / tool), "--version"], capture_output=True, text=True, check=True
        ).stdout
        assert versions["KUBE_VERSION"] in out, (tool, out)
    etcd = subprocess.run(
        [str(cluster.bin / "etcd"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert versions["ETCD_VERSION"].lstrip("v") in etcd
    helm = subprocess.run(
        [str(cluster.bin / "helm"), "version", "--short"], capture_output=True, text=True
    )
    assert helm.returncode == 0, helm.stderr
    kubectl = cluster.kubectl("version", "--client", "-o", "json").stdout
    assert json.loads(kubectl)["clientVersion"]["gitVersion"] == versions["KUBE_VERSION"]


def test_a_real_node_killed_rather_than_stopped_comes_back_with_the_next_up(
    cluster: Cluster, namespace: str
) -> None:
    """`hack/cluster.sh up` after the node's processes were killed (pid files, mounts and
    iptables rules left behind) and against a control plane that has never seen the node,
    as on a machine restored from a snapshot taken while a cluster ran: the node comes back
    and runs a pod. CI once found pids of dead processes and a kube-router that started
    before its node was registered."""
    assert kill_node_processes(), "the real node was not running"
    wait_for(
        lambda: (
            not any(
                Path(f"/proc/{pid}").exists()
                for pid in (int(p.read_text()) for p in STATE.glob("*.pid"))
            )
        ),
        timeout=30,
        what="the node's processes to be gone",
    )
    cluster.kubectl("delete", "node", NODE_NAME, "--wait=true")
    up = subprocess.run(
        [str(REPO / "hack" / "cluster.sh"), "up"], capture_output=True, text=True, timeout=600
    )
    assert up.returncode == 0, up.stderr[-3000:]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "after-restart"},
        "spec": {
            "nodeSelector": {"deepstack.dev/node": "real"},
            "automountServiceAccountToken": False,
            "containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(pod))
    cluster.kubectl(
        "-n", namespace, "wait", "pod/after-restart", "--for=condition=Ready", "--timeout=120s"
    )
