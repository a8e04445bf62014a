"""The CRD against the real API server: established, examples accepted with defaults,
and invalid objects rejected with a message a person understands."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devkit.cluster import Cluster
from devkit.crd import (
    CRD_NAME,
    EXAMPLES,
    GROUP,
    PLURAL,
    VERSION,
    install_crd,
    load,
    minimal,
)

Spec = dict[str, Any]


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> Cluster:
    install_crd(cluster)
    return cluster


@pytest.fixture(scope="module")
def custom_api(crd: Cluster) -> Any:
    return client.CustomObjectsApi(crd.api_client())


def create(api: Any, namespace: str, body: Spec) -> Spec:
    result: Spec = api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
    )
    return result


def test_crd_is_established_with_names(crd: Cluster) -> None:
    obj = json.loads(crd.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert obj["status"]["acceptedNames"]["shortNames"] == ["dsd"]
    assert obj["spec"]["versions"][0]["subresources"] == {"status": {}}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted_by_kubectl(crd: Cluster, namespace: str, path: Any) -> None:
    out = crd.kubectl("-n", namespace, "apply", "-f", str(path))
    assert "created" in out.stdout
    name = load(path)["metadata"]["name"]
    stored = json.loads(crd.kubectl("-n", namespace, "get", "dsd", name, "-o", "json").stdout)
    given = load(path)["spec"]
    # What the example says is kept; what it leaves out is defaulted.
    assert stored["spec"]["model"]["path"] == given["model"]["path"]
    assert stored["spec"]["model"]["mountPath"] == "/models"
    assert stored["spec"]["runtime"]["imagePullPolicy"] == "IfNotPresent"
    assert stored["spec"]["transfer"]["protocol"] == given["transfer"]["protocol"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_one_source_of_defaults(custom_api: Any, namespace: str, path: Any) -> None:
    """The CRD's defaults are the only ones: what the API server stores for an example is
    what the tests assume (`specs.example`), and the runtime configuration read from the
    example as written (its fallbacks for absent fields) is the one read from the stored
    object."""
    from deepstack_runtime.config import RuntimeConfig
    from devkit.specs import example

    given = load(path)
    stored = create(custom_api, namespace, given)
    assumed = example(path.stem)
    assert stored["spec"] == assumed["spec"]
    name = given["metadata"]["name"]
    as_written = RuntimeConfig.from_spec(name, namespace, given["spec"])
    assert as_written == RuntimeConfig.from_spec(name, namespace, stored["spec"])


def test_defaults_appear_on_the_stored_object(custom_api: Any, namespace: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DeepStackDisaggregation",
        "metadata": {"name": "bare"},
        "spec": {
            "model": {"path": "/models/m", "servedModelName": "m"},
            "runtime": {"image": "example/runtime:1"},
        },
    }
    create(custom_api, namespace, body)
    stored: Spec = custom_api.get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "bare"
    )
    spec = stored["spec"]
    assert spec["model"]["encoderPath"] == ""
    assert spec["model"]["mountPath"] == "/models"
    assert spec["runtime"]["backend"] == "sglang"
    assert spec["runtime"]["imagePullPolicy"] == "IfNotPresent"
    assert spec["deepstack"] == {
        "enabled": True,
        "numLayers": 3,
        "hiddenSize": 2048,
        "dtype": "bfloat16",
    }
    transfer = spec["transfer"]
    assert transfer["backend"] == "mooncake"
    assert transfer["protocol"] == "tcp"
    assert transfer["rdmaDevices"] == []
    assert transfer["blockTokens"] == 256
    assert transfer["defaultAllocationTokens"] == 4096
    assert transfer["poolBlocks"] == 1024
    assert transfer["maxQueuedRequests"] == 64
    assert transfer["resumption"] == {"maxRounds": 8, "timeoutSeconds": 30}
    assert transfer["checksum"] is True
    assert transfer["mooncakePorts"] == {"min": 15000, "max": 17000}
    assert "writeTimeoutSeconds" not in transfer  # the runtime's: half the transfer timeout
    for role in ("encode", "language"):
        assert spec[role]["replicas"] == 1
        assert spec[role]["tensorParallelSize"] == 1
        assert spec[role]["resources"] == {}
    assert spec["router"] == {"enabled": True, "replicas": 1, "port": 8000, "resources": {}}
    assert spec["rollout"] == {"maxUnavailable": 1}
    assert spec["monitoring"] == {"podMonitor": True, "metricsPort": 9090}
    assert "autoscaling" not in spec


def test_example_defaults_fill_nested_objects(custom_api: Any, namespace: str) -> None:
    create(custom_api, namespace, minimal())
    stored: Spec = custom_api.get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, minimal()["metadata"]["name"]
    )
    # Given in the example, kept:
    assert stored["spec"]["transfer"]["blockTokens"] == 16
    assert stored["spec"]["deepstack"]["dtype"] == "float32"
    # Not given, defaulted:
    assert stored["spec"]["transfer"]["resumption"]["maxRounds"] == 8
    assert stored["spec"]["encode"]["tensorParallelSize"] == 1
    assert stored["spec"]["router"]["port"] == 8000


def test_a_model_claim_may_ask_to_be_writable(custom_api: Any, namespace: str) -> None:
    """persistentVolumeClaim.readOnly: false is kept (the operator mounts the claim
    read-write then); left out, it is true."""
    for name, volume, expected in (
        ("writable", {"claimName": "models", "readOnly": False}, False),
        ("default", {"claimName": "models"}, True),
    ):
        body = minimal()
        body["metadata"]["name"] = name
        body["spec"]["model"]["volume"] = {"persistentVolumeClaim": volume}
        create(custom_api, namespace, body)
        stored: Spec = custom_api.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        assert stored["spec"]["model"]["volume"]["persistentVolumeClaim"] == {
            "claimName": "models",
            "readOnly": expected,
        }


def test_printer_columns_and_short_name(crd: Cluster, namespace: str) -> None:
    crd.kubectl("-n", namespace, "apply", "-f", str(EXAMPLES[0]))
    header = crd.kubectl("-n", namespace, "get", "dsd").stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "ENCODE", "LANGUAGE", "AGE"]
    wide = crd.kubectl("-n", namespace, "get", "dsd", "-o", "wide").stdout.splitlines()[0]
    assert wide.split() == ["NAME", "PHASE", "ENCODE", "LANGUAGE", "BACKEND", "URL", "AGE"]


# --- invalid objects ---------------------------------------------------------------------


def put(path: str, value: Any) -> Callable[[Spec], None]:
    """Set a dotted path inside the object (creating parents)."""

    def mutate(obj: Spec) -> None:
        *parents, leaf = path.split(".")
        node = obj
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def drop(path: str) -> Callable[[Spec], None]:
    def mutate(obj: Spec) -> None:
        *parents, leaf = path.split(".")
        node = obj
        for key in parents:
            node = node[key]
        del node[leaf]

    return mutate


def both(*mutations: Callable[[Spec], None]) -> Callable[[Spec], None]:
    def mutate(obj: Spec) -> None:
        for m in mutations:
            m(obj)

    return mutate


# (id, mutation of the minimal example, fragment of the API server's message)
INVALID: list[tuple[str, Callable[[Spec], None], str]] = [
    (
        "replicas-wrong-type",
        put("spec.encode.replicas", "two"),
        'spec.encode.replicas: Invalid value: "string": spec.encode.replicas in body '
        "must be of type integer",
    ),
    (
        "replicas-negative",
        put("spec.language.replicas", -1),
        "spec.language.replicas: Invalid value: -1: spec.language.replicas in body should be "
        "greater than or equal to 0",
    ),
    (
        "replicas-absurd",
        put("spec.encode.replicas", 100000),
        "spec.encode.replicas in body should be less than or equal to 512",
    ),
    ("unknown-field-in-role", put("spec.encode.replica", 2), 'unknown field "spec.encode.replica"'),
    ("unknown-top-level-field", put("spec.gpus", 8), 'unknown field "spec.gpus"'),
    (
        "backend-bad-enum",
        put("spec.runtime.backend", "vllm"),
        'spec.runtime.backend: Unsupported value: "vllm": supported values: "sglang", "reference"',
    ),
    (
        "protocol-bad-enum",
        put("spec.transfer.protocol", "udp"),
        'spec.transfer.protocol: Unsupported value: "udp"',
    ),
    ("dtype-bad-enum", put("spec.deepstack.dtype", "int8"), 'Unsupported value: "int8"'),
    (
        "tensor-parallel-not-power-of-two",
        put("spec.language.tensorParallelSize", 3),
        "spec.language.tensorParallelSize: Unsupported value: 3",
    ),
    (
        "rdma-without-devices",
        both(put("spec.runtime.backend", "sglang"), put("spec.transfer.protocol", "rdma")),
        'transfer.protocol "rdma" needs transfer.rdmaDevices',
    ),
    (
        "rdma-auto-mixed-with-names",
        both(
            put("spec.runtime.backend", "sglang"),
            put("spec.transfer.protocol", "rdma"),
            put("spec.transfer.rdmaDevices", ["auto", "mlx5_0"]),
        ),
        'transfer.rdmaDevices "auto" cannot be combined with device names',
    ),
    (
        "rdma-devices-with-tcp",
        put("spec.transfer.rdmaDevices", ["mlx5_0"]),
        'transfer.rdmaDevices is only used with transfer.protocol "rdma"',
    ),
    (
        "default-allocation-not-whole-blocks",
        put("spec.transfer.defaultAllocationTokens", 100),
        "transfer.defaultAllocationTokens must be a whole number of blocks",
    ),
    (
        "default-allocation-exceeds-pool",
        put("spec.transfer.poolBlocks", 2),
        "transfer.defaultAllocationTokens must fit in the pool",
    ),
    (
        "no-queue",
        put("spec.transfer.maxQueuedRequests", 0),
        "spec.transfer.maxQueuedRequests: Invalid value: 0",
    ),
    (
        "deepstack-layers-when-disabled",
        put("spec.deepstack.enabled", False),
        "deepstack.numLayers must be 0 when deepstack.enabled is false",
    ),
    (
        "deepstack-zero-layers-when-enabled",
        put("spec.deepstack.numLayers", 0),
        "deepstack.numLayers must be at least 1 when deepstack.enabled is true",
    ),
    ("model-missing", drop("spec.model"), "spec.model: Required value"),
    ("image-missing", drop("spec.runtime.image"), "spec.runtime.image: Required value"),
    (
        "model-path-relative",
        put("spec.model.path", "models/tiny"),
        "spec.model.path in body should match '^/.*[^/]$'",
    ),
    (
        "volume-two-sources",
        put(
            "spec.model.volume",
            {"persistentVolumeClaim": {"claimName": "models"}, "hostPath": {"path": "/data"}},
        ),
        "model.volume must set exactly one of persistentVolumeClaim or hostPath",
    ),
    (
        "model-path-outside-mount",
        both(
            put("spec.model.volume", {"persistentVolumeClaim": {"claimName": "models"}}),
            put("spec.model.path", "/weights/tiny"),
        ),
        "model.path must be inside model.mountPath when model.volume is set",
    ),
    (
        "reference-backend-with-rdma",
        both(put("spec.transfer.protocol", "rdma"), put("spec.transfer.rdmaDevices", ["auto"])),
        'runtime.backend "reference" runs on CPU and supports only transfer.protocol "tcp"',
    ),
    (
        "reference-backend-with-tensor-parallel",
        put("spec.language.tensorParallelSize", 2),
        'runtime.backend "reference" does not support tensor parallelism',
    ),
    (
        "encode-tensor-parallel",
        both(put("spec.runtime.backend", "sglang"), put("spec.encode.tensorParallelSize", 2)),
        "encode.tensorParallelSize must be 1: each encode pod runs the vision tower on one device",
    ),
    (
        "sglang-without-deepstack",
        both(
            put("spec.runtime.backend", "sglang"),
            put("spec.deepstack.enabled", False),
            put("spec.deepstack.numLayers", 0),
        ),
        'runtime.backend "sglang" needs deepstack.enabled',
    ),
    (
        "encode-extra-args",
        both(put("spec.runtime.backend", "sglang"), put("spec.encode.extraArgs", ["--x"])),
        "encode.extraArgs must be empty",
    ),
    (
        "reference-language-extra-args",
        put("spec.language.extraArgs", ["--mem-fraction-static", "0.5"]),
        'language.extraArgs are SGLang server arguments: only runtime.backend "sglang"',
    ),
    (
        "sglang-extra-args-set-what-the-resource-owns",
        both(
            put("spec.runtime.backend", "sglang"), put("spec.language.extraArgs", ["--tp-size=2"])
        ),
        "language.extraArgs may not set --model-path (--model), --tp-size",
    ),
    (
        "autoscaling-min-above-max",
        put("spec.autoscaling", {"encode": {"minReplicas": 4, "maxReplicas": 2}}),
        "autoscaling minReplicas must not exceed maxReplicas",
    ),
    (
        "replicas-above-autoscaling-max",
        both(
            put("spec.encode.replicas", 5),
            put("spec.autoscaling", {"encode": {"maxReplicas": 3}}),
        ),
        "encode.replicas must not exceed autoscaling.encode.maxReplicas",
    ),
    (
        "autoscaling-without-max",
        put("spec.autoscaling", {"language": {"minReplicas": 1}}),
        "spec.autoscaling.language.maxReplicas: Required value",
    ),
    (
        "name-too-long",
        put("metadata.name", "a" * 37),
        "metadata.name must be at most 36 characters",
    ),
    (
        "router-enabled-without-replicas",
        put("spec.router.replicas", 0),
        "router.replicas must be at least 1 when router.enabled is true",
    ),
    (
        "env-value-and-value-from",
        put(
            "spec.encode.env",
            [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}],
        ),
        "an env entry may set value or valueFrom, not both",
    ),
    (
        "env-duplicate-names",
        put("spec.language.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        'spec.language.env[1]: Duplicate value: {"name":"A"}',
    ),
    (
        "resource-quantity-malformed",
        put("spec.encode.resources", {"requests": {"cpu": "lots"}}),
        "spec.encode.resources.requests.cpu in body should match",
    ),
    (
        "transfer-timeout-below-handshake",
        both(
            put("spec.transfer.handshakeTimeoutSeconds", 30),
            put("spec.transfer.transferTimeoutSeconds", 5),
        ),
        "transfer.transferTimeoutSeconds must be at least transfer.handshakeTimeoutSeconds",
    ),
    (
        "write-timeout-not-below-transfer-timeout",
        put("spec.transfer.writeTimeoutSeconds", 60),
        "transfer.writeTimeoutSeconds must be below transfer.transferTimeoutSeconds",
    ),
    (
        "mooncake-ports-one-port",
        put("spec.transfer.mooncakePorts", {"min": 16000, "max": 16000}),
        "transfer.mooncakePorts needs at least two ports (min < max)",
    ),
    (
        "mooncake-ports-ephemeral",
        put("spec.transfer.mooncakePorts", {"min": 30000, "max": 40000}),
        "transfer.mooncakePorts.min and max must lie outside 32768-60999",
    ),
    (
        "mooncake-ports-hold-the-bootstrap-port",
        put("spec.transfer.mooncakePorts", {"min": 8990, "max": 9000}),
        "transfer.mooncakePorts must not hold the runtime's HTTP port (8000)",
    ),
    (
        "block-tokens-zero",
        put("spec.transfer.blockTokens", 0),
        "spec.transfer.blockTokens in body should be greater than or equal to 1",
    ),
    (
        "hidden-size-fractional",
        put("spec.deepstack.hiddenSize", 64.5),
        "spec.deepstack.hiddenSize in body must be of type integer",
    ),
    (
        "served-model-name-with-space",
        put("spec.model.servedModelName", "my model"),
        "spec.model.servedModelName in body should match",
    ),
    (
        "image-url-domain-is-a-url",
        put("spec.router.imageUrlDomains", ["images.example.com", "https://cdn.example.com"]),
        "each imageUrlDomains entry is a lower-case host name, *.domain, an IP address or a "
        "CIDR network",
    ),
    (
        "media-url-domain-is-a-url",
        put("spec.router.mediaUrlDomains", ["https://cdn.example.com"]),
        "each mediaUrlDomains entry is a lower-case host name, *.domain, an IP address or a "
        "CIDR network",
    ),
    (
        "one-video-frame",
        put("spec.router.limits", {"maxVideoFrames": 1}),
        "spec.router.limits.maxVideoFrames in body should be greater than or equal to 2",
    ),
    (
        "router-limit-zero",
        put("spec.router.limits", {"maxInflight": 0}),
        "spec.router.limits.maxInflight in body should be greater than or equal to 1",
    ),
    (
        "toleration-bad-operator",
        put("spec.encode.tolerations", [{"key": "gpu", "operator": "Maybe"}]),
        'spec.encode.tolerations[0].operator: Unsupported value: "Maybe"',
    ),
]


@pytest.mark.parametrize(
    ("mutate", "fragment"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_object_is_rejected(
    custom_api: Any,
    namespace: str,
    mutate: Callable[[Spec], None],
    fragment: str,
) -> None:
    body = minimal()
    mutate(body)
    with pytest.raises(ApiException) as caught:
        create(custom_api, namespace, body)
    error = caught.value
    assert error.status in (400, 422), error.body
    message = json.loads(str(error.body))["message"]
    assert fragment in message, message
    # Nothing was stored.
    listed: Spec = custom_api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    assert listed["items"] == []


def test_kubectl_shows_the_reason_for_a_rejected_object(crd: Cluster, namespace: str) -> None:
    body = minimal()
    body["spec"]["transfer"]["defaultAllocationTokens"] = 100
    result = crd.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(body), check=False)
    assert result.returncode != 0
    assert 'The DeepStackDisaggregation "tiny-qwen3-vl-moe" is invalid' in result.stderr
    assert "must be a whole number of blocks" in result.stderr


def test_kubectl_rejects_unknown_fields(crd: Cluster, namespace: str) -> None:
    body = minimal()
    body["spec"]["transfer"]["protocl"] = "tcp"
    result = crd.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(body), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.transfer.protocl"' in result.stderr


def test_invalid_update_is_rejected_and_object_kept(custom_api: Any, namespace: str) -> None:
    body = minimal()
    name = body["metadata"]["name"]
    create(custom_api, namespace, body)
    with pytest.raises(ApiException) as caught:
        custom_api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"transfer": {"blockTokens": 15}}}
        )
    assert "must be a whole number of blocks" in json.loads(str(caught.value.body))["message"]
    stored: Spec = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert stored["spec"]["transfer"]["blockTokens"] == 16
