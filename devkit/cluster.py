"""Access to the local control plane started by `hack/cluster.sh` (`make cluster`)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
KUBECONFIG = REPO / ".cluster" / "kubeconfig"
T = TypeVar("T")

# hack/cluster.sh taints its kwok nodes: a workload meant for them (many simulated pods)
# says so with this placement; everything else runs on the real node.
SIMULATED_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [
        {"key": "deepstack.dev/simulated", "operator": "Exists", "effect": "NoSchedule"}
    ],
}


def tool_bin() -> Path:
    """Directory of the pinned control-plane binaries (built once, cached)."""
    out = subprocess.run(
        [str(REPO / "hack" / "build-control-plane.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.5, what: str
) -> T:
    """Poll `probe` until it returns something other than None/False, or fail."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin: Path

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def api_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]


def is_ready(bin_dir: Path) -> bool:
    if not KUBECONFIG.exists():
        return False
    result = subprocess.run(
        [str(bin_dir / "kubectl"), "--kubeconfig", str(KUBECONFIG), "get", "--raw", "/readyz"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode == 0 and result.stdout.strip() == "ok"
