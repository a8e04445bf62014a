from __future__ import annotations

import pytest

from deepstack_runtime.config import ConfigError, RuntimeConfig
from devkit.specs import example


def test_round_trip_through_json(tmp_path: pytest.TempPathFactory) -> None:
    cr = example("qwen3-vl-moe-rdma")
    config = RuntimeConfig.from_spec("qwen3-vl-moe", "prod", cr["spec"])
    path = tmp_path / "config.json"  # type: ignore[operator]
    path.write_text(config.to_json())
    assert RuntimeConfig.from_file(path) == config
    assert config.transfer.rdma_devices == ("mlx5_0", "mlx5_1")
    assert config.language_tensor_parallel_size == 4
    assert config.endpoints.encode_service == "qwen3-vl-moe-encode.prod.svc"
    assert config.endpoints.router_url == "http://qwen3-vl-moe-router.prod.svc:8000"


def test_disabled_deepstack_sends_no_features() -> None:
    cr = example("minimal-cpu")
    cr["spec"]["deepstack"] = {
        "enabled": False,
        "numLayers": 0,
        "hiddenSize": 64,
        "dtype": "float32",
    }
    assert RuntimeConfig.from_spec("x", "y", cr["spec"]).deepstack.num_layers == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "cannot read runtime configuration"),
        ("[]", "expected a JSON object"),
        ('{"name": "x"}', "invalid runtime configuration"),
    ],
)
def test_bad_files_are_clear_errors(
    tmp_path: pytest.TempPathFactory, text: str, message: str
) -> None:
    path = tmp_path / "config.json"  # type: ignore[operator]
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig.from_file(path)


def test_transfer_settings_and_mooncake_follow_the_resource() -> None:
    from deepstack_runtime.servers.endpoint import transfer_settings

    cr = example("minimal-cpu")
    cr["spec"]["transfer"].update(
        checksum=False, writeTimeoutSeconds=20, mooncakePorts={"min": 16000, "max": 16001}
    )
    config = RuntimeConfig.from_spec("x", "y", cr["spec"])
    settings = transfer_settings(config)
    assert (settings.checksum, settings.write_seconds) == (False, 20)
    assert (config.transfer.mooncake_min_port, config.transfer.mooncake_max_port) == (16000, 16001)
    cr["spec"]["transfer"] = {}  # the resource's defaults, as the API server fills them
    defaults = transfer_settings(RuntimeConfig.from_spec("x", "y", cr["spec"]))
    assert defaults.checksum
    assert defaults.write_seconds == defaults.transfer_timeout / 2 == 30


@pytest.mark.parametrize(
    ("transfer", "message"),
    [
        ({"writeTimeoutSeconds": 60}, "writeTimeoutSeconds must be below"),
        ({"mooncakePorts": {"min": 15000, "max": 15000}}, "at least two ports"),
        ({"mooncakePorts": {"min": 30000, "max": 40000}}, "neither end in 32768-60999"),
        ({"mooncakePorts": {"min": 8990, "max": 9000}}, "must not hold the http, metrics"),
    ],
)
def test_bad_transfer_settings_are_clear_errors(transfer: dict[str, object], message: str) -> None:
    cr = example("minimal-cpu")
    cr["spec"]["transfer"].update(transfer)
    with pytest.raises(ConfigError, match=message):
        RuntimeConfig.from_spec("x", "y", cr["spec"])
