"""Encode and language StatefulSets with their headless Services, and the router."""

from __future__ import annotations

from typing import Any

from deepstack_operator import names
from deepstack_operator.desired import DesiredState, PodSettings, SecretKey
from deepstack_operator.render.common import Manifest, metadata, revision_labels
from deepstack_runtime.config import (
    API_KEYS_FILE,
    CONFIG_DIR,
    CONFIG_FILE,
    ROUTER_LIMIT_TABLE,
    RuntimeConfig,
)

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


def _api_keys(state: DesiredState, role: str) -> SecretKey | None:
    """The router's router.apiKeySecret (none: no authentication)."""
    secret = state.router.api_key_secret
    return secret if role == names.ROUTER and secret else None


PROBE_TIMEOUT_SECONDS = 5
# router.limits key -> its row of the one table of the router's limits (its flag,
# deepstack_runtime.cli's, and its default); unset or at its default: no flag, the router's
# own default (the same; the API server fills the CRD's in).
ROUTER_LIMIT_FLAGS = {limit.crd_key: limit for limit in ROUTER_LIMIT_TABLE if limit.crd_key}


def _args(state: DesiredState, role: str) -> list[str]:
    """The runtime's arguments: the router's limits and media URL allowlist; the
    language group's extraArgs (SGLang's)."""
    if role != names.ROUTER:
        return list(state.groups[role].pods.extra_args)
    limits = state.router.limits
    args = [a for key, limit in ROUTER_LIMIT_FLAGS.items()
            if limits.get(key, limit.default) != limit.default
            for a in (limit.flag, str(limits[key]))]  # fmt: skip
    for domain in state.router.media_url_domains:
        args += ["--image-url-domain", domain]
    if _api_keys(state, role) is not None:
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


def _resources(state: DesiredState, role: str) -> dict[str, Any]:
    config = state.config
    resources = {k: dict(v) for k, v in _pod_settings(state, role).resources.items()}
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
        rdma = state.rdma_resource_name
        resources.setdefault("limits", {}).setdefault(rdma, 1)
        resources.setdefault("requests", {}).setdefault(rdma, 1)
    return resources


