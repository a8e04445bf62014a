"""What a DeepStackDisaggregation asks for, read once per reconcile.

`desired_state(cr)` turns the object as the API server stores it (the CRD's defaults
applied: the CRD is the one source of defaults, so nothing here carries one) into a typed
`DesiredState`: the runtime configuration, its revision and contract, each group's
settings and replicas, the router's and the rollout's. Renderers, the planner and the
status read this, never the raw spec. A field a stored object must have and lacks (an
object stored before its default existed is defaulted on read, so only a broken object
gets here) is a ConfigError, reported as Degraded, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepstack_operator import names
from deepstack_runtime.config import ConfigError, RuntimeConfig, stable_digest

Manifest = dict[str, Any]

REVISION_LENGTH = 6  # hex digits: <name (<= 36)>-language-<6> fits a StatefulSet's 52
# The longest resource name whose children's names stay within Kubernetes' limits.
MAX_NAME_LENGTH = 36
# Pod placement fields copied as given onto each group's pods.
PLACEMENT_FIELDS = ("nodeSelector", "tolerations", "affinity")


@dataclass(frozen=True)
class GroupScaling:
    """autoscaling.<role>: the bounds an autoscaler (the HPA, or the operator's Load
    policy) keeps the group within."""

    min_replicas: int
    max_replicas: int
    target_cpu_percent: int
    target_requests_per_pod: float


@dataclass(frozen=True)
class PodSettings:
    """What a user sets on one kind of pod (a group's or the router's)."""

    env: tuple[Manifest, ...]
    resources: Manifest
    placement: Manifest  # nodeSelector, tolerations, affinity (only those given)
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupSpec:
    """One pod group (encode or language)."""

    replicas: int  # spec.<role>.replicas
    pods: PodSettings
    scaling: GroupScaling | None  # None: a fixed size


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: str


@dataclass(frozen=True)
class RouterSpec:
    enabled: bool
    replicas: int
    port: int
    limits: Manifest  # router.limits as given (the router's own defaults fill the rest)
    media_url_domains: tuple[str, ...]  # mediaUrlDomains then imageUrlDomains, each once
    api_key_secret: SecretKey | None
    pods: PodSettings


@dataclass(frozen=True)
class Autoscaling:
    policy: str  # HPA | Load
    ratio_min: float
    ratio_max: float
    scale_down_window_seconds: float


@dataclass(frozen=True)
class ModelMount:
    mount_path: str
    claim: str = ""  # model.volume.persistentVolumeClaim.claimName
    claim_read_only: bool = True
    host_path: str = ""  # model.volume.hostPath.path


@dataclass(frozen=True)
class DesiredState:
    name: str
    namespace: str
    uid: str
    config: RuntimeConfig
    revision: str  # what encode and language pods must share (rollout.py)
    contract: str  # the embedding contract's hash
    config_hash: str  # of the rendered runtime configuration: a change rolls the pods
    image: str
    image_pull_policy: str
    service_account: str
    image_pull_secrets: tuple[str, ...]
    model: ModelMount
    groups: dict[str, GroupSpec]  # encode, language
    router: RouterSpec
    autoscaling: Autoscaling | None  # None: no group is autoscaled
    max_unavailable: int
    network_policy: bool
    pod_monitor: bool
    rdma_resource_name: str
    # (api version, kind, name) of every object the pods need to exist already.
    references: tuple[tuple[str, str, str], ...]

    @property
    def scaled_by_hpa(self) -> frozenset[str]:
        """Groups a HorizontalPodAutoscaler sizes (autoscaling.policy HPA)."""
        return frozenset(self._scaled("HPA"))

    @property
    def scaled_by_load(self) -> frozenset[str]:
        """Groups the operator sizes from their load (autoscaling.policy Load)."""
        return frozenset(self._scaled("Load"))

    def _scaled(self, policy: str) -> list[str]:
        if self.autoscaling is None or self.autoscaling.policy != policy:
            return []
        return [role for role, group in self.groups.items() if group.scaling is not None]

    @property
    def spec_replicas(self) -> dict[str, int]:
        """Replicas per group as the spec gives them: an HPA-scaled group's minimum."""
        return {
            role: (
                group.scaling.min_replicas
                if group.scaling is not None and role in self.scaled_by_hpa
                else group.replicas
            )
            for role, group in self.groups.items()
        }

    @property
    def no_encoders(self) -> bool:
        """The encode group is held at zero (text only: there is no transfer to verify)."""
        encode = self.groups["encode"]
        return encode.scaling is None and encode.replicas == 0


def _pods(given: Manifest, with_args: bool) -> PodSettings:
    return PodSettings(
        env=tuple(given.get("env") or ()),
        resources={k: dict(v) for k, v in (given.get("resources") or {}).items() if v},
        placement={k: given[k] for k in PLACEMENT_FIELDS if given.get(k)},
        extra_args=tuple(given.get("extraArgs") or ()) if with_args else (),
    )


