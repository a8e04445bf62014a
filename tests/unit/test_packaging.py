"""What the images install: exactly one Mooncake build each (both ship the same `mooncake`
module, so a second one would silently replace the first)."""

from __future__ import annotations

import re
import tomllib

from tests.support.cluster import REPO

MOONCAKE = re.compile(r"^mooncake-transfer-engine(-non-cuda)?\b")


def mooncake_builds(extras: list[str]) -> list[str]:
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    return [r.split("==")[0] for extra in extras for r in optional[extra] if MOONCAKE.match(r)]


def dockerfile_extras(target: str) -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    stage = text[text.index(f" AS {target}") :]
    return re.search(r"\.whl\)\[([a-z,]+)\]", stage).group(1).split(",")  # type: ignore[union-attr]


def test_the_runtime_image_installs_only_the_cuda_build() -> None:
    assert mooncake_builds(dockerfile_extras("runtime")) == ["mooncake-transfer-engine"]


def test_the_development_install_has_only_the_host_memory_build() -> None:
    makefile = (REPO / "Makefile").read_text()
    extras = re.search(r"pip install .* -e '\.\[([a-z,]+)\]'", makefile).group(1).split(",")  # type: ignore[union-attr]
    assert mooncake_builds(extras) == ["mooncake-transfer-engine-non-cuda"]
