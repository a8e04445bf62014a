"""Shared fixtures. The control plane is started here if it is not already running,
and stopped again at the end of the session if this session started it."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from devkit.cluster import KUBECONFIG, REPO, Cluster, is_ready, tool_bin


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    bin_dir = tool_bin()
    started = False
    if not is_ready(bin_dir):
        up = subprocess.run(
            [str(REPO / "hack" / "cluster.sh"), "up"], capture_output=True, text=True, timeout=600
        )
        if up.returncode != 0:
            # One line, so that the reason is in every summary line of the tests it fails.
            said = [line for line in up.stderr.splitlines() if not line.startswith("{")]
            pytest.fail(f"hack/cluster.sh up: exit {up.returncode}: {' | '.join(said[-4:])}")
        started = True
    try:
        yield Cluster(kubeconfig=KUBECONFIG, bin=bin_dir)
    finally:
        if started:
            subprocess.run([str(REPO / "hack" / "cluster.sh"), "down"], check=False, timeout=300)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
