"""`hack/demo.py` (what `make demo` runs) beside a developer's demo: its own namespace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from devkit.cluster import REPO, Cluster


@contextmanager
def demo_up(cluster: Cluster, backend: str) -> Iterator[dict[str, Any]]:
    """Run the demo up; yield its printed output and values; run it down."""
    env = {
        **os.environ,
        "DEMO_NAMESPACE": f"e2e-{uuid.uuid4().hex[:6]}",
        "DEMO_BACKEND": backend,
    }
    script = [sys.executable, str(REPO / "hack" / "demo.py")]
    try:
        result = subprocess.run(
            # A cold machine builds the images first (hack/images.sh).
            [*script, "up"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        values = dict(re.findall(r"^(ROUTER_URL|MODEL_DIR|KUBECONFIG)=(.*)$", result.stdout, re.M))
        yield {
            "output": result.stdout,
            "namespace": env["DEMO_NAMESPACE"],
            **values,
        }
    finally:
        subprocess.run([*script, "down"], env=env, capture_output=True, timeout=400)
        cluster.kubectl("delete", "namespace", env["DEMO_NAMESPACE"], "--wait=false", check=False)
