from __future__ import annotations

import pytest

from deepstack_runtime.config import ConfigError, RuntimeConfig
from tests.support.specs import example


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
