"""Encode and language StatefulSets with their headless Services, and the router."""

from __future__ import annotations

from typing import Any

from deepstack_operator import names
from deepstack_operator.render.common import (
    Manifest,
    content_hash,
    cr_name,
    metadata,
    scaled_by_hpa,
    spec,
)
from deepstack_operator.render.config import revision
from deepstack_runtime.config import API_KEYS_FILE, CONFIG_DIR, CONFIG_FILE, RuntimeConfig

CONFIG_VOLUME = "runtime-config"
MODEL_VOLUME = "model"
RUNTIME_USER = 10001
# A deleted pod keeps serving this long before it is told to stop (SIGTERM, then it
# drains): time for its endpoint's removal to reach kube-proxy, DNS and the router, which
# re-resolves every second, so that no new request is sent to a pod that is stopping.
PRE_STOP_SECONDS = 5


def _ports(config: RuntimeConfig, role: str) -> list[dict[str, Any]]:
    ports = [
        {"name": "http", "containerPort": config.http_port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"},
    ]
    if role == "encode":
        ports.append(
            {
                "name": "bootstrap",
                "containerPort": config.transfer.bootstrap_port,
                "protocol": "TCP",
            }
        )
    return ports


def _env(role: str, config: RuntimeConfig, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}

    env: list[dict[str, Any]] = [
        {"name": "DEEPSTACK_ROLE", "value": role},
        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "POD_IP", "valueFrom": field("status.podIP")},
    ]
    if config.transfer.protocol == "rdma":
        env.append(
            {"name": "DEEPSTACK_RDMA_DEVICES", "value": ",".join(config.transfer.rdma_devices)}
        )
    ours = {e["name"] for e in env}
    # The user's variables come last; ours cannot be overridden (the runtime relies on them).
    return env + [e for e in extra if e["name"] not in ours]


def _api_keys(cr: Manifest, role: str) -> dict[str, Any] | None:
    """The router's router.apiKeySecret (none: no authentication)."""
    secret: dict[str, Any] | None = spec(cr).get("router", {}).get("apiKeySecret")
    return secret if role == names.ROUTER and secret else None


PROBE_TIMEOUT_SECONDS = 5
# router.limits -> the router's flags (deepstack_runtime.cli); unset: the router's defaults.
ROUTER_LIMIT_FLAGS = {
    "maxImages": "--max-images",
    "maxImagePixels": "--max-image-pixels",
    "maxVideoSeconds": "--max-video-seconds",
    "maxVideoFrames": "--max-video-frames",
    "maxVisualTokens": "--max-visual-tokens",
    "maxPromptTokens": "--max-prompt-tokens",
    "maxInflight": "--max-inflight",
}


def _args(cr: Manifest, role: str) -> list[str]:
    """The runtime's arguments: the router's limits and image URL allowlist; the
    language group's extraArgs (SGLang's)."""
    role_spec = spec(cr).get(role, {})
    if role != names.ROUTER:
        return list(role_spec.get("extraArgs", []))
    limits = role_spec.get("limits", {})
    args = [a for key, flag in ROUTER_LIMIT_FLAGS.items() if key in limits
            for a in (flag, str(limits[key]))]  # fmt: skip
    # mediaUrlDomains, and imageUrlDomains (its older name): merged, in order, once each.
    domains = [*role_spec.get("mediaUrlDomains", []), *role_spec.get("imageUrlDomains", [])]
    for domain in dict.fromkeys(domains):
        args += ["--image-url-domain", domain]
    if _api_keys(cr, role) is not None:
        args += ["--api-keys-file", API_KEYS_FILE]
    return args


