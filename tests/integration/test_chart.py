"""The Helm chart: lint, offline schema validation, and a real install into the local
control plane, with RBAC and Pod Security enforced by the real API server."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from devkit.cluster import REPO, SIMULATED_PLACEMENT, Cluster, wait_for
from devkit.crd import install_crd, minimal
from tests.support.kubeconfig import token_kubeconfig
from tests.support.operator import OperatorProcess, condition, get_json, wait_for_status

CHART = REPO / "charts" / "deepstack-disagg"
FULL_VALUES = [
    "--set", "replicas=2",
    "--set", "monitoring.serviceMonitor.enabled=true",
    "--set", "monitoring.podMonitor.enabled=true",
    "--set", "monitoring.prometheusRule.enabled=true",
    "--set", "monitoring.release=kube-prometheus",
    "--set", "dashboards.grafanaOperator.enabled=true",
]  # fmt: skip
CRD_KINDS = {
    "ClusterKopfPeering",
    "KopfPeering",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "GrafanaDashboard",
}


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if args[0] in ("install", "upgrade"):
        # The operator pods these tests install go to the simulated nodes (the real node's
        # tests install the operator's image: tests/e2e).
        placement = {k: json.dumps(v) for k, v in SIMULATED_PLACEMENT.items()}
        args = (*args, *(f for k, v in placement.items() for f in ("--set-json", f"{k}={v}")))
    result = subprocess.run(
        [str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}")
    return result


def render(cluster: Cluster, *values: str) -> list[dict[str, Any]]:
    out = helm(cluster, "template", "dsd", str(CHART), "--namespace", "dsd-system", *values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_lint_strict(cluster: Cluster) -> None:
    result = helm(cluster, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    "values",
    [[], FULL_VALUES, ["--set", "watchNamespaces={team-a,team-b}"]],
    ids=["default", "full", "namespaced"],
)
def test_rendered_manifests_match_the_kubernetes_1_36_schemas(
    cluster: Cluster, values: list[str]
) -> None:
    docs = render(cluster, *values)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # not in the Kubernetes schemas; the API server checks them on install
        kubernetes_validate.validate(doc, "1.36.0", strict=True)


def test_full_values_render_every_optional_object(cluster: Cluster) -> None:
    kinds = sorted({d["kind"] for d in render(cluster, *FULL_VALUES)})
    assert kinds == sorted(
        ["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment",
         "GrafanaDashboard", "PodMonitor", "PrometheusRule", "Service", "ServiceAccount",
         "ServiceMonitor"]
    )  # fmt: skip
    monitors = [
        d
        for d in render(cluster, *FULL_VALUES)
        if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
    ]
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus" for m in monitors)
    dashboards = [d for d in render(cluster) if d["kind"] == "ConfigMap"]
    assert len(dashboards) == 3
    assert all(d["metadata"]["labels"]["grafana_dashboard"] == "1" for d in dashboards)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replica=2", "additional properties 'replica' not allowed"),
        ("replicas=0", "minimum: got 0, want 1"),
        ("image.pullPolicy=Sometimes", "value must be one of"),
        ("watchNamespaces={Bad_Name}", "does not match pattern"),
    ],
)
def test_bad_values_are_rejected_by_the_schema(cluster: Cluster, value: str, message: str) -> None:
    result = helm(cluster, "template", "dsd", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("name", ["deepstackdisaggregations.yaml", "kopf-peering.yaml"])
def test_chart_crds_are_byte_identical_to_the_source(name: str) -> None:
    assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes()


# --- installed ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[dict[str, str]]:
    namespace = f"dsd-system-{uuid.uuid4().hex[:5]}"
    name = "dsd"
    helm(
        cluster,
        "install",
        name,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "120s",
    )
    sa = f"{name}-deepstack-disagg"
    try:
        yield {
            "namespace": namespace,
            "name": name,
            "sa": sa,
            "user": f"system:serviceaccount:{namespace}:{sa}",
        }
    finally:
        helm(cluster, "uninstall", name, "--namespace", namespace, "--wait", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_operator_pod_becomes_ready(cluster: Cluster, release: dict[str, str]) -> None:
    deployment = get_json(
        cluster,
        "-n",
        release["namespace"],
        "get",
        "deployment",
        f"{release['name']}-deepstack-disagg",
    )
    assert deployment["status"]["readyReplicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def service_account_kubeconfig(cluster: Cluster, release: dict[str, str], path: Path) -> Path:
    """A kubeconfig that acts as the chart's ServiceAccount, as the operator pod would."""
    token = cluster.kubectl(
        "-n", release["namespace"], "create", "token", release["sa"]
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = token_kubeconfig(admin, token, release["sa"])
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_with_the_chart_rbac_reconciles_the_minimal_example(
    cluster: Cluster, release: dict[str, str], namespace: str, tmp_path: Path
) -> None:
    kubeconfig = service_account_kubeconfig(cluster, release, tmp_path / "sa.kubeconfig")
    as_sa = Cluster(kubeconfig=kubeconfig, bin=cluster.bin)
    with OperatorProcess(
        as_sa,
        "--peering",
        f"{release['name']}-deepstack-disagg",
        "--priority",
        "10",
        log=tmp_path / "op.log",
    ) as op:
        body = minimal()
        # Cluster-wide, the operator may read no Secret: a pull secret it cannot look up
        # is left to the pods (the simulated ones need none), never reported missing.
        body["spec"]["runtime"]["imagePullSecrets"] = [{"name": "regcred"}]
        cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(body))
        status = wait_for_status(
            cluster, namespace, "tiny-qwen3-vl-moe", phase="Ready", observedGeneration=1
        )
        assert condition(status, "Degraded")["status"] == "False"
        assert "Forbidden" not in op.logs()


