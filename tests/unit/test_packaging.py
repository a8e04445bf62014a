"""What the images install: exactly one Mooncake build each (both ship the same `mooncake`
module, so a second one would silently replace the first); and what the wheel holds: the
operator and the runtime, nothing else."""

from __future__ import annotations

import re
import subprocess
import tomllib

from devkit.cluster import REPO

MOONCAKE = re.compile(r"^mooncake-transfer-engine(-non-cuda|-cuda13)?\b")


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
    assert mooncake_builds(runtime_extras_default()) == ["mooncake-transfer-engine-cuda13"]


def test_the_runtime_knows_every_cuda_build_it_may_be_installed_with() -> None:
    """A CUDA build the runtime did not know would put its buffers in host memory."""
    from deepstack_runtime.transfer.mooncake import CUDA_DISTRIBUTIONS

    cuda_builds = mooncake_builds(["sglang"])
    assert set(cuda_builds) <= set(CUDA_DISTRIBUTIONS)


def images_sh_extras(variable: str) -> list[str]:
    script = (REPO / "hack" / "images.sh").read_text()
    return re.search(rf"^{variable}=([a-z,]+)$", script, re.M).group(1).split(",")  # type: ignore[union-attr]


def test_the_local_cpu_runtime_image_installs_only_the_host_memory_build() -> None:
    assert mooncake_builds(images_sh_extras("CPU_EXTRAS")) == ["mooncake-transfer-engine-non-cuda"]


def test_the_gpu_image_built_here_is_the_shipped_default() -> None:
    assert images_sh_extras("GPU_EXTRAS") == runtime_extras_default()


def test_the_gpu_image_check_on_record_is_of_its_current_inputs_and_passed() -> None:
    """`make test` rebuilds and rechecks the GPU image (hack/images.sh gpu-check) whenever
    what it is built from differs from its record, so after it the record must be of the
    current inputs, with every check inside the image passed."""
    record = (REPO / "hack" / "gpu-image.checked").read_text().splitlines()
    inputs = subprocess.run(
        [str(REPO / "hack" / "images.sh"), "gpu-inputs"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert f"inputs {inputs}" in record
    checks = [line.split(maxsplit=3) for line in record if line.startswith("check ")]
    names = {c[1] for c in checks}
    assert {"pip-check", "mooncake-build", "sglang-engine-import", "cli-help"} <= names, names
    assert [c for c in checks if c[2] != "ok"] == []


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
