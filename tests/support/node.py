"""The local cluster's real node (hack/node.sh): its containerd, seen from the host."""

from __future__ import annotations

import subprocess
from typing import Any

NODE_NAME = "deepstack-node"
CONTAINERD = "/run/deepstack-disagg/containerd/containerd.sock"


def ctr(*args: str) -> str:
    out = subprocess.run(
        ["ctr", "--address", CONTAINERD, "--namespace", "k8s.io", *args],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return out.stdout


def container_pid(pod: dict[str, Any]) -> int:
    """The host PID of a running pod's (only) container."""
    (status,) = pod["status"]["containerStatuses"]
    container_id = status["containerID"].removeprefix("containerd://")
    for line in ctr("tasks", "ls").splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise AssertionError(f"no running task for {pod['metadata']['name']} ({container_id})")


def tag_image(source: str, target: str) -> None:
    """A second name for an image the node has, as a registry push of a new tag would."""
    ctr("images", "tag", "--force", source, target)
