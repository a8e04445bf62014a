"""The operator against the real control plane: one operator process for the module."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.cluster import Cluster, wait_for
from devkit.crd import install_crd, minimal
from devkit.metrics import sample
from tests.support.operator import (
    OperatorProcess,
    StatusRecorder,
    condition,
    config_map_name,
    dsd,
    get_json,
    group_name,
    wait_for_status,
)

NAME = "tiny-qwen3-vl-moe"


def children(cluster: Cluster, namespace: str) -> list[tuple[str, str]]:
    """(kind, name) of every child the operator makes for the minimal example."""
    return [
        ("configmap", config_map_name(cluster, namespace, NAME)),
        ("service", f"{NAME}-encode"),
        ("service", f"{NAME}-language"),
        ("service", f"{NAME}-router"),
        ("statefulset", group_name(cluster, namespace, NAME, "encode")),
        ("statefulset", group_name(cluster, namespace, NAME, "language")),
        ("deployment", f"{NAME}-router"),
        ("poddisruptionbudget", f"{NAME}-encode"),
        ("poddisruptionbudget", f"{NAME}-language"),
        ("networkpolicy", f"{NAME}-runtime-encode"),
        ("networkpolicy", f"{NAME}-runtime-language"),
    ]


def group(cluster: Cluster, namespace: str, role: str) -> dict[str, Any]:
    """The live StatefulSet of a pod group's current revision."""
    name = group_name(cluster, namespace, NAME, role)
    return get_json(cluster, "-n", namespace, "get", "statefulset", name)


def groups(cluster: Cluster, namespace: str) -> list[str]:
    """Names of every StatefulSet of the resource, of any revision."""
    found = get_json(
        cluster, "-n", namespace, "get", "statefulsets", "-l",
        f"disagg.deepstack.dev/instance={NAME}",
    )  # fmt: skip
    return sorted(s["metadata"]["name"] for s in found["items"])


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with OperatorProcess(cluster, "--standalone", log=log) as op:
        yield op


def apply(cluster: Cluster, namespace: str, body: dict[str, Any]) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(body))


def patch_spec(cluster: Cluster, namespace: str, patch: dict[str, Any]) -> None:
    """A merge patch of the resource, as `kubectl patch --type=merge` sends it."""
    cluster.kubectl("-n", namespace, "patch", "dsd", NAME, "--type=merge", "-p", json.dumps(patch))


def ready(cluster: Cluster, namespace: str, generation: int = 1) -> dict[str, Any]:
    return wait_for_status(cluster, namespace, NAME, phase="Ready", observedGeneration=generation)


def resource_versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    return {
        f"{kind}/{name}": get_json(cluster, "-n", namespace, "get", kind, name)["metadata"][
            "resourceVersion"
        ]
        for kind, name in children(cluster, namespace)
    }


def test_minimal_example_becomes_ready_with_every_child(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal())  # the first example, on the simulated nodes
    status = ready(cluster, namespace)
    assert status["encode"] == {
        "replicas": 1,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "summary": "1/1",
    }
    assert status["language"]["readyReplicas"] == 1
    assert status["url"] == f"http://{NAME}-router.{namespace}.svc:8000"
    assert condition(status, "Ready")["reason"] == "AllReplicasReady"
    # Simulated pods run no server and cannot transfer: nothing is claimed for them.
    assert condition(status, "TransferReady")["reason"] == "Unverified"
    assert status["language"]["transferVerified"] == 0
    uid = dsd(cluster, namespace, NAME)["metadata"]["uid"]
    for kind, name in children(cluster, namespace):
        child = get_json(cluster, "-n", namespace, "get", kind, name)
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid, (kind, name)
    sts = group(cluster, namespace, "encode")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["deepstack-runtime", "encode"]
    pods = get_json(
        cluster, "-n", namespace, "get", "pods", "-l", "disagg.deepstack.dev/instance=" + NAME
    )
    assert len(pods["items"]) == 3  # encode, language, router
    printed = cluster.kubectl("-n", namespace, "get", "dsd", NAME).stdout.splitlines()[1].split()
    assert printed[:4] == [NAME, "Ready", "1/1", "1/1"]
    # The contract: in the status, on every runtime pod, and one only.
    assert condition(status, "Compatible")["status"] == "True"
    for pod in pods["items"]:
        assert pod["metadata"]["labels"]["disagg.deepstack.dev/contract"] == status["contract"]


