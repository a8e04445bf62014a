from __future__ import annotations

import pytest

from deepstack_runtime.backends.sglang_launcher import bootstrap_urls, sglang_command
from deepstack_runtime.config import RuntimeConfig
from tests.support.specs import example


def config(transfer: dict[str, object] | None = None) -> RuntimeConfig:
    cr = example("qwen3-vl-moe-rdma")
    cr["spec"]["transfer"].update(transfer or {})
    return RuntimeConfig.from_spec("qwen3-vl-moe", "prod", cr["spec"])


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_encoder_command() -> None:
    cmd = sglang_command(config(), "encode")
    assert cmd[:3] == ["python3", "-m", "sglang.launch_server"]
    assert "--encoder-only" in cmd
    assert "--language-only" not in cmd
    assert flag(cmd, "--model-path") == "/models/Qwen3-VL-30B-A3B-Instruct"
    assert flag(cmd, "--tp-size") == "1"
    assert flag(cmd, "--encoder-transfer-backend") == "mooncake"
    assert flag(cmd, "--mooncake-ib-device") == "mlx5_0,mlx5_1"


def test_language_command_with_extra_args() -> None:
    cmd = sglang_command(config(), "language", ["--mem-fraction-static", "0.85"])
    assert "--language-only" in cmd
    assert flag(cmd, "--tp-size") == "4"
    assert flag(cmd, "--encoder-bootstrap-port") == "8998"
    assert cmd[-2:] == ["--mem-fraction-static", "0.85"]


@pytest.mark.parametrize(
    "transfer", [{"rdmaDevices": ["auto"]}, {"protocol": "tcp", "rdmaDevices": []}]
)
def test_auto_devices_and_tcp_leave_detection_to_mooncake(transfer: dict[str, object]) -> None:
    cmd = sglang_command(config(transfer), "encode")
    assert "--mooncake-ib-device" not in cmd


def test_router_is_not_an_sglang_role() -> None:
    with pytest.raises(ValueError, match="not 'router'"):
        sglang_command(config(), "router")


def test_bootstrap_urls_are_unique_and_sorted() -> None:
    assert bootstrap_urls(["10.0.0.2", "10.0.0.1", "10.0.0.2"], 8998) == [
        "http://10.0.0.1:8998",
        "http://10.0.0.2:8998",
    ]
