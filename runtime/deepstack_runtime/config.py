"""The runtime configuration: what the operator renders into each pod's ConfigMap and the
runtime servers read. Shared by both sides, so it imports nothing heavy (no torch, no
Mooncake, no Kubernetes client): the operator's image stays small.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("sglang", "reference")
PROTOCOLS = ("tcp", "rdma")
DTYPES = ("bfloat16", "float16", "float32")

HTTP_PORT = 8000  # every runtime server's API port inside the pod
DEFAULT_ENCODE_CACHE_MIB = 1024
# Mooncake's own range for the ports it listens on (its handshake RPC port and, over
# tcp, its data port); it refuses ports of Linux's ephemeral range.
MOONCAKE_PORTS = (15000, 17000)
EPHEMERAL_PORTS = (32768, 60999)
CONFIG_DIR = "/etc/deepstack"
CONFIG_FILE = "config.json"
# The version of the messages the router, encode and language pods exchange
# (transfer/protocol.py, the language pod's /v1/generate): raise it with any change to
# them, so that old and new pods are never paired. 2: sampling, n choices, steps. 3: images
# as bytes to encode pods (servers/wire.py).
WIRE_VERSION = 3
CONTRACT_HASH_LENGTH = 10
# The router's API keys (router.apiKeySecret), one per line: the operator mounts the
# Secret's key as this file, which the router re-reads when the kubelet updates it.
API_KEYS_FILE = "/etc/deepstack-api-keys/keys"


@dataclass(frozen=True)
class TransferKnob:
    """One of the resource's spec.transfer knobs: where the CRD has it (dotted, under
    spec.transfer), the TransferConfig field that holds it, the TransferSettings field it
    becomes in the transfer ("": none) and its default, which the CRD's must equal
    (tests/unit/test_defaults.py); None: the CRD has no default."""

    crd_path: str
    field: str
    default: Any
    settings: str = ""


# The one table of the transfer knobs: TransferConfig's defaults, RuntimeConfig.from_spec
# and TransferSettings (its defaults, TransferSettings.from_config) all come from it.
TRANSFER_KNOBS = (
    TransferKnob("protocol", "protocol", "tcp"),
    TransferKnob("rdmaDevices", "rdma_devices", ()),
    TransferKnob("blockTokens", "block_tokens", 256),
    TransferKnob("defaultAllocationTokens", "default_allocation_tokens", 4096, "default_tokens"),
    TransferKnob("poolBlocks", "pool_blocks", 1024),
    TransferKnob("bootstrapPort", "bootstrap_port", 8998),
    TransferKnob("handshakeTimeoutSeconds", "handshake_timeout_seconds", 10, "handshake_timeout"),
    TransferKnob("transferTimeoutSeconds", "transfer_timeout_seconds", 60, "transfer_timeout"),
    # One Mooncake write (also MC_TRANSFER_TIMEOUT); None: half of transfer_timeout_seconds.
    TransferKnob("writeTimeoutSeconds", "write_timeout_seconds", None, "write_timeout"),
    TransferKnob("maxQueuedRequests", "max_queued_requests", 64, "max_queued"),
    TransferKnob("resumption.maxRounds", "resume_max_rounds", 8, "max_rounds"),
    TransferKnob("resumption.timeoutSeconds", "resume_timeout_seconds", 30, "resume_timeout"),
    TransferKnob("checksum", "checksum", True, "checksum"),
    TransferKnob("mooncakePorts.min", "mooncake_min_port", MOONCAKE_PORTS[0]),
    TransferKnob("mooncakePorts.max", "mooncake_max_port", MOONCAKE_PORTS[1]),
)
# TransferConfig field -> its default.
TRANSFER_DEFAULTS: dict[str, Any] = {knob.field: knob.default for knob in TRANSFER_KNOBS}


@dataclass(frozen=True)
class RouterLimit:
    """One of the router's limits per request (or per router): its RouterOptions field,
    type, default and help, and its key under the resource's spec.router.limits ("": the
    resource does not expose it). Its flag is the field's name, dashed."""

    option: str
    type: type[int] | type[float]
    default: int | float
    help: str
    crd_key: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


# The one table of the router's limits: RouterOptions' defaults, the router's flags
# (deepstack_runtime.cli) and the operator's rendering of router.limits come from it; the
# CRD's defaults must equal it (tests/unit/test_defaults.py).
ROUTER_LIMIT_TABLE = (
    RouterLimit("max_images", int, 8, "images and videos in one request", "maxImages"),
    RouterLimit(
        "max_image_pixels",
        int,
        4096 * 4096,
        "pixels of one image or video frame",
        "maxImagePixels",
    ),
    RouterLimit("max_video_seconds", float, 120.0, "seconds of one video", "maxVideoSeconds"),
    RouterLimit("max_video_frames", int, 768, "frames sampled from one video", "maxVideoFrames"),
    RouterLimit("max_visual_tokens", int, 16384, "visual tokens of one request", "maxVisualTokens"),
    RouterLimit("max_prompt_tokens", int, 4096, "tokens of one prompt", "maxPromptTokens"),
    RouterLimit("max_inflight", int, 256, "requests at once (beyond: 429)", "maxInflight"),
    RouterLimit(
        "instance_wait_seconds",
        float,
        5.0,
        "how long a request waits for a healthy pair when there is none",
    ),
    RouterLimit(
        "queue_wait_seconds",
        float,
        30.0,
        "how long a request waits for a pair with room when all are busy",
    ),
)
# RouterOptions field -> its default.
ROUTER_LIMIT_DEFAULTS: dict[str, Any] = {
    limit.option: limit.default for limit in ROUTER_LIMIT_TABLE
}