def test_status_follows_scaling_of_each_role(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    for role, replicas, generation in (("encode", 3, 2), ("language", 2, 3), ("encode", 1, 4)):
        patch_spec(cluster, namespace, {"spec": {role: {"replicas": replicas}}})
        status = ready(cluster, namespace, generation)
        assert status[role]["readyReplicas"] == replicas
        assert status[role]["summary"] == f"{replicas}/{replicas}"
        assert group(cluster, namespace, role)["spec"]["replicas"] == replicas
    # Scaled to zero: settled, not serving; the phase says what the conditions say.
    patch_spec(cluster, namespace, {"spec": {"language": {"replicas": 0}}})
    status = wait_for_status(cluster, namespace, NAME, phase="Pending", observedGeneration=5)
    assert condition(status, "Ready")["reason"] == "ScaledToZero"
    assert condition(status, "Progressing")["status"] == "False"


def test_enabling_autoscaling_hands_the_count_over_without_a_drop(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """3 encode replicas, then autoscaling on: the StatefulSet never goes below 3 (it
    would fall to 1 if the operator simply stopped applying the count)."""
    from kubernetes import client, watch

    body = minimal()
    body["spec"]["encode"]["replicas"] = 3
    apply(cluster, namespace, body)
    ready(cluster, namespace)
    apps: Any = client.AppsV1Api(cluster.api_client())
    name = group_name(cluster, namespace, NAME, "encode")
    start = apps.read_namespaced_stateful_set(name, namespace).metadata.resource_version
    seen: list[int] = []
    last = [start]  # the newest version the watch has delivered
    stream: Any = watch.Watch()  # type: ignore[no-untyped-call]

    stopping = threading.Event()

    def follow() -> None:
        try:
            for event in stream.stream(
                apps.list_namespaced_stateful_set,
                namespace,
                field_selector=f"metadata.name={name}",
                resource_version=start,
                timeout_seconds=120,
            ):
                seen.append(event["object"].spec.replicas)
                last[0] = event["object"].metadata.resource_version
        except Exception:
            if not stopping.is_set():  # cut off when the test's namespace goes away
                raise

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    patch_spec(cluster, namespace, {"spec": {"autoscaling": {"encode": {"maxReplicas": 6}}}})
    # The status is written after the children: every write of that reconcile is done.
    wait_for_status(cluster, namespace, NAME, observedGeneration=2)
    hpa = get_json(cluster, "-n", namespace, "get", "hpa", f"{NAME}-encode")
    assert hpa["spec"]["maxReplicas"] == 6
    assert hpa["spec"]["scaleTargetRef"]["name"] == name
    sts = apps.read_namespaced_stateful_set(name, namespace)
    current = sts.metadata.resource_version
    wait_for(lambda: last[0] == current, timeout=30, interval=0.1, what="the watch caught up")
    stopping.set()
    stream.stop()
    assert sts.spec.replicas == 3
    assert min(seen, default=3) >= 3, seen


def test_image_change_is_a_paired_rollout(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A new image is a new revision: new StatefulSets beside the old, which go once the
    new pair and the router are ready. The contract is unchanged, so Compatible holds."""
    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    before = groups(cluster, namespace)
    with StatusRecorder(cluster, namespace, NAME) as recorder:
        patch_spec(cluster, namespace, {"spec": {"runtime": {"image": "deepstack-runtime:0.2.0"}}})
        status = ready(cluster, namespace, generation=2)
    after = groups(cluster, namespace)
    assert set(after).isdisjoint(before), (before, after)
    assert after == sorted(
        group_name(cluster, namespace, NAME, role) for role in ("encode", "language")
    )
    assert ("True", "PairedRollout") in recorder.seen("Progressing")
    assert set(recorder.seen("Compatible")) == {("True", "SingleContract")}
    for role in ("encode", "language"):
        pods = get_json(
            cluster, "-n", namespace, "get", "pods", "-l", f"disagg.deepstack.dev/role={role}"
        )
        assert [p["spec"]["containers"][0]["image"] for p in pods["items"]] == [
            "deepstack-runtime:0.2.0"
        ]
    assert condition(status, "Compatible")["status"] == "True"
    # The roll was reported: the operator posted a RollingOut event when leaving Ready.
    events = get_json(cluster, "-n", namespace, "get", "events.events.k8s.io")
    reasons = [e.get("reason") for e in events["items"] if e["regarding"]["name"] == NAME]
    assert "RollingOut" in reasons
    assert reasons.count("Ready") >= 2


def test_a_contract_change_is_reported_until_every_pod_serves_the_new_one(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    body = minimal()
    apply(cluster, namespace, body)
    old = ready(cluster, namespace)["contract"]
    old_config_map = config_map_name(cluster, namespace, NAME)
    layers = body["spec"].get("deepstack", {}).get("numLayers", 3)
    with StatusRecorder(cluster, namespace, NAME) as recorder:
        patch_spec(cluster, namespace, {"spec": {"deepstack": {"numLayers": layers - 1}}})
        status = ready(cluster, namespace, generation=2)
    assert status["contract"] != old
    compatible = recorder.seen("Compatible")
    assert compatible[-1] == ("True", "SingleContract")
    assert {("False", "ContractPending"), ("False", "MixedContracts")} & set(compatible)
    pods = get_json(
        cluster, "-n", namespace, "get", "pods", "-l", f"disagg.deepstack.dev/instance={NAME}"
    )["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert {p["metadata"]["labels"]["disagg.deepstack.dev/contract"] for p in live} == {
        status["contract"]
    }
    # The old revision's ConfigMap went with its pods.
    gone = cluster.kubectl("-n", namespace, "get", "configmap", old_config_map, check=False)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr


def test_deleted_or_edited_children_are_restored(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    old_uid = get_json(cluster, "-n", namespace, "get", "service", f"{NAME}-encode")["metadata"][
        "uid"
    ]
    cluster.kubectl("-n", namespace, "delete", "service", f"{NAME}-encode")

    def recreated() -> bool:
        out = cluster.kubectl(
            "-n", namespace, "get", "service", f"{NAME}-encode", "-o", "json", check=False
        )
        return out.returncode == 0 and json.loads(out.stdout)["metadata"]["uid"] != old_uid

    wait_for(recreated, timeout=60, what="the deleted Service to come back")
    language = group_name(cluster, namespace, NAME, "language")
    cluster.kubectl("-n", namespace, "scale", "statefulset", language, "--replicas=4")
    wait_for(
        lambda: group(cluster, namespace, "language")["spec"]["replicas"] == 1,
        timeout=60,
        what="the edited StatefulSet to be put back to 1 replica",
    )
    config_map = config_map_name(cluster, namespace, NAME)
    cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "configmap",
        config_map,
        "--type=merge",
        "-p",
        json.dumps({"data": {"config.json": "{}"}}),
    )
    wait_for(
        lambda: (
            json.loads(
                get_json(cluster, "-n", namespace, "get", "configmap", config_map)["data"][
                    "config.json"
                ]
            ).get("name")
            == NAME
        ),
        timeout=60,
        what="the edited ConfigMap to be restored",
    )


def test_router_disabled_is_pruned(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    patch_spec(cluster, namespace, {"spec": {"router": {"enabled": False, "replicas": 0}}})
    status = ready(cluster, namespace, generation=2)
    assert "router" not in status
    assert "url" not in status
    for kind in ("deployment", "service"):
        out = cluster.kubectl("-n", namespace, "get", kind, f"{NAME}-router", check=False)
        assert out.returncode != 0
        assert "NotFound" in out.stderr


class ReplicaRecorder:
    """Every spec.replicas a Deployment goes through from now on, from a watch."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        from kubernetes import client, watch

        apps: Any = client.AppsV1Api(cluster.api_client())
        self.apps = apps
        self.namespace, self.name = namespace, name
        start = apps.read_namespaced_deployment(name, namespace).metadata.resource_version
        self.seen: list[int] = []
        self._last = start  # the newest version the watch has delivered
        self._start = start
        self._watch: Any = watch.Watch()  # type: ignore[no-untyped-call]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> ReplicaRecorder:
        self._thread.start()
        return self

    def _follow(self) -> None:
        try:
            for event in self._watch.stream(
                self.apps.list_namespaced_deployment, self.namespace,
                field_selector=f"metadata.name={self.name}",
                resource_version=self._start, timeout_seconds=300,
            ):  # fmt: skip
                self.seen.append(event["object"].spec.replicas)
                self._last = event["object"].metadata.resource_version
        except Exception:
            if not self._stopping.is_set():  # cut off when the test's namespace goes away
                raise

    def caught_up(self) -> dict[str, Any]:
        """The Deployment as it is now, once the watch has delivered that version."""
        now: dict[str, Any] = self.apps.read_namespaced_deployment(
            self.name, self.namespace
        ).to_dict()
        version = now["metadata"]["resource_version"]
        wait_for(lambda: self._last == version, timeout=30, interval=0.1, what="the watch")
        return now

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._watch.stop()
        self._thread.join(10)


@pytest.mark.parametrize("scaler", ["hpa", "keda-apply"])
def test_the_router_count_is_left_to_the_users_own_autoscaler(
    cluster: Cluster, operator: OperatorProcess, namespace: str, scaler: str
) -> None:
    """router.replicas is the count until another controller scales the router
    Deployment: an HPA of the user's (the real HPA controller; KEDA's ScaledObjects
    scale through one too), or a server-side apply under another field manager (what
    KEDA or a GitOps tool may do). From then on the operator neither sets it back to
    router.replicas nor drops it to 1 in between, and the router counts as ready at the
    size the other controller asks for."""
    from kubernetes import client

    from deepstack_operator.names import FIELD_MANAGER
    from deepstack_operator.ownership import replica_owners

    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    router = f"{NAME}-router"
    with ReplicaRecorder(cluster, namespace, router) as recorder:
        if scaler == "hpa":
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "router-by-the-user", "namespace": namespace},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                       "name": router},
                    # Below minReplicas the HPA controller scales up without metrics.
                    "minReplicas": 3,
                    "maxReplicas": 4,
                    "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization",
                                                  "averageUtilization": 80}}}],
                },
            }  # fmt: skip
            apply(cluster, namespace, hpa)
        else:
            client.AppsV1Api(cluster.api_client()).patch_namespaced_deployment(
                router, namespace,
                {"apiVersion": "apps/v1", "kind": "Deployment",
                 "metadata": {"name": router, "namespace": namespace},
                 "spec": {"replicas": 3}},
                field_manager="keda-operator", force=True,
                _content_type="application/apply-patch+yaml",
            )  # fmt: skip
        wait_for(lambda: 3 in recorder.seen, timeout=90, what="the other controller's 3")
        # A change of the resource: the operator applies every child again.
        patch_spec(cluster, namespace, {"spec": {"encode": {"replicas": 2}}})
        status = ready(cluster, namespace, generation=2)
        assert status["router"]["summary"] == "3/3"
        assert status["router"]["readyReplicas"] == 3
        live = recorder.caught_up()
    assert live["spec"]["replicas"] == 3
    first = recorder.seen.index(3)
    assert recorder.seen[first:] == [3] * len(recorder.seen[first:]), recorder.seen
    owners = replica_owners(
        get_json(cluster, "-n", namespace, "get", "deployment", router, "--show-managed-fields")
    )
    assert FIELD_MANAGER not in owners, owners


