"""Any schema-valid spec renders, and rendering is deterministic."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from deepstack_operator.render import Capabilities
from devkit.specs import stored
from tests.support.render import render

names_ = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)
paths = st.from_regex(r"/models/[A-Za-z0-9._-]{1,30}", fullmatch=True).filter(
    lambda p: ".." not in p.split("/")
)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    backend = draw(st.sampled_from(["sglang", "reference"]))
    protocol = "tcp" if backend == "reference" else draw(st.sampled_from(["tcp", "rdma"]))
    block = draw(st.integers(1, 1024))
    enabled = draw(st.booleans())
    roles = {}
    for role in ("encode", "language"):
        tp = 1 if backend == "reference" else draw(st.sampled_from([1, 2, 4, 8, 16]))
        roles[role] = {
            "replicas": draw(st.integers(0, 512)),
            "tensorParallelSize": tp,
            "resources": draw(
                st.sampled_from(
                    [{}, {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": 4}}]
                )
            ),
            "nodeSelector": draw(st.dictionaries(names_, names_, max_size=2)),
            "extraArgs": draw(st.lists(st.text(max_size=20), max_size=3)),
            "env": [
                {"name": "X_" + str(i), "value": v}
                for i, v in enumerate(draw(st.lists(st.text(max_size=10), max_size=3)))
            ],
        }
    spec: dict[str, Any] = {
        "model": {"path": draw(paths), "servedModelName": draw(names_)},
        "runtime": {"image": "registry.example/runtime:" + draw(names_), "backend": backend},
        "deepstack": {
            "enabled": enabled,
            "numLayers": draw(st.integers(1, 16)) if enabled else 0,
            "hiddenSize": draw(st.integers(1, 65536)),
            "dtype": draw(st.sampled_from(["bfloat16", "float16", "float32"])),
        },
        "transfer": {
            "protocol": protocol,
            "rdmaDevices": draw(st.sampled_from([["auto"], ["mlx5_0", "mlx5_1"]]))
            if protocol == "rdma"
            else [],
            "blockTokens": block,
            "defaultAllocationTokens": block * draw(st.integers(1, 16)),
            "poolBlocks": draw(st.integers(16, 4096)),
        },
        **roles,
        "router": draw(
            st.sampled_from(
                [
                    {"enabled": True, "replicas": 2, "port": 8080},
                    {"enabled": False, "replicas": 0, "port": 8000},
                ]
            )
        ),
    }
    if draw(st.booleans()):
        spec["autoscaling"] = {
            "encode": {"minReplicas": 1, "maxReplicas": max(1, spec["encode"]["replicas"])}
        }
    if draw(st.booleans()):
        spec["model"]["volume"] = {"persistentVolumeClaim": {"claimName": draw(names_)}}
    return spec


@settings(max_examples=150, deadline=None)
@given(specs(), names_, st.booleans())
def test_any_valid_spec_renders_deterministically(
    spec: dict[str, Any], name: str, monitor: bool
) -> None:
    cr = stored({"metadata": {"name": name}, "spec": spec})
    first = render(cr, Capabilities(pod_monitor=monitor))
    second = render(copy.deepcopy(cr), Capabilities(pod_monitor=monitor))
    assert first == second
    names_seen = [(c["kind"], c["metadata"]["name"]) for c in first]
    assert len(names_seen) == len(set(names_seen))  # no two children collide
    assert cr == stored({"metadata": {"name": name}, "spec": spec})  # the input is not mutated
