"""Runtime servers as real local processes, and a tiny model to serve."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from deepstack_runtime.config import RuntimeConfig
from devkit.cluster import REPO, wait_for
from devkit.sglang_on_cpu import SGLANG_CPU_ARGS, SGLANG_ENV, SGLANG_PYTHON
from devkit.specs import example


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def runtime_config(model_dir: Path, **transfer: Any) -> RuntimeConfig:
    """The configuration the operator renders for the minimal example, pointed at a
    local checkpoint (transfer fields overridable, in the CR's camelCase)."""
    cr = example("minimal-cpu")
    cr["spec"]["model"]["path"] = str(model_dir)
    cr["spec"]["transfer"].update(transfer)
    return RuntimeConfig.from_spec("tiny", "default", cr["spec"])


def sglang_config(model_dir: Path, **transfer: Any) -> RuntimeConfig:
    """`runtime_config` on the sglang backend."""
    return dataclasses.replace(runtime_config(model_dir, **transfer), backend="sglang")


class ServerProcess:
    def __init__(
        self,
        role: str,
        config_file: Path,
        log: Path,
        *extra: str,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        startup_timeout: float = 120,
    ) -> None:
        self.role = role
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("w")
        args = [
            python,
            "-m",
            "deepstack_runtime",
            role,
            "--config",
            str(config_file),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            "0",
        ]
        if role == "encode":
            args += ["--bootstrap-port", "0"]
        self.process = subprocess.Popen(
            [*args, *extra],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "POD_IP": "127.0.0.1", **(env or {})},
        )

    def __enter__(self) -> ServerProcess:
        wait_for(self.healthy, timeout=self.startup_timeout, what=f"{self.role} server /health")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.role} exited {self.process.returncode}:\n{self.logs()}")
        try:
            return get(f"{self.url}/health")[0] == 200
        except OSError:
            return False

    def metrics(self) -> str:
        return get(f"{self.url}/metrics")[1]

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def language_server(config_file: Path, log: Path, backend: str = "reference") -> ServerProcess:
    """The language server of `backend`; on sglang, SGLang's engine runs on this CPU."""
    if backend == "sglang":
        return ServerProcess(
            "language", config_file, log, *SGLANG_CPU_ARGS,
            python=SGLANG_PYTHON, env=SGLANG_ENV, startup_timeout=300,
        )  # fmt: skip
    return ServerProcess("language", config_file, log)


@contextmanager
def serving_stack(
    config_file: Path, root: Path, *router_args: str, backend: str = "reference"
) -> Iterator[tuple[ServerProcess, ServerProcess, ServerProcess]]:
    """An encode, a language and a router server (pointed at those two), logs in `root`."""
    with ExitStack() as stack:
        encode = stack.enter_context(ServerProcess("encode", config_file, root / "encode.log"))
        language = stack.enter_context(language_server(config_file, root / "language.log", backend))
        router = stack.enter_context(
            ServerProcess(
                "router",
                config_file,
                root / "router.log",
                "--encode-url",
                encode.url,
                "--language-url",
                language.url,
                *router_args,
            )
        )
        yield encode, language, router


@contextmanager
def sglang_server(model_dir: Path, log: Path) -> Iterator[str]:
    """SGLang's own single server (vision and language in one) on this CPU: the answer
    the disaggregated sglang backend must give."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [SGLANG_PYTHON, "-m", "sglang.launch_server", "--model-path", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port), *SGLANG_CPU_ARGS],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **SGLANG_ENV},
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"SGLang exited {process.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                return get(f"{url}/health")[0] == 200
            except OSError:
                return False

        try:
            wait_for(ready, timeout=300, what="SGLang's server /health")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=10
        ) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(
    url: str, body: Any, timeout: float = 120, content_type: str = "application/json"
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def wait_until_router_sees_both(router_url: str) -> None:
    def both_healthy() -> bool:
        health = json.loads(get(f"{router_url}/health")[1])
        return bool(health.get("encode") == 1 and health.get("language") == 1)

    wait_for(both_healthy, timeout=30, what="the router to see one healthy instance per role")


@contextmanager
def tiny_stack(
    root: Path, *router_args: str, backend: str = "reference", **transfer: Any
) -> Iterator[dict[str, Any]]:
    """A tiny checkpoint in `root` and an encode, a language and a router server over
    it (the router once it sees both): {"model", "config", "root", "encode", "language",
    "router"}."""
    from deepstack_runtime.models.tiny import make_tiny_model

    model = make_tiny_model(root / "model", seed=0)
    config_file = root / "config.json"
    make_config = sglang_config if backend == "sglang" else runtime_config
    config_file.write_text(make_config(model, **transfer).to_json())
    with serving_stack(config_file, root, *router_args, backend=backend) as (
        encode,
        language,
        router,
    ):
        wait_until_router_sees_both(router.url)
        yield {"model": model, "config": config_file, "root": root,
               "encode": encode, "language": language, "router": router}  # fmt: skip


def media_body(model_dir: Path, room: str, images: list[bytes]) -> bytes:
    """An encode request for `images`, as the router would send it (servers/wire.py)."""
    from deepstack_runtime.servers.prompt import PromptBuilder
    from deepstack_runtime.servers.wire import encode_media

    builder = PromptBuilder(model_dir)
    described = [builder.image(data, i + 1, 1 << 28) for i, data in enumerate(images)]
    return encode_media(room, [(image.media_item(), image.data) for image in described])
