"""`hack/demo.py` (what `make demo` runs) beside a developer's demo: its own state, namespace
and ports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devkit.cluster import REPO, Cluster
from tests.support.operator import free_port_block


@contextmanager
def demo_up(cluster: Cluster, state: Path, backend: str) -> Iterator[dict[str, Any]]:
    """Run the demo up; yield its printed output and values; run it down."""
    # With DEMO_BACKEND=sglang, hack/demo.py's local processes use base+0..2 (router,
    # encode, language) and +998 (bootstrap).
    base = free_port_block((0, 1, 2, 998))
    env = {
        **os.environ,
        "DEMO_STATE": str(state),
        "DEMO_NAMESPACE": f"e2e-{uuid.uuid4().hex[:6]}",
        "DEMO_PORT_BASE": str(base),
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
            "state": state,
            "namespace": env["DEMO_NAMESPACE"],
            "base": base,
            **values,
        }
    finally:
        subprocess.run([*script, "down"], env=env, capture_output=True, timeout=400)
        cluster.kubectl("delete", "namespace", env["DEMO_NAMESPACE"], "--wait=false", check=False)