def _scaling(given: Manifest | None) -> GroupScaling | None:
    if given is None:
        return None
    return GroupScaling(
        min_replicas=int(given["minReplicas"]),
        max_replicas=int(given["maxReplicas"]),
        target_cpu_percent=int(given["targetCPUUtilizationPercentage"]),
        target_requests_per_pod=float(given["targetRequestsPerPod"]),
    )


def _model_mount(model: Manifest) -> ModelMount:
    volume = model.get("volume") or {}
    claim = volume.get("persistentVolumeClaim") or {}
    return ModelMount(
        mount_path=str(model["mountPath"]),
        claim=str(claim.get("claimName", "")),
        claim_read_only=bool(claim["readOnly"]) if claim else True,
        host_path=str((volume.get("hostPath") or {}).get("path", "")),
    )


def references(spec: Manifest, router_enabled: bool) -> tuple[tuple[str, str, str], ...]:
    refs: list[tuple[str, str, str]] = []
    runtime = spec["runtime"]
    for secret in runtime.get("imagePullSecrets") or []:
        refs.append(("v1", "Secret", secret["name"]))
    if runtime.get("serviceAccountName"):
        refs.append(("v1", "ServiceAccount", runtime["serviceAccountName"]))
    api_keys = spec["router"].get("apiKeySecret")
    if api_keys and router_enabled:
        refs.append(("v1", "Secret", api_keys["name"]))
    pvc = (spec["model"].get("volume") or {}).get("persistentVolumeClaim")
    if pvc:
        refs.append(("v1", "PersistentVolumeClaim", pvc["claimName"]))
    for role in names.ROLES:
        for env in spec[role].get("env") or []:
            source = env.get("valueFrom") or {}
            for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                ref = source.get(key) or {}
                if ref.get("name") and not ref.get("optional", False):
                    refs.append(("v1", kind, ref["name"]))
    return tuple(sorted(set(refs)))


def desired_state(cr: Manifest) -> DesiredState:
    """From the stored object. Raises ConfigError for a spec the runtime rejects (its
    message names the field)."""
    meta = cr["metadata"]
    try:
        return _read(cr)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{meta.get('name', '?')}: spec is missing or has a malformed field ({e!r}); "
            "is the CRD installed at this operator's version?"
        ) from e


def _read(cr: Manifest) -> DesiredState:
    meta, spec = cr["metadata"], cr["spec"]
    name, namespace = str(meta["name"]), str(meta["namespace"])
    if len(name) > MAX_NAME_LENGTH:  # the CRD says so; older objects
        raise ConfigError(
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters: a pod group's "
            'StatefulSet adds "-language-" and a 6-digit revision, and must stay within 52'
        )
    config = RuntimeConfig.from_spec(name, namespace, spec)
    runtime, router, model = spec["runtime"], spec["router"], spec["model"]
    autoscaling = spec.get("autoscaling") or {}
    image = str(runtime["image"])
    # Videos and images come from the same allowlist: the newer name first, each once.
    domains = [*router.get("mediaUrlDomains", []), *router.get("imageUrlDomains", [])]
    router_spec = RouterSpec(
        enabled=bool(router["enabled"]),
        replicas=int(router["replicas"]),
        port=int(router["port"]),
        limits=dict(router.get("limits") or {}),
        media_url_domains=tuple(dict.fromkeys(domains)),
        api_key_secret=(
            SecretKey(str(keys["name"]), str(keys["key"]))
            if (keys := router.get("apiKeySecret"))
            else None
        ),
        pods=_pods(router, with_args=False),
    )
    groups = {
        role: GroupSpec(
            replicas=int(spec[role]["replicas"]),
            pods=_pods(spec[role], with_args=True),
            scaling=_scaling(autoscaling.get(role)),
        )
        for role in names.ROLES
    }
    return DesiredState(
        name=name,
        namespace=namespace,
        uid=str(meta["uid"]),
        config=config,
        revision=stable_digest({"contract": config.contract(), "image": image})[:REVISION_LENGTH],
        contract=config.contract_hash(),
        config_hash=stable_digest(config.to_json())[:16],
        image=image,
        image_pull_policy=str(runtime["imagePullPolicy"]),
        service_account=str(runtime.get("serviceAccountName") or ""),
        image_pull_secrets=tuple(s["name"] for s in runtime.get("imagePullSecrets") or []),
        model=_model_mount(model),
        groups=groups,
        router=router_spec,
        autoscaling=Autoscaling(
            policy=str(autoscaling["policy"]),
            ratio_min=float(autoscaling["ratio"]["min"]),
            ratio_max=float(autoscaling["ratio"]["max"]),
            scale_down_window_seconds=float(autoscaling["scaleDownStabilizationSeconds"]),
        )
        if autoscaling
        else None,
        max_unavailable=int(spec["rollout"]["maxUnavailable"]),
        network_policy=bool(spec["networkPolicy"]["enabled"]),
        pod_monitor=bool(spec["monitoring"]["podMonitor"]),
        rdma_resource_name=str(spec["transfer"]["rdmaResourceName"]),
        references=references(spec, bool(router["enabled"])),
    )
