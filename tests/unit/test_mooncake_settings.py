"""What the runtime's configuration becomes for Mooncake (pure functions; the Mooncake
tests check that Mooncake follows them)."""

from __future__ import annotations

import pytest

from deepstack_runtime.transfer.mooncake import device_filter, mooncake_environment


@pytest.mark.parametrize(
    ("devices", "passed"),
    [
        ("auto", ""),  # no filter: every device Mooncake finds
        ("mlx5_0", "mlx5_0"),
        ("mlx5_0,mlx5_1", "mlx5_0,mlx5_1"),
        ("", ""),
    ],
)
def test_rdma_devices_auto_is_mooncakes_own_detection(devices: str, passed: str) -> None:
    assert device_filter(devices) == passed


def test_mooncake_environment_carries_the_write_timeout_and_the_port_range() -> None:
    assert mooncake_environment(30.0, (15000, 17000)) == {
        "MC_TRANSFER_TIMEOUT": "30",
        "MC_MIN_RPC_PORT": "15000",
        "MC_MAX_RPC_PORT": "17000",
    }
    assert mooncake_environment(2.5, None) == {"MC_TRANSFER_TIMEOUT": "3"}
    assert mooncake_environment(None, None) == {}
