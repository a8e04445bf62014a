"""Operator at scale on the local control plane (`make cluster`): apply N resources at once.

Prints one JSON object (with --json) or a line per figure:
  count                   resources applied
  seconds_to_all_ready    from the apply to every resource's status.phase == Ready
  api_writes_per_cr       the operator's writes (creates, updates, deletes, status; dry runs
                          excluded) per resource, from its own metrics
  noop_writes             writes during a second pass over all N unchanged resources
                          (each annotated to force a reconcile): should be 0
  operator_peak_rss_bytes the operator process's peak resident memory (VmHWM)
  reconcile_cpu_seconds_per_cr
                          CPU time the operator's reconciling threads spent, per resource
                          (its deepstack_operator_reconcile_cpu_seconds_total), until all
                          were Ready and the queue was quiet
  status_lag_p50_s, status_lag_max_s
                          per resource, from its last pod turning Ready to its own Ready
                          condition (both as the API server recorded them, 1 s resolution)
  baseline_seconds_to_all_ready
                          the same children (rendered by the operator's own pure renderers)
                          applied directly in the same run, no operator: from the apply to
                          every StatefulSet and Deployment having all its replicas ready
  ratio_to_baseline       seconds_to_all_ready / baseline_seconds_to_all_ready

    python benchmarks/operator_scale.py --count 100 --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deepstack_operator.desired import desired_state  # noqa: E402
from deepstack_operator.render import render_all  # noqa: E402
from devkit.cluster import SIMULATED_PLACEMENT  # noqa: E402

KUBECONFIG = REPO / ".cluster" / "kubeconfig"


def tool(name: str) -> str:
    return str(REPO / ".cluster" / "bin" / name)


def kubectl(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(KUBECONFIG), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return out.stdout


def metric_sum(text: str, name: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def wait(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


APPLIERS = 8


def _seconds(timestamp: str) -> float:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _ready_since(obj: dict[str, Any]) -> float | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            return _seconds(c["lastTransitionTime"])
    return None


def status_lags(namespace: str) -> list[float]:
    """Per resource: its Ready condition's time less its last pod's Ready time."""
    pods = json.loads(kubectl("-n", namespace, "get", "pods", "-o", "json"))["items"]
    last_pod: dict[str, float] = {}
    for pod in pods:
        owner = (pod["metadata"].get("labels") or {}).get("disagg.deepstack.dev/instance", "")
        since = _ready_since(pod)
        if owner and since is not None:
            last_pod[owner] = max(last_pod.get(owner, 0.0), since)
    lags = []
    for cr in json.loads(kubectl("-n", namespace, "get", "dsd", "-o", "json"))["items"]:
        since = _ready_since(cr)
        if since is not None and cr["metadata"]["name"] in last_pod:
            lags.append(max(since - last_pod[cr["metadata"]["name"]], 0.0))
    return lags


def baseline_seconds(example: dict[str, Any], count: int, timeout: float) -> float:
    """The children of `count` resources applied directly, with no operator: the time from
    the apply until every StatefulSet and Deployment has all its replicas ready."""
    namespace = f"bench-base-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    try:
        # The resource as the API server would store it (its defaults), not stored.
        stored = json.loads(
            kubectl(
                "-n", namespace, "create", "--dry-run=server", "-o", "json", "-f", "-",
                stdin=json.dumps({**example, "metadata": {"name": "dsd-0000"}}),
            )
        )  # fmt: skip
        children: list[dict[str, Any]] = []
        for i in range(count):
            cr = json.loads(json.dumps(stored))
            cr["metadata"]["name"] = f"dsd-{i:04d}"
            for child in render_all(desired_state(cr)):
                child["metadata"].pop("ownerReferences", None)  # no owner exists here
                children.append(child)
        workloads = sum(c["kind"] in ("StatefulSet", "Deployment") for c in children)
        # As fast as a direct apply goes: APPLIERS kubectl processes at once (one alone
        # applies object after object), each with whole resources.
        batches = [children[i::APPLIERS] for i in range(APPLIERS)]
        started = time.monotonic()
        command = [tool("kubectl"), "--kubeconfig", str(KUBECONFIG), "apply", "--server-side"]
        command += ["--field-manager=bench", "-f", "-"]
        appliers = [
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            for _ in batches
        ]
        for applier, batch in zip(appliers, batches, strict=True):
            assert applier.stdin is not None
            applier.stdin.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": batch}))
            applier.stdin.close()
        if any(applier.wait(timeout) != 0 for applier in appliers):
            raise SystemExit("the direct apply failed")

        def all_ready() -> bool:
            listed = json.loads(
                kubectl("-n", namespace, "get", "statefulsets,deployments", "-o", "json")
            )["items"]
            return len(listed) == workloads and all(
                (o.get("status") or {}).get("readyReplicas", 0) == o["spec"]["replicas"]
                for o in listed
            )

        wait(all_ready, timeout, f"{workloads} workloads ready without the operator")
        return time.monotonic() - started
    finally:
        kubectl("delete", "namespace", namespace, "--timeout=280s")  # the next phase starts clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    # Each resource has 3 pods; a simulated node takes 110.
    nodes = max(2, -(-3 * args.count // 100))
    subprocess.run(
        [str(REPO / "hack" / "cluster.sh"), "up"],
        check=True,
        capture_output=True,
        env={**os.environ, "DEEPSTACK_CLUSTER_NODES": str(nodes)},
    )
    kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(REPO / "crds" / "deepstackdisaggregations.yaml"),
    )
    kubectl(
        "wait", "--for=condition=Established", "crd/deepstackdisaggregations.disagg.deepstack.dev"
    )
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (kept for reading after the run)
        "w", prefix="operator-", suffix=".log", delete=False
    )
    operator = subprocess.Popen(
        [sys.executable, "-m", "deepstack_operator", "--standalone", "--namespace", namespace],
        env={
            **os.environ,
            "KUBECONFIG": str(KUBECONFIG),
            "DEEPSTACK_OPERATOR_METRICS_PORT": str(port),
            "DEEPSTACK_OPERATOR_METRICS_HOST": "127.0.0.1",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def up() -> bool:
        try:
            metrics()
            return True
        except OSError:
            return False

    try:
        wait(up, 60, "the operator")
        example = json.loads(
            kubectl(
                "create",
                "--dry-run=client",
                "-o",
                "json",
                "-f",
                str(REPO / "crds" / "examples" / "minimal-cpu.yaml"),
            )
        )
        for role in ("encode", "language", "router"):  # on the simulated (kwok) nodes
            example["spec"].setdefault(role, {}).update(SIMULATED_PLACEMENT)
        items: list[dict[str, Any]] = []
        for i in range(args.count):
            body = json.loads(json.dumps(example))
            body["metadata"] = {"name": f"dsd-{i:04d}", "namespace": namespace}
            items.append(body)
        started = time.monotonic()
        kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )

        def all_ready() -> bool:
            listed = json.loads(kubectl("-n", namespace, "get", "dsd", "-o", "json"))["items"]
            return len(listed) == args.count and all(
                (o.get("status") or {}).get("phase") == "Ready" for o in listed
            )

        wait(all_ready, args.timeout, f"{args.count} resources Ready")
        seconds = time.monotonic() - started
        lags = status_lags(namespace)
        # Let trailing pod/status events drain: wait until the queue is quiet.
        last = -1.0
        while True:
            now = metric_sum(metrics(), "controller_runtime_reconcile_total")
            if now == last:
                break
            last = now
            time.sleep(2)
        writes = metric_sum(metrics(), "deepstack_operator_api_writes_total")
        cpu = metric_sum(metrics(), "deepstack_operator_reconcile_cpu_seconds_total")
        reconciles = metric_sum(metrics(), "controller_runtime_reconcile_total")
        kubectl("-n", namespace, "annotate", "dsd", "--all", f"bench/resync={uuid.uuid4().hex[:6]}")
        wait(
            lambda: (
                metric_sum(metrics(), "controller_runtime_reconcile_total")
                >= reconciles + args.count
            ),
            args.timeout,
            "a second reconcile of every resource",
        )
        noop_writes = metric_sum(metrics(), "deepstack_operator_api_writes_total") - writes
        with open(f"/proc/{operator.pid}/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        result = {
            "count": args.count,
            "seconds_to_all_ready": round(seconds, 2),
            "api_writes_per_cr": round(writes / args.count, 2),
            "reconcile_cpu_seconds_per_cr": round(cpu / args.count, 4),
            "status_lag_p50_s": statistics.median(lags),
            "status_lag_max_s": max(lags),
            "noop_writes": int(noop_writes),
            "operator_peak_rss_bytes": peak,
        }
    finally:
        operator.terminate()
        operator.wait(30)
        kubectl("delete", "namespace", namespace, "--timeout=280s")  # the next phase starts clean
    base = baseline_seconds(example, args.count, args.timeout)
    result["baseline_seconds_to_all_ready"] = round(base, 2)
    result["ratio_to_baseline"] = round(result["seconds_to_all_ready"] / base, 3)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