def stable_digest(value: Any) -> str:
    """The sha256 (hex) of JSON-able `value` as compact JSON with sorted keys: the same for
    equal content whatever its keys' order."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


class ConfigError(ValueError):
    """A configuration the runtime cannot run with; the message says which field and why."""


@dataclass(frozen=True)
class ModelConfig:
    path: str
    served_model_name: str
    encoder_path: str = ""

    @property
    def encoder_checkpoint(self) -> str:
        return self.encoder_path or self.path


@dataclass(frozen=True)
class DeepStackConfig:
    num_layers: int = 3
    hidden_size: int = 2048
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class TransferConfig:
    """spec.transfer; every default from TRANSFER_KNOBS."""

    protocol: str = TRANSFER_DEFAULTS["protocol"]
    rdma_devices: tuple[str, ...] = TRANSFER_DEFAULTS["rdma_devices"]
    block_tokens: int = TRANSFER_DEFAULTS["block_tokens"]
    default_allocation_tokens: int = TRANSFER_DEFAULTS["default_allocation_tokens"]
    pool_blocks: int = TRANSFER_DEFAULTS["pool_blocks"]
    bootstrap_port: int = TRANSFER_DEFAULTS["bootstrap_port"]
    handshake_timeout_seconds: int = TRANSFER_DEFAULTS["handshake_timeout_seconds"]
    transfer_timeout_seconds: int = TRANSFER_DEFAULTS["transfer_timeout_seconds"]
    # One Mooncake write (also MC_TRANSFER_TIMEOUT); None: half of transfer_timeout_seconds.
    write_timeout_seconds: int | None = TRANSFER_DEFAULTS["write_timeout_seconds"]
    max_queued_requests: int = TRANSFER_DEFAULTS["max_queued_requests"]
    resume_max_rounds: int = TRANSFER_DEFAULTS["resume_max_rounds"]
    resume_timeout_seconds: int = TRANSFER_DEFAULTS["resume_timeout_seconds"]
    checksum: bool = TRANSFER_DEFAULTS["checksum"]
    mooncake_min_port: int = TRANSFER_DEFAULTS["mooncake_min_port"]
    mooncake_max_port: int = TRANSFER_DEFAULTS["mooncake_max_port"]

    @classmethod
    def from_spec(cls, transfer: dict[str, Any]) -> TransferConfig:
        """From the resource's spec.transfer: each knob at its CRD path, else its default."""
        values: dict[str, Any] = {}
        for knob in TRANSFER_KNOBS:
            *parents, key = knob.crd_path.split(".")
            node = transfer
            for parent in parents:
                node = node.get(parent, {})
            value = node.get(key, knob.default)
            values[knob.field] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


@dataclass(frozen=True)
class Endpoints:
    """How the roles find each other: headless Services resolve to pod IPs."""

    encode_service: str = ""
    language_service: str = ""
    router_url: str = ""


