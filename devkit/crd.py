"""The CustomResourceDefinition and its examples, as test inputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from devkit.cluster import REPO, SIMULATED_PLACEMENT, Cluster, wait_for

CRD_FILE = REPO / "crds" / "deepstackdisaggregations.yaml"
EXAMPLES = sorted((REPO / "crds" / "examples").glob("*.yaml"))
GROUP = "disagg.deepstack.dev"
VERSION = "v1alpha1"
PLURAL = "deepstackdisaggregations"
CRD_NAME = f"{PLURAL}.{GROUP}"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def minimal() -> dict[str, Any]:
    """The minimal example, its pods placed on the simulated (kwok) nodes."""
    cr = copy.deepcopy(load(REPO / "crds" / "examples" / "minimal-cpu.yaml"))
    for role in ("encode", "language", "router"):
        cr["spec"].setdefault(role, {}).update(copy.deepcopy(SIMULATED_PLACEMENT))
    return cr


def install_crd(cluster: Cluster) -> None:
    """Apply the CRD the way a user would and wait until it is served."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))

    def established() -> bool:
        out = cluster.kubectl(
            "get",
            "crd",
            CRD_NAME,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            check=False,
        )
        return out.stdout.strip() == "True"

    wait_for(established, timeout=60, what=f"CRD {CRD_NAME} Established")
