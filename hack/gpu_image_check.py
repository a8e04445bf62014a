"""Checks of the GPU runtime image that need no GPU, run inside it by
`hack/images.sh gpu-check`: its packages agree (`pip check`); what the sglang backend
imports when a language pod starts imports; the CLI starts; and which Mooncake build it
holds, whose engine starts. Prints one
`check NAME ok|FAILED detail` line each and exits non-zero if any failed.

The driver's `libcuda.so.1` comes from the host (the NVIDIA container toolkit), so
without a GPU it is missing, and SGLang's kernel package and Mooncake's CUDA build link
it. `hack/images.sh` mounts a stand-in at DRIVER_STAND_IN: every `cu*` function the
image's libraries import from it, each answering CUDA_ERROR_NO_DEVICE. Everything else
that loads is the image's own.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable

VENV_BIN = os.path.dirname(sys.executable)
DRIVER_STAND_IN = "/opt/driver-stand-in"
results: list[bool] = []


def check(name: str, run: Callable[[], str]) -> None:
    try:
        detail, ok = run(), True
    except Exception as error:  # every failure is reported, the next check still runs
        detail, ok = f"{type(error).__name__}: {error}".replace("\n", " | ")[-600:], False
    results.append(ok)
    print(f"check {name} {'ok' if ok else 'FAILED'} {detail}", flush=True)


def command(*argv: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stdout}{out.stderr}")
    return out.stdout


def versions() -> str:
    names = ("torch", "sglang", "sglang-kernel", "transformers", "deepstack-disagg")
    return " ".join(f"{n}=={importlib.metadata.version(n)}" for n in names)


def mooncake_build() -> str:
    """Exactly one distribution ships the `mooncake` module: a CUDA build the runtime
    registers GPU memory with."""
    from deepstack_runtime.transfer.mooncake import CUDA_DISTRIBUTIONS

    owners = sorted(
        str(dist.metadata["Name"])
        for dist in importlib.metadata.distributions()
        if any(str(f).startswith("mooncake/") for f in dist.files or ())
    )
    if len(owners) != 1 or owners[0] not in CUDA_DISTRIBUTIONS:
        raise RuntimeError(f"the mooncake module comes from {owners}")
    return f"{owners[0]}=={importlib.metadata.version(owners[0])}"


def run_python(code: str) -> str:
    """CODE in a fresh interpreter, with the driver's stand-in on the library path."""
    env = {**os.environ, "LD_LIBRARY_PATH": DRIVER_STAND_IN}
    return command(sys.executable, "-c", code, env=env).strip()


def frozen() -> str:
    """What exactly is installed, as a digest of `pip freeze`: two checks of one record
    differ in it if the resolution did."""
    lines = command(f"{VENV_BIN}/pip", "freeze", "--all").splitlines()
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:12]
    return f"{len(lines)} distributions, pip freeze sha256 {digest}"


check("versions", versions)
check("installed", frozen)
check("pip-check", lambda: command(f"{VENV_BIN}/pip", "check").strip())
check("mooncake-build", mooncake_build)
# The order the runtime imports them in: torch (and its CUDA libraries) first.
check(
    "mooncake-engine",
    lambda: run_python(
        "import torch, socket\n"
        "from mooncake.engine import TransferEngine\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "engine = TransferEngine()\n"
        "assert engine.initialize(f'127.0.0.1:{port}', 'P2PHANDSHAKE', 'tcp', '') == 0\n"
        "print('initialized over tcp; CUDA devices seen:', torch.cuda.device_count())"
    ),
)
check("sglang-kernel-import", lambda: run_python("import torch, sgl_kernel; print('ok')"))
check(
    "sglang-engine-import",
    lambda: run_python(
        "from sglang.srt.entrypoints.engine import Engine\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        "import sglang.srt.models.qwen3_vl_moe\n"
        "print('ok')"
    ),
)
check(
    "runtime-import",
    lambda: run_python(
        "import deepstack_runtime.backends.sglang, deepstack_runtime.servers.language\n"
        "from deepstack_runtime.transfer.mooncake import buffer_device\n"
        "print('imported; buffers without a GPU:', buffer_device())"
    ),
)
check("cli-help", lambda: command(f"{VENV_BIN}/deepstack-runtime", "language", "--help")[:60])
sys.exit(0 if all(results) else 1)