def _security(protocol: str, transfers: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts: Pod Security "restricted", except that pods
    that transfer over RDMA (encode, language; never the router) need to pin memory
    (IPC_LOCK), which "restricted" forbids."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_USER,
        "runAsGroup": RUNTIME_USER,
        "fsGroup": RUNTIME_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    if protocol == "rdma" and transfers:
        container["capabilities"] = {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    return pod, container


def _resources(cr: Manifest, role: str, config: RuntimeConfig) -> dict[str, Any]:
    given = spec(cr).get(role, {}).get("resources", {})
    resources = {k: dict(v) for k, v in given.items() if v}
    if role not in names.ROLES:
        return resources  # the router: no GPU, no RDMA
    tp = (
        config.encode_tensor_parallel_size
        if role == "encode"
        else config.language_tensor_parallel_size
    )
    if config.backend == "sglang":
        # One GPU per tensor-parallel rank unless the user said otherwise.
        limits = resources.setdefault("limits", {})
        limits.setdefault("nvidia.com/gpu", tp)
    if config.transfer.protocol == "rdma":
        rdma = spec(cr)["transfer"].get("rdmaResourceName", "rdma/hca_shared_devices_a")
        resources.setdefault("limits", {}).setdefault(rdma, 1)
        resources.setdefault("requests", {}).setdefault(rdma, 1)
    return resources


def _volumes(
    cr: Manifest, config: RuntimeConfig, role: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    model = spec(cr)["model"]
    config_map = names.config_map_name(cr_name(cr), revision(cr, config))
    volumes: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    keys = _api_keys(cr, role)
    if keys is not None:
        # A file, not a variable: the kubelet swaps in a changed Secret, which the router
        # reads again (a rotated key takes effect without a restart).
        directory, file = API_KEYS_FILE.rsplit("/", 1)
        item = {"key": keys.get("key", "api-keys"), "path": file}
        volumes.append(
            {
                "name": "api-keys",
                "secret": {"secretName": keys["name"], "items": [item], "defaultMode": 0o440},
            }
        )
        mounts.append({"name": "api-keys", "mountPath": directory, "readOnly": True})
    volume = model.get("volume")
    if volume:
        # Read-only unless a claim asks otherwise (a runtime that writes a cache next to
        # the weights), and then only for the pods that run the model: the router only
        # reads the processor's settings. A hostPath is always read-only.
        read_only = True
        if "persistentVolumeClaim" in volume:
            pvc = volume["persistentVolumeClaim"]
            read_only = pvc.get("readOnly", True) or role not in names.ROLES
            source: dict[str, Any] = {
                "persistentVolumeClaim": {"claimName": pvc["claimName"], "readOnly": read_only}
            }
        else:
            source = {"hostPath": {"path": volume["hostPath"]["path"], "type": "Directory"}}
        volumes.append({"name": MODEL_VOLUME, **source})
        mounts.append(
            {
                "name": MODEL_VOLUME,
                "mountPath": model.get("mountPath", "/models"),
                "readOnly": read_only,
            }
        )
    return volumes, mounts


def _pod_template(cr: Manifest, role: str, config: RuntimeConfig) -> dict[str, Any]:
    s = spec(cr)
    role_spec = s.get(role, {})
    runtime = s["runtime"]
    pod_security, container_security = _security(
        config.transfer.protocol, transfers=role in names.ROLES
    )
    volumes, mounts = _volumes(cr, config, role)
    probe_http = {"path": "/health", "port": "http"}

    def probe(http_get: dict[str, Any]) -> dict[str, Any]:
        return {"httpGet": http_get, "timeoutSeconds": PROBE_TIMEOUT_SECONDS}

    # A router is ready once it has seen a pair of its own contract (servers/router.py).
    ready_http = {"path": "/ready" if role == names.ROUTER else "/health", "port": "http"}
    container: dict[str, Any] = {
        "name": "runtime",
        "image": runtime["image"],
        "imagePullPolicy": runtime.get("imagePullPolicy", "IfNotPresent"),
        # All of the pod's addresses: its IP for peers and probes, loopback for
        # `kubectl port-forward`. (The runtime's own default is loopback only.)
        "command": [
            *("deepstack-runtime", role, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"),
            *("--host", "0.0.0.0"),
        ],
        "args": _args(cr, role),
        "env": _env(role, config, role_spec.get("env", [])),
        "ports": _ports(config, role),
        # Loading weights can take minutes: the startup probe covers it, then the
        # liveness probe restarts a hung server and readiness gates traffic.
        # A busy pod may answer slowly (Kubernetes' default timeout is 1 s): a probe
        # that times out under load would take a serving pod out when it is most needed.
        "startupProbe": {**probe(probe_http), "periodSeconds": 5, "failureThreshold": 360},
        "readinessProbe": {**probe(ready_http), "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**probe(probe_http), "periodSeconds": 10, "failureThreshold": 6},
        "resources": _resources(cr, role, config),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "securityContext": container_security,
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security,
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 60,
        "enableServiceLinks": False,
        # No runtime server calls the Kubernetes API (the router finds pods by DNS).
        "automountServiceAccountToken": False,
    }
    if role == "language":
        pod_spec["readinessGates"] = [{"conditionType": names.TRANSFER_READY_GATE}]
    if runtime.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = runtime["serviceAccountName"]
    if runtime.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": x["name"]} for x in runtime["imagePullSecrets"]]
    for key in ("nodeSelector", "tolerations", "affinity"):
        if role_spec.get(key):
            pod_spec[key] = role_spec[key]
    return {
        "metadata": {
            "labels": {**names.common_labels(cr_name(cr), role), **revision_labels(cr, config)},
            # A changed runtime configuration rolls the pods.
            "annotations": {names.CONFIG_HASH_ANNOTATION: content_hash(config.to_json())},
        },
        "spec": pod_spec,
    }


def render_role_services(cr: Manifest, config: RuntimeConfig) -> list[Manifest]:
    out = []
    for role in names.ROLES:
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(cr, names.child_name(cr_name(cr), role), role),
                "spec": {
                    "clusterIP": "None",  # headless: one DNS record per ready pod
                    "selector": names.selector_labels(cr_name(cr), role),
                    "ports": [
                        {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]}
                        for p in _ports(config, role)
                    ],
                },
            }
        )
    return out


def revision_labels(cr: Manifest, config: RuntimeConfig) -> dict[str, str]:
    return {
        names.CONTRACT_LABEL: config.contract_hash(),
        names.REVISION_LABEL: revision(cr, config),
    }


def default_replicas(cr: Manifest) -> dict[str, int | None]:
    """Replicas per pod group as the spec gives them; None where an autoscaler decides."""
    s = spec(cr)
    by_hpa = scaled_by_hpa(cr)
    return {
        role: None if role in by_hpa else s.get(role, {}).get("replicas", 1) for role in names.ROLES
    }


def render_role_statefulsets(
    cr: Manifest, config: RuntimeConfig, replicas: dict[str, int | None] | None = None
) -> list[Manifest]:
    """The current revision's StatefulSet of each group (deepstack_operator.rollout);
    `replicas` (default: the spec's) as the rollout plan sizes them, None: the HPA's."""
    s = spec(cr)
    replicas = replicas or default_replicas(cr)
    max_unavailable = s.get("rollout", {}).get("maxUnavailable", 1)
    labels = revision_labels(cr, config)
    out = []
    for role in names.ROLES:
        sts_spec: dict[str, Any] = {
            "serviceName": names.child_name(cr_name(cr), role),
            "podManagementPolicy": "Parallel",
            "selector": {
                "matchLabels": {
                    **names.selector_labels(cr_name(cr), role),
                    names.REVISION_LABEL: labels[names.REVISION_LABEL],
                }
            },
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": max_unavailable},
            },
            "template": _pod_template(cr, role, config),
        }
        # With an autoscaler the HPA owns the replica count; do not fight it.
        if replicas.get(role) is not None:
            sts_spec["replicas"] = replicas[role]
        meta = metadata(cr, names.workload_name(cr_name(cr), role, revision(cr, config)), role)
        meta["labels"].update(labels)
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": meta,
                "spec": sts_spec,
            }
        )
    return out


def render_router(cr: Manifest, config: RuntimeConfig) -> list[Manifest]:
    router = spec(cr).get("router", {})
    if not router.get("enabled", True):
        return []
    name = names.child_name(cr_name(cr), names.ROUTER)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(cr, name, names.ROUTER),
        "spec": {
            "replicas": router.get("replicas", 1),
            "selector": {"matchLabels": names.selector_labels(cr_name(cr), names.ROUTER)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": _pod_template(cr, names.ROUTER, config),
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(cr, name, names.ROUTER),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(cr_name(cr), names.ROUTER),
            "ports": [{"name": "http", "port": router.get("port", 8000), "targetPort": "http"}],
        },
    }
    return [deployment, service]
