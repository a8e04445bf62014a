"""The operator as a real subprocess against the local control plane."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from devkit.cluster import REPO, Cluster, wait_for
from devkit.metrics import sample
from devkit.runtime import free_port


class OperatorProcess:
    """`python -m deepstack_operator ...`; always stopped by `stop()` (use as a context)."""

    def __init__(self, cluster: Cluster, *args: str, log: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "DEEPSTACK_OPERATOR_METRICS_PORT": str(self.port),
            "DEEPSTACK_OPERATOR_METRICS_HOST": "127.0.0.1",
            "DEEPSTACK_PEERING_LIFETIME": "10",
        }
        self.log_path = log
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deepstack_operator", *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> OperatorProcess:
        wait_for(self.healthy, timeout=60, what="operator /healthz")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"operator exited with {self.process.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    def reconciles(self, result: str = "success") -> float:
        return sample(
            self.metrics(),
            "controller_runtime_reconcile_total",
            controller="deepstackdisaggregation",
            result=result,
        )

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a node dies."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def get_json(cluster: Cluster, *args: str) -> dict[str, Any]:
    out = cluster.kubectl(*args, "-o", "json").stdout
    data: dict[str, Any] = json.loads(out)
    return data


def dsd(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return get_json(cluster, "-n", namespace, "get", "dsd", name)


def wait_for_status(
    cluster: Cluster, namespace: str, name: str, *, timeout: float = 90, **expected: Any
) -> dict[str, Any]:
    """Wait until status has the expected top-level values (phase=..., observedGeneration=...)."""

    def probe() -> dict[str, Any] | None:
        status = dsd(cluster, namespace, name).get("status") or {}
        return status if all(status.get(k) == v for k, v in expected.items()) else None

    return wait_for(probe, timeout=timeout, what=f"{namespace}/{name} status {expected}")


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    (found,) = [c for c in status.get("conditions", []) if c["type"] == kind]
    assert isinstance(found, dict)
    return found


def group_name(cluster: Cluster, namespace: str, name: str, role: str) -> str:
    """The StatefulSet of a pod group's current revision, as the status names it."""
    return f"{name}-{role}-{dsd(cluster, namespace, name)['status']['revision']}"


def config_map_name(cluster: Cluster, namespace: str, name: str) -> str:
    """The current revision's runtime ConfigMap."""
    return f"{name}-runtime-{dsd(cluster, namespace, name)['status']['revision']}"


class StatusRecorder:
    """Every status a resource goes through, from a watch (a poll can miss a short one)."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        from kubernetes import client, watch

        self.statuses: list[dict[str, Any]] = []
        self._api: Any = client.CustomObjectsApi(cluster.api_client())
        self._watch: Any = watch.Watch()  # type: ignore[no-untyped-call]
        self._args = ("disagg.deepstack.dev", "v1alpha1", namespace, "deepstackdisaggregations")
        self._name = name
        self._start = dsd(cluster, namespace, name)["metadata"]["resourceVersion"]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> StatusRecorder:
        self._thread.start()
        return self

    def _follow(self) -> None:
        try:
            for event in self._watch.stream(
                self._api.list_namespaced_custom_object, *self._args,
                field_selector=f"metadata.name={self._name}",
                resource_version=self._start, timeout_seconds=600,
            ):  # fmt: skip
                self.statuses.append(event["object"].get("status") or {})
        except Exception:
            if not self._stopping.is_set():
                raise

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._watch.stop()
        self._thread.join(10)

    def seen(self, kind: str) -> list[tuple[str, str]]:
        """(status, reason) of one condition, in the order the statuses came."""
        out = []
        for status in self.statuses:
            found = [c for c in status.get("conditions", []) if c["type"] == kind]
            if found:
                out.append((found[0]["status"], found[0]["reason"]))
        return out
