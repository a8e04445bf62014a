"""What the images install: exactly one Mooncake build each (both ship the same `mooncake`
module, so a second one would silently replace the first); and what the wheel holds: the
operator and the runtime, nothing else."""

from __future__ import annotations

import re
import tomllib

from devkit.cluster import REPO

MOONCAKE = re.compile(r"^mooncake-transfer-engine(-non-cuda)?\b")


def mooncake_builds(extras: list[str]) -> list[str]:
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    return [r.split("==")[0] for extra in extras for r in optional[extra] if MOONCAKE.match(r)]


def runtime_extras_default() -> list[str]:
    """The extras the runtime stage installs unless told otherwise."""
    text = (REPO / "Dockerfile").read_text()
    stage = text[text.index(" AS runtime") :]
    assert "[${RUNTIME_EXTRAS}]" in stage
    return re.search(r"ARG RUNTIME_EXTRAS=([a-z,]+)", stage).group(1).split(",")  # type: ignore[union-attr]


def test_the_runtime_image_installs_only_the_cuda_build() -> None:
    assert mooncake_builds(runtime_extras_default()) == ["mooncake-transfer-engine"]


def test_the_local_runtime_image_installs_only_the_host_memory_build() -> None:
    script = (REPO / "hack" / "images.sh").read_text()
    extras = re.search(r"RUNTIME_EXTRAS=([a-z,]+)", script).group(1).split(",")  # type: ignore[union-attr]
    assert mooncake_builds(extras) == ["mooncake-transfer-engine-non-cuda"]


def test_the_development_install_has_only_the_host_memory_build() -> None:
    makefile = (REPO / "Makefile").read_text()
    extras = re.search(r"pip install .* -e '\.\[([a-z,]+)\]'", makefile).group(1).split(",")  # type: ignore[union-attr]
    assert mooncake_builds(extras) == ["mooncake-transfer-engine-non-cuda"]


def test_the_wheel_packages_only_the_operator_and_the_runtime() -> None:
    """devkit/ and tests/ (local-run helpers, oracles) are never shipped."""
    from setuptools import find_namespace_packages  # type: ignore[import-untyped]

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]
    found = {
        package
        for where in find["where"]
        for package in find_namespace_packages(str(REPO / where), include=find["include"])
    }
    assert {package.split(".")[0] for package in found} == {
        "deepstack_operator",
        "deepstack_runtime",
    }