@dataclass(frozen=True)
class RuntimeConfig:
    name: str
    namespace: str
    backend: str
    model: ModelConfig
    deepstack: DeepStackConfig = field(default_factory=DeepStackConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    endpoints: Endpoints = field(default_factory=Endpoints)
    http_port: int = HTTP_PORT
    metrics_port: int = 9090
    encode_tensor_parallel_size: int = 1
    language_tensor_parallel_size: int = 1
    # The encode pods' embedding cache (encode.embeddingCache.sizeMiB); 0: off.
    encode_cache_mib: int = DEFAULT_ENCODE_CACHE_MIB

    @property
    def encode_cache_bytes(self) -> int:
        return self.encode_cache_mib << 20

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks a schema cannot express; raises ConfigError with a readable message."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for label, path in (
            ("model.path", self.model.path),
            ("model.encoderPath", self.model.encoder_path),
        ):
            if path and (not path.startswith("/") or ".." in Path(path).parts):
                raise ConfigError(f"{label} must be an absolute path without '..', got {path!r}")
        if self.transfer.protocol not in PROTOCOLS:
            raise ConfigError(f"transfer.protocol must be one of {PROTOCOLS}")
        if self.transfer.protocol == "rdma" and not self.transfer.rdma_devices:
            raise ConfigError('transfer.protocol "rdma" needs transfer.rdmaDevices')
        if self.deepstack.dtype not in DTYPES:
            raise ConfigError(f"deepstack.dtype must be one of {DTYPES}")
        if self.transfer.default_allocation_tokens % self.transfer.block_tokens:
            raise ConfigError("transfer.defaultAllocationTokens must be a multiple of blockTokens")
        t = self.transfer
        if (t.write_timeout_seconds or 0) >= t.transfer_timeout_seconds:
            raise ConfigError(
                "transfer.writeTimeoutSeconds must be below transfer.transferTimeoutSeconds"
            )
        ports = {self.http_port, self.metrics_port, self.transfer.bootstrap_port}
        if len(ports) != 3:
            raise ConfigError(
                f"ports must differ: http {self.http_port}, metrics {self.metrics_port}, "
                f"bootstrap {self.transfer.bootstrap_port}"
            )
        low, high = t.mooncake_min_port, t.mooncake_max_port
        if not 1024 <= low < high <= 65535 or any(
            EPHEMERAL_PORTS[0] <= p <= EPHEMERAL_PORTS[1] for p in (low, high)
        ):
            raise ConfigError(
                f"transfer.mooncakePorts {low}-{high}: at least two ports in 1024-65535, "
                f"neither end in {EPHEMERAL_PORTS[0]}-{EPHEMERAL_PORTS[1]} (Mooncake "
                "ignores such a range)"
            )
        if any(low <= p <= high for p in ports):
            raise ConfigError(
                f"transfer.mooncakePorts {low}-{high} must not hold the http, metrics or "
                "bootstrap port"
            )

    # --- the embedding contract ---------------------------------------------------------

    def contract(self) -> dict[str, Any]:
        """What an encode pod and a language pod must agree on for embeddings to move
        between them: the same model, the same buffer layout, the same wire protocol.
        Anything else (ports, timeouts, pool sizes) may differ between the two."""
        return {
            "model": self.model.path,
            "encoder": self.model.encoder_checkpoint,
            "hidden_size": self.deepstack.hidden_size,
            "deepstack_layers": self.deepstack.num_layers,
            "dtype": self.deepstack.dtype,
            "block_tokens": self.transfer.block_tokens,
            "protocol": self.transfer.protocol,
            "wire_version": WIRE_VERSION,
        }

    def contract_hash(self) -> str:
        """Short, stable name of the contract (a label value; DNS-safe hex)."""
        return stable_digest(self.contract())[:CONTRACT_HASH_LENGTH]

    # --- (de)serialisation -------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        try:
            transfer = dict(data.get("transfer", {}))
            transfer["rdma_devices"] = tuple(transfer.get("rdma_devices", ()))
            return cls(
                name=data["name"],
                namespace=data["namespace"],
                backend=data["backend"],
                model=ModelConfig(**data["model"]),
                deepstack=DeepStackConfig(**data.get("deepstack", {})),
                transfer=TransferConfig(**transfer),
                endpoints=Endpoints(**data.get("endpoints", {})),
                **{
                    k: data[k]
                    for k in (
                        "http_port",
                        "metrics_port",
                        "encode_tensor_parallel_size",
                        "language_tensor_parallel_size",
                        "encode_cache_mib",
                    )
                    if k in data
                },
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid runtime configuration: {e}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> RuntimeConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read runtime configuration {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_spec(cls, name: str, namespace: str, spec: dict[str, Any]) -> RuntimeConfig:
        """From a DeepStackDisaggregation's spec, as stored (defaults applied)."""
        model, deepstack, transfer = (
            spec["model"],
            spec.get("deepstack", {}),
            spec.get("transfer", {}),
        )
        router = spec.get("router", {})
        router_port = router.get("port", HTTP_PORT)
        return cls(
            name=name,
            namespace=namespace,
            backend=spec["runtime"].get("backend", "sglang"),
            model=ModelConfig(
                path=model["path"],
                served_model_name=model["servedModelName"],
                encoder_path=model.get("encoderPath", ""),
            ),
            deepstack=DeepStackConfig(
                num_layers=deepstack.get("numLayers", 3) if deepstack.get("enabled", True) else 0,
                hidden_size=deepstack.get("hiddenSize", 2048),
                dtype=deepstack.get("dtype", "bfloat16"),
            ),
            transfer=TransferConfig.from_spec(transfer),
            endpoints=Endpoints(
                encode_service=f"{name}-encode.{namespace}.svc",
                language_service=f"{name}-language.{namespace}.svc",
                router_url=(
                    f"http://{name}-router.{namespace}.svc:{router_port}"
                    if router.get("enabled", True)
                    else ""
                ),
            ),
            metrics_port=spec.get("monitoring", {}).get("metricsPort", 9090),
            encode_tensor_parallel_size=spec.get("encode", {}).get("tensorParallelSize", 1),
            encode_cache_mib=spec.get("encode", {})
            .get("embeddingCache", {})
            .get("sizeMiB", DEFAULT_ENCODE_CACHE_MIB),
            language_tensor_parallel_size=spec.get("language", {}).get("tensorParallelSize", 1),
        )
