"""The `sglang` backend, step one: a launcher around SGLang's own encoder/language
disaggregation (`--encoder-only` / `--language-only`, Mooncake transfer backend).

  sglang_command(...)      the SGLang command line of a pod (pure)
  keep_registered(...)     encode pods: register with every language pod's
                           EncoderBootstrapServer, again whenever one appears or restarts,
                           so scaling the language group needs no encoder restart
  run_sglang(...)          runs SGLang as a child process (signals forwarded) beside it

SGLang is imported nowhere here: it runs as its own process, so nothing in the CPU test
suite needs CUDA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence

import aiohttp

from deepstack_runtime.config import RuntimeConfig

log = logging.getLogger(__name__)

Discover = Callable[[], Awaitable[list[str]]]


def sglang_command(
    config: RuntimeConfig, role: str, extra_args: Sequence[str] = (), python: str = "python3"
) -> list[str]:
    """The command line of the SGLang server for `role` (encode or language)."""
    if role not in ("encode", "language"):
        raise ValueError(f"SGLang serves encode and language, not {role!r}")
    encode = role == "encode"
    tp = config.encode_tensor_parallel_size if encode else config.language_tensor_parallel_size
    cmd = [
        python, "-m", "sglang.launch_server",
        "--model-path", config.model.encoder_checkpoint if encode else config.model.path,
        "--served-model-name", config.model.served_model_name,
        "--host", "0.0.0.0",
        "--port", str(config.http_port),
        "--tp-size", str(tp),
        "--encoder-transfer-backend", "mooncake",
        "--enable-metrics",
    ]  # fmt: skip
    devices = [d for d in config.transfer.rdma_devices if d != "auto"]
    if config.transfer.protocol == "rdma" and devices:
        # Without the flag Mooncake detects the devices itself ("auto").
        cmd += ["--mooncake-ib-device", ",".join(devices)]
    if encode:
        cmd += ["--encoder-only"]
    else:
        cmd += ["--language-only", "--encoder-bootstrap-port", str(config.transfer.bootstrap_port)]
    return cmd + list(extra_args)


def bootstrap_urls(addresses: Sequence[str], port: int) -> list[str]:
    """Language pods' EncoderBootstrapServer URLs from their addresses (pure)."""
    return sorted({f"http://{a}:{port}" for a in addresses})


def dns_discovery(name: str, port: int) -> Discover:
    """Language pods behind a headless Service name."""

    async def discover() -> list[str]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, port, type=socket.SOCK_STREAM
            )
        except OSError:
            return []
        return bootstrap_urls([str(info[4][0]) for info in infos], port)

    return discover


async def register_once(session: aiohttp.ClientSession, bootstrap: str, encoder_url: str) -> bool:
    """Make sure `encoder_url` is registered at `bootstrap`; True if it is now."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with session.get(f"{bootstrap}/list_encoder_urls", timeout=timeout) as r:
            if r.status == 200 and encoder_url in (await r.json()).get("encoder_urls", []):
                return True
        async with session.post(
            f"{bootstrap}/register_encoder_url", json={"url": encoder_url}, timeout=timeout
        ) as r:
            if r.status == 200:
                log.info("registered %s with %s", encoder_url, bootstrap)
                return True
            log.warning("%s refused registration: %s %s", bootstrap, r.status, await r.text())
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        log.info("%s not reachable yet: %s", bootstrap, e)
    return False


async def keep_registered(
    encoder_url: str, discover: Discover, *, interval: float = 5.0, rounds: int | None = None
) -> None:
    """Every `interval` seconds, register with every language pod that does not list us
    (new pods, and pods that restarted and forgot us)."""
    async with aiohttp.ClientSession() as session:
        n = 0
        while rounds is None or n < rounds:
            n += 1
            for bootstrap in await discover():
                await register_once(session, bootstrap, encoder_url)
            await asyncio.sleep(interval)


async def run_sglang(
    config: RuntimeConfig, role: str, extra_args: Sequence[str], advertise_host: str
) -> int:
    """Run SGLang for `role` until it exits (SIGTERM/SIGINT are passed on)."""
    cmd = sglang_command(config, role, extra_args, python=sys.executable)
    log.info("starting %s", " ".join(cmd))
    child = await asyncio.create_subprocess_exec(*cmd)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, child.send_signal, sig)
    registration = None
    if role == "encode":
        registration = asyncio.create_task(
            keep_registered(
                f"http://{advertise_host}:{config.http_port}",
                dns_discovery(config.endpoints.language_service, config.transfer.bootstrap_port),
            )
        )
    code = await child.wait()
    if registration is not None:
        registration.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await registration
    return code
