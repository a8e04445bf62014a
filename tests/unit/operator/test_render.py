"""Renderers: snapshots of every example, and the properties every child must have."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from deepstack_operator import names
from deepstack_operator.render import Capabilities
from deepstack_runtime.config import ConfigError, RuntimeConfig
from devkit.crd import EXAMPLES
from devkit.specs import example
from tests.support.render import render

STEMS = [p.stem for p in EXAMPLES]


def by_kind(children: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [c for c in children if c["kind"] == kind]


def one(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [c for c in children if c["kind"] == kind and c["metadata"]["name"] == name]
    return found


def group(children: list[dict[str, Any]], role: str) -> dict[str, Any]:
    """The StatefulSet of one pod group (named after its revision)."""
    (found,) = [
        c
        for c in children
        if c["kind"] == "StatefulSet"
        and c["metadata"]["labels"]["disagg.deepstack.dev/role"] == role
    ]
    return found


def container(sts: dict[str, Any]) -> dict[str, Any]:
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert isinstance(c, dict)
    return c


@pytest.mark.parametrize("stem", STEMS)
def test_snapshot(stem: str, snapshot: SnapshotAssertion) -> None:
    assert render(example(stem), Capabilities(pod_monitor=True)) == snapshot


@pytest.mark.parametrize("stem", STEMS)
def test_every_child_is_owned_labelled_and_namespaced(stem: str) -> None:
    cr = example(stem)
    for child in render(cr, Capabilities(pod_monitor=True)):
        meta = child["metadata"]
        assert meta["namespace"] == "default"
        (owner,) = meta["ownerReferences"]
        assert owner["uid"] == cr["metadata"]["uid"]
        assert owner["controller"] is True
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "deepstack-operator"
        assert meta["labels"]["disagg.deepstack.dev/instance"] == cr["metadata"]["name"]
        assert len(meta["name"]) <= 63


def test_minimal_example_children() -> None:
    children = render(example("minimal-cpu"))
    kinds = sorted(c["kind"] for c in children)
    assert kinds == sorted(
        ["ConfigMap"]
        + ["Service"] * 3
        + ["StatefulSet"] * 2
        + ["Deployment"]
        + ["PodDisruptionBudget"] * 2
        + ["NetworkPolicy"] * 2
    )
    encode = group(children, "encode")
    c = container(encode)
    assert c["command"] == [
        "deepstack-runtime",
        "encode",
        "--config",
        "/etc/deepstack/config.json",
        "--host",
        "0.0.0.0",  # in a pod; the runtime's own default is loopback
    ]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8000,
        "metrics": 9090,
        "bootstrap": 8998,
    }
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert encode["spec"]["replicas"] == 1
    assert encode["spec"]["serviceName"] == "tiny-qwen3-vl-moe-encode"
    # The rendered configuration is what the runtime will read.
    (cm,) = by_kind(children, "ConfigMap")
    config = RuntimeConfig.from_dict(__import__("json").loads(cm["data"]["config.json"]))
    assert config.backend == "reference"
    assert config.transfer.block_tokens == 16
    assert config.deepstack.hidden_size == 64


def test_tcp_pods_meet_the_restricted_pod_security_level() -> None:
    for sts in by_kind(render(example("minimal-cpu")), "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        c = container(sts)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert not any("hostPath" in v for v in pod["volumes"])
        assert "nvidia.com/gpu" not in str(c["resources"])  # the reference backend runs on CPU


def test_rdma_pods_get_devices_ipc_lock_and_gpus() -> None:
    children = render(example("qwen3-vl-moe-rdma"))
    language = group(children, "language")
    c = container(language)
    assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert c["resources"]["limits"]["rdma/hca_shared_devices_a"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["DEEPSTACK_RDMA_DEVICES"] == "mlx5_0,mlx5_1"
    assert c["args"] == ["--mem-fraction-static", "0.85"]
    model_mount = [m for m in c["volumeMounts"] if m["name"] == "model"]
    assert model_mount == [{"name": "model", "mountPath": "/models", "readOnly": True}]


def test_the_router_pins_no_memory_and_no_pod_gets_an_api_token() -> None:
    children = render(example("qwen3-vl-moe-rdma"))
    router = one(children, "Deployment", "qwen3-vl-moe-router")
    assert container(router)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for workload in [*by_kind(children, "StatefulSet"), router]:
        assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_router_resources_scheduling_and_disruption_budget() -> None:
    cr = example("minimal-cpu")
    cr["spec"]["router"].update(
        resources={"requests": {"cpu": "500m", "memory": "1Gi"}},
        nodeSelector={"pool": "cpu"},
        tolerations=[{"key": "dedicated", "operator": "Exists"}],
    )
    children = render(cr)
    router = one(children, "Deployment", "tiny-qwen3-vl-moe-router")
    pod = router["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}}
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    budgets = {b["metadata"]["name"] for b in by_kind(children, "PodDisruptionBudget")}
    assert "tiny-qwen3-vl-moe-router" not in budgets  # one pod: a budget would block drains
    cr["spec"]["router"]["replicas"] = 2
    budget = one(render(cr), "PodDisruptionBudget", "tiny-qwen3-vl-moe-router")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"]


def test_autoscaled_roles_get_an_hpa_and_no_replica_count() -> None:
    children = render(example("qwen3-vl-moe-rdma"))
    hpas = {h["metadata"]["name"]: h["spec"] for h in by_kind(children, "HorizontalPodAutoscaler")}
    assert hpas["qwen3-vl-moe-encode"]["maxReplicas"] == 8
    assert hpas["qwen3-vl-moe-language"]["scaleTargetRef"]["kind"] == "StatefulSet"
    for sts in by_kind(children, "StatefulSet"):
        assert "replicas" not in sts["spec"]
    # Each sizes its group's current revision.
    target = hpas["qwen3-vl-moe-language"]["scaleTargetRef"]["name"]
    assert target == group(children, "language")["metadata"]["name"]


def test_router_and_network_policy_can_be_turned_off() -> None:
    cr = example("minimal-cpu")
    cr["spec"]["router"]["enabled"] = False
    cr["spec"]["networkPolicy"]["enabled"] = False
    children = render(cr)
    assert by_kind(children, "Deployment") == []
    assert by_kind(children, "NetworkPolicy") == []
    assert "tiny-qwen3-vl-moe-router" not in {c["metadata"]["name"] for c in children}


def test_the_groups_reach_each_others_mooncake_ports_and_nothing_else() -> None:
    """Language pods reach the encode pods' bootstrap port and their Mooncake ports (over
    RDMA the receiving side's Mooncake may ask the sender's for its segment); encode pods
    reach the language pods' Mooncake ports only (their writes, over tcp); all within
    transfer.mooncakePorts, which the runtime makes Mooncake keep to."""
    cr = example("qwen3-vl-moe-rdma")
    cr["spec"]["transfer"]["mooncakePorts"] = {"min": 16000, "max": 16001}
    policies = {p["metadata"]["labels"]["disagg.deepstack.dev/role"]: p["spec"]
                for p in by_kind(render(cr), "NetworkPolicy")}  # fmt: skip
    mooncake = {"protocol": "TCP", "port": 16000, "endPort": 16001}

    def admitted(role: str, peer: str) -> list[dict[str, Any]]:
        selector = {"podSelector": {"matchLabels": names.selector_labels("qwen3-vl-moe", peer)}}
        (rule,) = [r for r in policies[role]["ingress"] if r.get("from") == [selector]]
        ports: list[dict[str, Any]] = rule["ports"]
        return ports

    bootstrap = cr["spec"]["transfer"]["bootstrapPort"]
    assert admitted("encode", "language") == [{"protocol": "TCP", "port": bootstrap}, mooncake]
    assert admitted("language", "encode") == [mooncake]


def test_pod_monitor_only_where_its_crd_exists() -> None:
    cr = example("minimal-cpu")
    assert by_kind(render(cr, Capabilities(pod_monitor=False)), "PodMonitor") == []
    (pm,) = by_kind(render(cr, Capabilities(pod_monitor=True)), "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics"}]


def test_user_env_cannot_override_the_runtime_own_variables() -> None:
    cr = example("minimal-cpu")
    cr["spec"]["encode"]["env"] = [
        {"name": "POD_IP", "value": "1.2.3.4"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]
    c = container(group(render(cr), "encode"))
    values = [e for e in c["env"] if e["name"] == "POD_IP"]
    assert len(values) == 1
    assert "valueFrom" in values[0]
    assert {"name": "HF_HOME", "value": "/tmp/hf"} in c["env"]


def test_config_change_changes_the_pod_template() -> None:
    """Pods must roll when the runtime configuration changes."""
    a = example("minimal-cpu")
    b = copy.deepcopy(a)
    b["spec"]["transfer"]["poolBlocks"] = 128
    key = "disagg.deepstack.dev/config-hash"

    def hash_of(cr: dict[str, Any]) -> str:
        sts = group(render(cr), "language")
        value: str = sts["spec"]["template"]["metadata"]["annotations"][key]
        return value

    assert hash_of(a) != hash_of(b)
    # Not a contract change: the same revision, rolled in place.
    assert (
        group(render(a), "language")["metadata"]["name"]
        == (group(render(b), "language")["metadata"]["name"])
    )


@pytest.mark.parametrize(
    ("field", "value", "new_contract"),
    [
        (("deepstack", "numLayers"), 2, True),
        (("deepstack", "dtype"), "float16", True),
        (("transfer", "blockTokens"), 32, True),
        (("model", "path"), "/models/other", True),
        (("runtime", "image"), "example.com/runtime:2", False),  # a new revision only
    ],
)
def test_a_contract_or_image_change_makes_a_new_revision(
    field: tuple[str, str], value: object, new_contract: bool
) -> None:
    """A new revision is a new StatefulSet per group and a new ConfigMap (the old pods
    keep theirs), with the contract on every pod; the router mounts the new one."""
    a = example("minimal-cpu")
    b = copy.deepcopy(a)
    b["spec"][field[0]][field[1]] = value
    before, after = render(a), render(b)
    for role in ("encode", "language"):
        old, new = group(before, role), group(after, role)
        assert old["metadata"]["name"] != new["metadata"]["name"]
        revision = new["metadata"]["labels"]["disagg.deepstack.dev/revision"]
        assert new["metadata"]["name"] == f"tiny-qwen3-vl-moe-{role}-{revision}"
        assert new["spec"]["selector"]["matchLabels"]["disagg.deepstack.dev/revision"] == revision
        labels = [
            old["spec"]["template"]["metadata"]["labels"],
            new["spec"]["template"]["metadata"]["labels"],
        ]
        contracts = [x["disagg.deepstack.dev/contract"] for x in labels]
        assert (contracts[0] != contracts[1]) == new_contract
        assert new["spec"]["serviceName"] == f"tiny-qwen3-vl-moe-{role}"  # one Service
    (cm,) = by_kind(after, "ConfigMap")
    assert cm["metadata"]["name"] != by_kind(before, "ConfigMap")[0]["metadata"]["name"]
    router = one(after, "Deployment", "tiny-qwen3-vl-moe-router")
    mounted = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    assert mounted["runtime-config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert container(router)["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_a_spec_the_runtime_rejects_is_a_config_error() -> None:
    cr = example("minimal-cpu")
    cr["spec"]["model"]["path"] = "/models/../etc"
    with pytest.raises(ConfigError, match=r"without '\.\.'"):
        render(cr)


def test_only_language_pods_wait_for_a_verified_transfer() -> None:
    children = render(example("minimal-cpu"))
    gates = {
        role: group(children, role)["spec"]["template"]["spec"].get("readinessGates")
        for role in ("encode", "language")
    }
    assert gates == {
        "encode": None,
        "language": [{"conditionType": "disagg.deepstack.dev/transfer-ready"}],
    }
    router = one(children, "Deployment", "tiny-qwen3-vl-moe-router")
    assert "readinessGates" not in router["spec"]["template"]["spec"]


def test_load_autoscaling_renders_no_hpa_and_keeps_the_replica_count() -> None:
    """Policy Load: the operator sizes the groups itself (deepstack_operator.scaling)."""
    cr = example("minimal-cpu")
    cr["spec"]["autoscaling"] = {
        "policy": "Load",
        "encode": {"minReplicas": 1, "maxReplicas": 4},
    }
    children = render(cr)
    assert by_kind(children, "HorizontalPodAutoscaler") == []
    assert group(children, "encode")["spec"]["replicas"] == 1


def test_router_api_keys_are_a_file_mounted_from_the_secret() -> None:
    """A file the router re-reads (a rotated key takes effect without a restart), never
    a variable; on the router alone."""
    cr = example("minimal-cpu")
    cr["spec"]["router"]["apiKeySecret"] = {"name": "router-keys", "key": "keys"}
    children = render(cr)
    deployment = one(children, "Deployment", "tiny-qwen3-vl-moe-router")
    router = container(deployment)
    assert router["args"][-2:] == ["--api-keys-file", "/etc/deepstack-api-keys/keys"]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert volume["secret"] == {
        "secretName": "router-keys",
        "items": [{"key": "keys", "path": "keys"}],
        "defaultMode": 0o440,
    }
    (mount,) = [m for m in router["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": "api-keys", "mountPath": "/etc/deepstack-api-keys", "readOnly": True}
    assert not any(e.get("valueFrom", {}).get("secretKeyRef") for e in router["env"])
    for role in ("encode", "language"):
        workload = group(children, role)
        assert "--api-keys-file" not in container(workload)["args"]
        assert not any("secret" in v for v in workload["spec"]["template"]["spec"]["volumes"])


@pytest.mark.parametrize("read_only", [True, False])
def test_a_model_claim_is_mounted_as_its_read_only_says(
    read_only: bool, snapshot: SnapshotAssertion
) -> None:
    """persistentVolumeClaim.readOnly false mounts the claim read-write in the encode
    and language pods (true, the default: read-only); the router only reads."""
    cr = example("qwen3-vl-moe-rdma")
    cr["spec"]["model"]["volume"]["persistentVolumeClaim"]["readOnly"] = read_only
    children = render(cr)
    router = one(children, "Deployment", "qwen3-vl-moe-router")
    mounted = {}
    for workload in [*by_kind(children, "StatefulSet"), router]:
        pod = workload["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "model"]
        (mount,) = [m for m in container(workload)["volumeMounts"] if m["name"] == "model"]
        expected = read_only or workload is router
        assert volume["persistentVolumeClaim"]["readOnly"] is expected
        assert mount["readOnly"] is expected
        mounted[workload["metadata"]["name"]] = {"volume": volume, "mount": mount}
    assert mounted == snapshot


def test_a_model_host_path_is_always_mounted_read_only() -> None:
    cr = example("minimal-cpu")
    cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/srv/models"}}
    for sts in by_kind(render(cr), "StatefulSet"):
        (mount,) = [m for m in container(sts)["volumeMounts"] if m["name"] == "model"]
        assert mount["readOnly"] is True


def test_router_media_hosts_and_video_limits_become_its_flags() -> None:
    """router.mediaUrlDomains and imageUrlDomains (its older name) merged, in order and
    once each; the video limits as the router's flags."""
    cr = example("minimal-cpu")
    cr["spec"]["router"]["mediaUrlDomains"] = ["media.example.com", "10.0.0.0/8"]
    cr["spec"]["router"]["imageUrlDomains"] = ["10.0.0.0/8", "images.example.com"]
    cr["spec"]["router"]["limits"] = {"maxVideoSeconds": 30, "maxVideoFrames": 64}
    args = container(one(render(cr), "Deployment", "tiny-qwen3-vl-moe-router"))["args"]
    assert args == [
        "--max-video-seconds", "30", "--max-video-frames", "64",
        "--image-url-domain", "media.example.com",
        "--image-url-domain", "10.0.0.0/8",
        "--image-url-domain", "images.example.com",
    ]  # fmt: skip
