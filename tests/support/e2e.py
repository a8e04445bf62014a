"""What the end-to-end tests on the real node share: the demo's request, its pods, their
metrics, and traffic that records every answer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devkit.cluster import Cluster, wait_for
from devkit.metrics import sample_or_zero
from devkit.runtime import data_url, get, png, post
from tests.support.operator import get_json, wait_for_status

NAME = "tiny-qwen3-vl-moe"
IMAGE = png(64, 48, (20, 160, 220))


def chat(max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {
        "model": NAME,
        "max_tokens": max_tokens,
        "temperature": 0,  # greedy: compared with the monolithic model's answer
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        **extra,
    }


def pods(cluster: Cluster, namespace: str, role: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component={role}"
    items: list[dict[str, Any]] = get_json(cluster, "-n", namespace, "get", "pods", "-l", selector)[
        "items"
    ]
    return sorted(items, key=lambda p: p["metadata"]["name"])


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def metrics(pod: dict[str, Any]) -> str:
    return get(f"http://{pod['status']['podIP']}:9090/metrics")[1]


def served(pod: dict[str, Any]) -> float:
    labels = {"role": "language", "route": "/v1/generate", "code": "200"}
    return sample_or_zero(metrics(pod), "deepstack_requests_total", **labels)


def router_counts(url: str) -> dict[str, int]:
    """How many healthy encode and language pods the router uses."""
    status, body = get(f"{url}/health")
    counts = json.loads(body) if status == 200 else {}
    return {role: counts.get(role, 0) for role in ("encode", "language")}


@dataclass
class Traffic:
    """Requests sent one after another until stopped: each one's status and body. Each
    request has an image of its own (a repeated one would be the encode pods' cached rows,
    and one conversation that the router keeps on one language pod)."""

    url: str
    max_tokens: int = 4
    image_size: tuple[int, int] = (64, 48)
    results: list[tuple[int, Any]] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # each one's start, end
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run)
        self._thread.start()
        return self

    def _body(self, n: int) -> dict[str, Any]:
        body = chat(self.max_tokens)
        colour = (n * 37 % 256, (n // 256 * 101 + id(self)) % 256, n * 7 % 256)
        body["messages"][0]["content"][0]["image_url"]["url"] = data_url(
            png(*self.image_size, colour)
        )
        return body

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            started = time.monotonic()
            n += 1
            try:
                result = post(f"{self.url}/v1/chat/completions", self._body(n), timeout=60)
            except OSError as e:  # no HTTP answer at all: recorded, never hidden
                result = (0, str(e))
            self.spans.append((started, time.monotonic()))
            self.results.append(result)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def failures(self) -> list[tuple[int, Any]]:
        return [r for r in self.results if r[0] != 200]


def wait_until(probe: Callable[[], Any], what: str, timeout: float = 180) -> Any:
    return wait_for(probe, timeout=timeout, interval=0.5, what=what)


def restart_count(pod: dict[str, Any]) -> int:
    return sum(s.get("restartCount", 0) for s in pod["status"].get("containerStatuses", []))


def pod_named(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = get_json(cluster, "-n", namespace, "get", "pod", name)
    return found


def set_replicas(cluster: Cluster, namespace: str, role: str, replicas: int) -> None:
    cluster.kubectl(
        "-n", namespace, "patch", "dsd", NAME, "--type=merge",
        "-p", json.dumps({"spec": {role: {"replicas": replicas}}}),
    )  # fmt: skip


def scale_language(
    cluster: Cluster, namespace: str, router_url: str, replicas: int, timeout: float = 400
) -> dict[str, Any]:
    """Set the language group's replicas, wait until the resource is Ready at that
    generation and the router uses that many language pods; its status then."""
    set_replicas(cluster, namespace, "language", replicas)
    generation = get_json(cluster, "-n", namespace, "get", "dsd", NAME)["metadata"]["generation"]
    status: dict[str, Any] = wait_for_status(
        cluster, namespace, NAME, timeout=timeout, phase="Ready", observedGeneration=generation
    )
    wait_until(
        lambda: router_counts(router_url).get("language") == replicas,
        f"the router to use {replicas} language pods",
    )
    return status