def test_a_model_claim_asked_writable_is_mounted_read_write(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    body = minimal()
    body["spec"]["model"]["volume"] = {
        "persistentVolumeClaim": {"claimName": "models", "readOnly": False}
    }
    apply(cluster, namespace, body)
    status = wait_for_status(cluster, namespace, NAME, phase="Degraded", observedGeneration=1)
    assert condition(status, "Degraded")["reason"] == "MissingPersistentVolumeClaim"

    def model_volume(workload: dict[str, Any]) -> tuple[bool, bool]:
        pod = workload["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "model"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
        # The API server leaves out a readOnly that is false.
        claim = volume["persistentVolumeClaim"]
        return claim.get("readOnly", False), mount.get("readOnly", False)

    for role in ("encode", "language"):
        assert model_volume(group(cluster, namespace, role)) == (False, False)
    router = get_json(cluster, "-n", namespace, "get", "deployment", f"{NAME}-router")
    assert model_volume(router) == (True, True)  # the router only reads


def test_deleting_the_resource_removes_children_through_the_garbage_collector(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    cluster.kubectl("-n", namespace, "delete", "dsd", NAME, "--wait=true", "--timeout=60s")

    def gone() -> bool:
        left = cluster.kubectl(
            "-n",
            namespace,
            "get",
            "statefulset,deployment,service,configmap,pdb,networkpolicy",
            "-l",
            f"disagg.deepstack.dev/instance={NAME}",
            "-o",
            "name",
        ).stdout.split()
        return not left

    wait_for(gone, timeout=90, what="every child to be garbage-collected")


def test_missing_secret_degrades_then_recovers(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    body = minimal()
    body["spec"]["runtime"]["imagePullSecrets"] = [{"name": "regcred"}]
    apply(cluster, namespace, body)
    status = wait_for_status(cluster, namespace, NAME, phase="Degraded")
    degraded = condition(status, "Degraded")
    assert degraded["status"] == "True"
    assert degraded["reason"] == "MissingSecret"
    assert f"Secret 'regcred' does not exist in namespace {namespace}" in degraded["message"]
    before = operator.reconciles("requeue_after")
    cluster.kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "docker-registry",
        "regcred",
        "--docker-server=registry.example",
        "--docker-username=u",
        "--docker-password=p",
    )
    status = ready(cluster, namespace)
    assert condition(status, "Degraded")["status"] == "False"
    # It looked again a bounded number of times while waiting: no hot loop.
    assert operator.reconciles("requeue_after") - before < 30
    events = get_json(cluster, "-n", namespace, "get", "events.events.k8s.io")
    reasons = [(e.get("type"), e.get("reason")) for e in events["items"]]
    assert ("Warning", "MissingSecret") in reasons
    assert ("Normal", "Recovered") in reasons


def test_noop_resync_writes_nothing(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    # Let the pods' last status updates settle into the status first.
    wait_for(
        lambda: dsd(cluster, namespace, NAME)["status"]["router"]["readyReplicas"] == 1,
        timeout=60,
        what="router ready",
    )
    before_children = resource_versions(cluster, namespace)
    reconciles = operator.reconciles()
    # An annotation is a change to the resource (an event) but not to what it asks for.
    cluster.kubectl("-n", namespace, "annotate", "dsd", NAME, "example.com/touched=yes")
    annotated_rv = dsd(cluster, namespace, NAME)["metadata"]["resourceVersion"]
    wait_for(lambda: operator.reconciles() > reconciles, timeout=30, what="a reconcile")
    assert resource_versions(cluster, namespace) == before_children
    assert dsd(cluster, namespace, NAME)["metadata"]["resourceVersion"] == annotated_rv


def test_metrics_endpoint_counts_reconciles(operator: OperatorProcess) -> None:
    text = operator.metrics()
    assert operator.reconciles() > 0
    assert (
        sample(
            text,
            "controller_runtime_reconcile_time_seconds_count",
            controller="deepstackdisaggregation",
        )
        > 0
    )
    assert (
        sample(
            text, "controller_runtime_reconcile_errors_total", controller="deepstackdisaggregation"
        )
        == 0
    )
    for phase in ("Pending", "Progressing", "Ready", "Degraded"):
        sample(text, "deepstack_operator_resources", phase=phase)  # every series exists


def test_operator_log_has_no_tracebacks(operator: OperatorProcess) -> None:
    assert "Traceback" not in Path(operator.log_path).read_text()


def test_a_model_path_the_runtime_rejects_degrades_without_touching_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal())
    ready(cluster, namespace)
    before = resource_versions(cluster, namespace)
    patch_spec(cluster, namespace, {"spec": {"model": {"path": "/models/../etc/shadow"}}})
    status = wait_for_status(cluster, namespace, NAME, phase="Degraded", observedGeneration=2)
    degraded = condition(status, "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "model.path must be an absolute path without '..'" in degraded["message"]
    assert resource_versions(cluster, namespace) == before  # the running pods are left alone
    patch_spec(cluster, namespace, {"spec": {"model": {"path": "/models/tiny-qwen3-vl-moe"}}})
    ready(cluster, namespace, generation=3)
