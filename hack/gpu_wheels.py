"""What hack/gpu-check.sh installs on a GPU machine that reaches no registry, made here
into .cache/gpu-wheels (carried to that machine, 64 MiB at most): the GPU image's
Mooncake build (the sglang extra's pin) for the target Python, trimmed to the transfer
engine (its process-group, expert-parallel, store and benchmark parts, about 70 MiB of the
93, are left out and dropped from its RECORD), and Debian's RDMA and NUMA libraries.

    python hack/gpu_wheels.py [--python 3.11]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".cache" / "gpu-wheels"
# What the runtime loads: mooncake.engine and the libraries it links.
UNNEEDED = ("libmooncake_pg", "pg_2_", "_ep.", "libmooncake_ep", "store.so",
            "transfer_engine_bench", "mooncake_master", "mooncake_client")  # fmt: skip
DEBS = ("libibverbs1", "librdmacm1", "libnuma1")


def mooncake_pin() -> str:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (pin,) = [r for r in extras["sglang"] if r.startswith("mooncake-transfer-engine")]
    return str(pin)


def trimmed(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target / wheel.name, "w") as out:
        for info in source.infolist():
            name = info.filename
            if any(part in Path(name).name for part in UNNEEDED):
                continue
            data = source.read(info)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                kept = [ln for ln in lines if not any(p in ln.split(",")[0] for p in UNNEEDED)]
                data = ("\n".join(kept) + "\n").encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default="3.11")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():  # another build of Mooncake would replace this one's module
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", args.python, "-d", tmp, mooncake_pin()],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        trimmed(wheel, OUT)
    subprocess.run(["apt-get", "download", *DEBS], cwd=OUT, check=True)
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"{OUT}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
