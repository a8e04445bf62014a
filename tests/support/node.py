"""The local cluster's real node (hack/node.sh): its containerd, seen from the host."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

NODE_NAME = "deepstack-node"
CONTAINERD = "/run/deepstack-disagg/containerd/containerd.sock"
# The sandbox image hack/node.sh imports; a container of it sleeps.
PAUSE_IMAGE = "localhost/deepstack-pause:1"


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


STATE = Path("/run/deepstack-disagg")


def kill_node_processes() -> list[int]:
    """SIGKILL the node's own processes (containerd, kubelet, kube-proxy, CoreDNS,
    kube-router) and leave their pid files, mounts and iptables rules, as a killed session
    or a machine restored from a snapshot does."""
    killed = []
    for pid_file in STATE.glob("*.pid"):
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    return killed