def _volumes(state: DesiredState, role: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    config_map = names.config_map_name(state.name, state.revision)
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
    keys = _api_keys(state, role)
    if keys is not None:
        # A file, not a variable: the kubelet swaps in a changed Secret, which the router
        # reads again (a rotated key takes effect without a restart).
        directory, file = API_KEYS_FILE.rsplit("/", 1)
        item = {"key": keys.key, "path": file}
        volumes.append(
            {
                "name": "api-keys",
                "secret": {"secretName": keys.name, "items": [item], "defaultMode": 0o440},
            }
        )
        mounts.append({"name": "api-keys", "mountPath": directory, "readOnly": True})
    model = state.model
    if model.claim or model.host_path:
        # Read-only unless a claim asks otherwise (a runtime that writes a cache next to
        # the weights), and then only for the pods that run the model: the router only
        # reads the processor's settings. A hostPath is always read-only.
        read_only = True
        if model.claim:
            read_only = model.claim_read_only or role not in names.ROLES
            source: dict[str, Any] = {
                "persistentVolumeClaim": {"claimName": model.claim, "readOnly": read_only}
            }
        else:
            source = {"hostPath": {"path": model.host_path, "type": "Directory"}}
        volumes.append({"name": MODEL_VOLUME, **source})
        mounts.append(
            {
                "name": MODEL_VOLUME,
                "mountPath": state.model.mount_path,
                "readOnly": read_only,
            }
        )
    return volumes, mounts


def _pod_settings(state: DesiredState, role: str) -> PodSettings:
    return state.router.pods if role == names.ROUTER else state.groups[role].pods


def _pod_template(state: DesiredState, role: str) -> dict[str, Any]:
    config = state.config
    settings = _pod_settings(state, role)
    pod_security, container_security = _security(
        config.transfer.protocol, transfers=role in names.ROLES
    )
    volumes, mounts = _volumes(state, role)
    probe_http = {"path": "/health", "port": "http"}

    def probe(http_get: dict[str, Any]) -> dict[str, Any]:
        return {"httpGet": http_get, "timeoutSeconds": PROBE_TIMEOUT_SECONDS}

    # A router is ready once it has seen a pair of its own contract (servers/router.py).
    ready_http = {"path": "/ready" if role == names.ROUTER else "/health", "port": "http"}
    container: dict[str, Any] = {
        "name": "runtime",
        "image": state.image,
        "imagePullPolicy": state.image_pull_policy,
        # All of the pod's addresses: its IP for peers and probes, loopback for
        # `kubectl port-forward`. (The runtime's own default is loopback only.)
        "command": [
            *("deepstack-runtime", role, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"),
            *("--host", "0.0.0.0"),
        ],
        "args": _args(state, role),
        "env": _env(role, config, list(settings.env)),
        "ports": _ports(config, role),
        # Loading weights can take minutes: the startup probe covers it, then the
        # liveness probe restarts a hung server and readiness gates traffic.
        # A busy pod may answer slowly (Kubernetes' default timeout is 1 s): a probe
        # that times out under load would take a serving pod out when it is most needed.
        "startupProbe": {**probe(probe_http), "periodSeconds": 5, "failureThreshold": 360},
        "readinessProbe": {**probe(ready_http), "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**probe(probe_http), "periodSeconds": 10, "failureThreshold": 6},
        "resources": _resources(state, role),
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
    if state.service_account:
        pod_spec["serviceAccountName"] = state.service_account
    if state.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in state.image_pull_secrets]
    pod_spec.update(settings.placement)
    return {
        "metadata": {
            "labels": {**names.common_labels(state.name, role), **revision_labels(state)},
            # A changed runtime configuration rolls the pods.
            "annotations": {names.CONFIG_HASH_ANNOTATION: state.config_hash},
        },
        "spec": pod_spec,
    }


def render_role_services(state: DesiredState) -> list[Manifest]:
    out = []
    for role in names.ROLES:
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(state, names.child_name(state.name, role), role),
                "spec": {
                    "clusterIP": "None",  # headless: one DNS record per ready pod
                    "selector": names.selector_labels(state.name, role),
                    "ports": [
                        {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]}
                        for p in _ports(state.config, role)
                    ],
                },
            }
        )
    return out


def render_role_statefulsets(
    state: DesiredState, replicas: dict[str, int | None] | None = None
) -> list[Manifest]:
    """The current revision's StatefulSet of each group (deepstack_operator.rollout);
    `replicas` (default: the spec's) as the rollout plan sizes them, None: the HPA's."""
    if replicas is None:
        replicas = {
            role: None if role in state.scaled_by_hpa else count
            for role, count in state.spec_replicas.items()
        }
    labels = revision_labels(state)
    out = []
    for role in names.ROLES:
        sts_spec: dict[str, Any] = {
            "serviceName": names.child_name(state.name, role),
            "podManagementPolicy": "Parallel",
            "selector": {
                "matchLabels": {
                    **names.selector_labels(state.name, role),
                    names.REVISION_LABEL: labels[names.REVISION_LABEL],
                }
            },
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": state.max_unavailable},
            },
            "template": _pod_template(state, role),
        }
        # With an autoscaler the HPA owns the replica count; do not fight it.
        if replicas.get(role) is not None:
            sts_spec["replicas"] = replicas[role]
        meta = metadata(state, names.workload_name(state.name, role, state.revision), role)
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


def render_router(state: DesiredState) -> list[Manifest]:
    router = state.router
    if not router.enabled:
        return []
    name = names.child_name(state.name, names.ROUTER)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(state, name, names.ROUTER),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": names.selector_labels(state.name, names.ROUTER)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": _pod_template(state, names.ROUTER),
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(state, name, names.ROUTER),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(state.name, names.ROUTER),
            "ports": [{"name": "http", "port": router.port, "targetPort": "http"}],
        },
    }
    return [deployment, service]
