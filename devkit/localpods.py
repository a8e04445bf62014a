"""Run rendered pods as local processes, for pods placed on the simulated (kwok) nodes:
`DEMO_BACKEND=sglang`, whose SGLang-on-CPU needs the kernel stand-ins (sglang_cpu), and the
sglang end-to-end test.

A pod's process is exactly its container's command, args and env as the operator
rendered them, with only what a single machine needs changed: the mounted ConfigMap
becomes a local file, downward-API values are filled in, and ports that would collide on
one host are overridden by flags appended at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepstack_operator import names

CONFIG_PATH = "/etc/deepstack/config.json"


@dataclass(frozen=True)
class LocalPod:
    name: str
    role: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def local_pod(
    template: dict[str, Any],
    *,
    pod_name: str,
    namespace: str,
    pod_ip: str,
    config_file: str,
    overrides: list[str],
) -> LocalPod:
    """The process of one pod of `template` (a pod template the operator rendered)."""
    (container,) = template["spec"]["containers"]
    argv = [*container["command"], *container.get("args", [])]
    argv = [config_file if a == CONFIG_PATH else a for a in argv]
    downward = {"metadata.name": pod_name, "metadata.namespace": namespace, "status.podIP": pod_ip}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        path = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if path not in downward:
            raise ValueError(
                f"{var['name']}: only literal values and {sorted(downward)} run locally"
            )
        env[var["name"]] = downward[path]
    role = template["metadata"]["labels"][names.ROLE_LABEL]
    return LocalPod(pod_name, role, [*argv, *overrides], env)


def token_kubeconfig(admin: dict[str, Any], token: str, user: str) -> dict[str, Any]:
    """A kubeconfig for the first cluster of `admin` that authenticates with a bearer
    `token` (of a ServiceAccount): the operator run locally gets exactly the permissions
    its pod would."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
        "current-context": user,
    }


def executable(argv: list[str]) -> list[str]:
    """`deepstack-runtime ...` from this Python environment."""
    if argv and argv[0] == "deepstack-runtime":
        found = shutil.which("deepstack-runtime") or str(
            Path(sys.executable).with_name("deepstack-runtime")
        )
        return [found, *argv[1:]]
    return argv


def start(pod: LocalPod, log: Path, *, detach: bool = False) -> subprocess.Popen[bytes]:
    """Start the pod's process (in its own session when `detach`, to outlive us)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            executable(pod.argv),
            env={**os.environ, **pod.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