CAN = [
    ("get", "deepstackdisaggregations.disagg.deepstack.dev"),
    ("watch", "deepstackdisaggregations.disagg.deepstack.dev"),
    ("patch", "deepstackdisaggregations.disagg.deepstack.dev/status"),
    ("create", "statefulsets.apps"),
    ("patch", "statefulsets.apps"),
    ("delete", "deployments.apps"),
    ("create", "services"),
    ("patch", "configmaps"),
    ("create", "poddisruptionbudgets.policy"),
    ("create", "networkpolicies.networking.k8s.io"),
    ("create", "horizontalpodautoscalers.autoscaling"),
    ("get", "persistentvolumeclaims"),
    ("list", "pods"),
    ("patch", "pods/status"),
    ("create", "events.events.k8s.io"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("patch", "clusterkopfpeerings.kopf.dev"),
]
CANNOT = [
    ("get", "secrets"),  # cluster-wide: no Secret anywhere (namespaced mode: its namespaces)
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "secrets"),
    ("patch", "deepstackdisaggregations.disagg.deepstack.dev"),
    ("delete", "deepstackdisaggregations.disagg.deepstack.dev"),
    ("create", "pods"),
    ("delete", "pods"),
    ("patch", "pods"),
    ("watch", "pods"),
    ("delete", "nodes"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ("*", "*"),
]


def can_i(cluster: Cluster, user: str, verb: str, resource: str, *where: str) -> bool:
    resource, _, subresource = resource.partition("/")
    sub = [f"--subresource={subresource}"] if subresource else []
    out = cluster.kubectl("auth", "can-i", verb, resource, *sub, "--as", user, *where, check=False)
    return out.stdout.strip() == "yes"


@pytest.mark.parametrize(("verb", "resource"), CAN, ids=[f"{v}-{r}" for v, r in CAN])
def test_rbac_allows_what_the_operator_needs(
    cluster: Cluster, release: dict[str, str], verb: str, resource: str
) -> None:
    assert can_i(cluster, release["user"], verb, resource, "-n", "default")


@pytest.mark.parametrize(("verb", "resource"), CANNOT, ids=[f"{v}-{r}" for v, r in CANNOT])
def test_rbac_refuses_what_it_does_not_need(
    cluster: Cluster, release: dict[str, str], verb: str, resource: str
) -> None:
    assert not can_i(cluster, release["user"], verb, resource, "-n", "default")


def test_namespaced_mode_is_confined_to_its_namespaces(cluster: Cluster, namespace: str) -> None:
    system = f"dsd-ns-{uuid.uuid4().hex[:5]}"
    other = f"other-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", other)
    helm(cluster, "install", "scoped", str(CHART), "--namespace", system, "--create-namespace",
         "--set", f"watchNamespaces={{{namespace}}}", "--wait", "--timeout", "120s")  # fmt: skip
    user = f"system:serviceaccount:{system}:scoped-deepstack-disagg"
    try:
        assert can_i(cluster, user, "create", "statefulsets.apps", "-n", namespace)
        assert can_i(cluster, user, "patch", "kopfpeerings.kopf.dev", "-n", namespace)
        assert not can_i(cluster, user, "create", "statefulsets.apps", "-n", other)
        assert not can_i(cluster, user, "get", "secrets", "-n", other)
        assert can_i(cluster, user, "get", "secrets", "-n", namespace)
        assert not can_i(cluster, user, "list", "secrets", "-n", namespace)
        assert not can_i(
            cluster,
            user,
            "list",
            "deepstackdisaggregations.disagg.deepstack.dev",
            "--all-namespaces",
        )
        assert get_json(cluster, "-n", namespace, "get", "kopfpeering", "scoped-deepstack-disagg")
    finally:
        helm(cluster, "uninstall", "scoped", "--namespace", system, "--wait", check=False)
        for ns in (system, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_upgrade_then_uninstall_leaves_only_the_crds(cluster: Cluster) -> None:
    system = f"dsd-up-{uuid.uuid4().hex[:5]}"
    helm(
        cluster,
        "install",
        "up",
        str(CHART),
        "--namespace",
        system,
        "--create-namespace",
        "--wait",
        "--timeout",
        "120s",
    )
    helm(
        cluster,
        "upgrade",
        "up",
        str(CHART),
        "--namespace",
        system,
        *FULL_VALUES[:2],
        "--set",
        "metricsPort=9091",
        "--wait",
        "--timeout",
        "120s",
    )
    deployment = get_json(cluster, "-n", system, "get", "deployment", "up-deepstack-disagg")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    helm(cluster, "uninstall", "up", "--namespace", system, "--wait")
    left = cluster.kubectl(
        "get",
        "all,configmaps,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,clusterkopfpeerings",
        "-A",
        "-l",
        "app.kubernetes.io/instance=up",
        "-o",
        "name",
    ).stdout.split()
    assert left == []
    assert (
        cluster.kubectl("get", "crd", "deepstackdisaggregations.disagg.deepstack.dev").returncode
        == 0
    )
    cluster.kubectl("delete", "namespace", system, "--wait=false", check=False)


# --- Pod Security -----------------------------------------------------------------------


def test_tcp_runtime_pods_are_admitted_under_the_restricted_level(
    cluster: Cluster, tmp_path: Path
) -> None:
    install_crd(cluster)
    restricted = f"restricted-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", restricted)
    cluster.kubectl(
        "label", "namespace", restricted, "pod-security.kubernetes.io/enforce=restricted"
    )
    try:
        with OperatorProcess(
            cluster, "--standalone", "--namespace", restricted, log=tmp_path / "op.log"
        ):
            tcp = minimal()
            cluster.kubectl("-n", restricted, "apply", "-f", "-", stdin=json.dumps(tcp))
            wait_for_status(
                cluster, restricted, "tiny-qwen3-vl-moe", phase="Ready", observedGeneration=1
            )
            # The same runtime with RDMA: its encode and language pods need IPC_LOCK, which
            # "restricted" refuses; the router moves no embeddings and is admitted.
            rdma = minimal()
            rdma["metadata"]["name"] = "rdma"
            rdma["spec"]["runtime"]["backend"] = "sglang"
            rdma["spec"]["transfer"].update({"protocol": "rdma", "rdmaDevices": ["auto"]})
            cluster.kubectl("-n", restricted, "apply", "-f", "-", stdin=json.dumps(rdma))

            def refused() -> bool:
                events = get_json(cluster, "-n", restricted, "get", "events")["items"]
                return any(
                    e.get("reason") == "FailedCreate"
                    and "violates PodSecurity" in e.get("message", "")
                    for e in events
                )

            wait_for(refused, timeout=60, what="the RDMA pods to be refused by Pod Security")
            pods = get_json(
                cluster, "-n", restricted, "get", "pods", "-l", "disagg.deepstack.dev/instance=rdma"
            )
            roles = {p["metadata"]["labels"]["disagg.deepstack.dev/role"] for p in pods["items"]}
            assert roles <= {"router"}, roles
    finally:
        cluster.kubectl("delete", "namespace", restricted, "--wait=false", check=False)
