"""The sglang backend against SGLang 0.5.23's own code (installed without its GPU
dependencies in .venv-sglang by `make sglang-env`): its server-argument parser accepts
what the launcher renders, and its EncoderBootstrapServer sees the encoder register,
again after a language pod appears or restarts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from deepstack_runtime.backends.sglang_launcher import keep_registered, sglang_command
from deepstack_runtime.config import RuntimeConfig
from tests.support.cluster import REPO, wait_for
from tests.support.operator import free_port
from tests.support.runtime import get
from tests.support.specs import example

SGLANG_PYTHON = str(REPO / ".venv-sglang" / "bin" / "python")
PARSE = textwrap.dedent(
    """
    import json, sys
    from sglang.srt.server_args import prepare_server_args
    a = prepare_server_args(sys.argv[1:])
    print(json.dumps({k: getattr(a, k) for k in (
        "model_path", "served_model_name", "tp_size", "encoder_only", "language_only",
        "encoder_transfer_backend", "encoder_bootstrap_port", "mooncake_ib_device", "port")}))
    """
)


def parse(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    args = cmd[cmd.index("sglang.launch_server") + 1 :]
    return subprocess.run(
        [SGLANG_PYTHON, "-c", PARSE, *args], capture_output=True, text=True, timeout=120
    )


def config(stem: str, **transfer: object) -> RuntimeConfig:
    cr = example(stem)
    cr["spec"]["runtime"]["backend"] = "sglang"
    cr["spec"]["transfer"].update(transfer)
    return RuntimeConfig.from_spec("qwen3-vl-moe", "prod", cr["spec"])


VARIANTS = {
    "rdma-devices": config("qwen3-vl-moe-rdma"),
    "rdma-auto": config("qwen3-vl-moe-rdma", rdmaDevices=["auto"]),
    "tcp": config("qwen3-vl-moe-rdma", protocol="tcp", rdmaDevices=[]),
}


@pytest.mark.parametrize("role", ["encode", "language"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sglang_accepts_the_rendered_command_line(variant: str, role: str) -> None:
    cfg = VARIANTS[variant]
    result = parse(sglang_command(cfg, role, ["--mem-fraction-static", "0.85"]))
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["encoder_only"] is (role == "encode")
    assert parsed["language_only"] is (role == "language")
    assert parsed["encoder_transfer_backend"] == "mooncake"
    assert parsed["tp_size"] == (1 if role == "encode" else 4)
    assert parsed["served_model_name"] == "qwen3-vl"
    assert parsed["port"] == 8000
    if role == "language":
        assert parsed["encoder_bootstrap_port"] == 8998
    want_devices = "mlx5_0,mlx5_1" if variant == "rdma-devices" else None
    assert parsed["mooncake_ib_device"] == want_devices


def test_sglang_rejects_a_bad_extra_argument() -> None:
    result = parse(sglang_command(VARIANTS["tcp"], "language", ["--tp-size", "two"]))
    assert result.returncode == 2
    assert "invalid int value: 'two'" in result.stderr


BOOTSTRAP = textwrap.dedent(
    """
    import sys, time
    from sglang.srt.disaggregation.encoder.receiver import EncoderBootstrapServer
    server = EncoderBootstrapServer("127.0.0.1", int(sys.argv[1]), health_check_interval=0)
    sys.stdin.read()  # until the test closes our stdin
    """
)


@contextmanager
def language_pod(port: int) -> Iterator[str]:
    """SGLang's real EncoderBootstrapServer, as a language pod runs it."""
    process = subprocess.Popen(
        [SGLANG_PYTHON, "-c", BOOTSTRAP, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _listed(url) is not None, timeout=120, what=f"bootstrap server {url}")
        yield url
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.terminate()
        process.wait(30)


def _listed(url: str) -> list[str] | None:
    try:
        status, body = get(f"{url}/list_encoder_urls")
    except OSError:
        return None
    return json.loads(body)["encoder_urls"] if status == 200 else None


def test_encoder_registers_with_language_pods_as_they_come_and_restart() -> None:
    me = "http://10.1.2.3:8000"
    port_a, port_b = free_port(), free_port()
    pods: list[str] = []

    async def discover() -> list[str]:
        return list(pods)

    def one_round() -> None:
        asyncio.run(keep_registered(me, discover, interval=0, rounds=1))

    with language_pod(port_a) as a:
        pods.append(a)
        one_round()
        assert _listed(a) == [me]
        with language_pod(port_b) as b:  # the language group scaled up
            pods.append(b)
            one_round()
            assert _listed(b) == [me]
            assert _listed(a) == [me]  # not registered twice
        pods.remove(b)
    with language_pod(port_a) as a:  # the same pod, restarted: it forgot us
        assert _listed(a) == []
        one_round()
        assert _listed(a) == [me]
