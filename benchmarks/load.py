"""Load benchmark on the demo's stack (real pods on the local cluster's node, reference
backend, small images): how goodput holds as clients pile up.

Closed loop: N clients, each sending small-image requests back to back for --seconds,
waiting Retry-After after a 429 or 503. Goodput counts the answers completed within the
window, divided by its length. Open loop: requests arriving at a fixed rate
(Poisson), whatever the answers. Per step one JSON line: goodput (answers per second),
time to first token (streamed) p50/p99, counts by status (0: no HTTP answer before the
request's deadline), the router's resident memory, blocks left held on the pods, and the
load generator's own CPU seconds (it shares the machine's cores with the pods). A last line
compares goodput at the most clients with the best step's.

    python benchmarks/load.py --json [--router-url URL --namespace NS] [--clients 16,64,256,512]

Without --router-url it brings up its own demo (hack/demo.py, a namespace of its own) and
takes it down at the end; `make cluster` must be up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
KUBECTL = [
    str(REPO / ".cluster" / "bin" / "kubectl"),
    "--kubeconfig",
    str(REPO / ".cluster" / "kubeconfig"),
]
NAME = "tiny-qwen3-vl-moe"
DEADLINE_SECONDS = 120  # a request with no answer by then has hung


def small_png(seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    buf = io.BytesIO()
    color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return buf.getvalue()


def body(image: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {
        "model": NAME,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
    }


@dataclass
class Step:
    """What one step of load saw."""

    end: float  # when the step's window closes (time.monotonic)
    codes: Counter[int] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    answered: int = 0  # answers completed within the window
    without_retry_after: int = 0  # 429/503 answers that did not say when to come back

    async def one(self, session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> float:
        """One request; returns how long the client should wait before its next."""
        started = time.monotonic()
        try:
            async with session.post(f"{url}/v1/chat/completions", json=payload) as r:
                if r.status != 200:
                    self.codes[r.status] += 1
                    await r.read()
                    retry_after = r.headers.get("Retry-After")
                    if r.status in (429, 503) and retry_after is None:
                        self.without_retry_after += 1
                    return float(retry_after or 1)
                first = None
                async for line in r.content:
                    if first is None and line.startswith(b"data: {"):
                        first = time.monotonic() - started
                    if line.startswith(b'data: {"error"'):
                        self.codes[502] += 1
                        return 1.0
                self.codes[200] += 1
                self.answered += time.monotonic() <= self.end
                if first is not None:
                    self.ttft.append(first)
                return 0.0
        except (aiohttp.ClientError, TimeoutError):
            self.codes[0] += 1
            return 1.0

    def summary(self, seconds: float) -> dict[str, Any]:
        ttft = sorted(self.ttft)

        def pct(q: float) -> float | None:
            return round(ttft[min(len(ttft) - 1, int(len(ttft) * q))] * 1000, 1) if ttft else None

        return {
            "goodput_rps": round(self.answered / seconds, 3),
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1) if ttft else None,
            "ttft_p99_ms": pct(0.99),
            "codes": {str(k): v for k, v in sorted(self.codes.items())},
            "hung": self.codes[0],
            "busy_without_retry_after": self.without_retry_after,
        }


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=DEADLINE_SECONDS),
    )


async def closed_loop(url: str, clients: int, seconds: float, images: list[bytes]) -> Step:
    end = time.monotonic() + seconds
    step = Step(end)

    async def client(n: int) -> None:
        rng = random.Random(n)
        while time.monotonic() < end:
            wait = await step.one(http, url, body(rng.choice(images)))
            await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))

    async with session() as http:
        await asyncio.gather(*(client(n) for n in range(clients)))
    return step


async def open_loop(url: str, rate: float, seconds: float, images: list[bytes]) -> Step:
    end = time.monotonic() + seconds
    step = Step(end)
    rng = random.Random(int(rate * 1000))
    tasks = []
    async with session() as http:
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(step.one(http, url, body(rng.choice(images)))))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return step


def kubectl_json(*args: str) -> Any:
    out = subprocess.run(
        [*KUBECTL, *args, "-o", "json"], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def pod_metrics(namespace: str) -> dict[str, dict[str, float]]:
    """Each runtime pod's samples we read: {pod: {name{labels}: value}}."""
    selector = f"app.kubernetes.io/instance={NAME}"
    pods = kubectl_json("-n", namespace, "get", "pods", "-l", selector)["items"]
    out: dict[str, dict[str, float]] = {}
    for pod in pods:
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            continue
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://{ip}:9090/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}"] = s.value
        out[pod["metadata"]["name"]] = samples
    return out


def router_process(namespace: str | None, url: str) -> dict[str, float]:
    """The router's resident memory and CPU seconds so far (its process metrics)."""
    if namespace is None:  # local servers: the router's /metrics is on its API port
        import urllib.request

        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            samples = {
                s.name + "{}": s.value
                for family in text_string_to_metric_families(r.read().decode())
                for s in family.samples
            }
    else:
        routers = [v for name, v in pod_metrics(namespace).items() if "-router-" in name]
        samples = routers[0] if routers else {}
    return {
        "rss": samples.get("process_resident_memory_bytes{}", 0.0),
        "cpu": samples.get("process_cpu_seconds_total{}", 0.0),
    }


def blocks_held(namespace: str) -> int:
    return int(
        sum(
            value
            for samples in pod_metrics(namespace).values()
            for key, value in samples.items()
            if key.startswith("deepstack_buffer_blocks{")
            and ("state=used" in key or "state=fenced" in key)
        )
    )


def leaked_blocks(namespace: str | None, timeout: float = 60) -> int | None:
    """Blocks still held once the load is over (waited for up to `timeout`)."""
    if namespace is None:
        return None
    deadline = time.monotonic() + timeout
    while (held := blocks_held(namespace)) and time.monotonic() < deadline:
        time.sleep(1)
    return held


@contextlib.contextmanager
def demo() -> Iterator[tuple[str, str]]:
    """The demo's stack in a namespace of its own: (router URL, namespace)."""
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "DEMO_NAMESPACE": namespace}
    script = [sys.executable, str(REPO / "hack" / "demo.py")]
    try:
        up = subprocess.run([*script, "up"], env=env, capture_output=True, text=True, check=True)
        (url,) = re.findall(r"^ROUTER_URL=(.*)$", up.stdout, re.M)
        yield url, namespace
    finally:
        subprocess.run([*script, "down"], env=env, capture_output=True)
        subprocess.run(
            [*KUBECTL, "delete", "namespace", namespace, "--wait=false"], capture_output=True
        )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(url: str, namespace: str | None, args: argparse.Namespace) -> None:
    images = [small_png(seed) for seed in range(32)]
    closed: list[dict[str, Any]] = []
    steps: list[tuple[str, float]] = [("closed", float(c)) for c in args.clients]
    steps += [("open", float(r)) for r in args.rates]
    for mode, level in steps:
        cpu = cpu_seconds()
        router_before = router_process(namespace, url)
        started = time.monotonic()
        if mode == "closed":
            step = asyncio.run(closed_loop(url, int(level), args.seconds, images))
        else:
            step = asyncio.run(open_loop(url, level, args.seconds, images))
        elapsed = time.monotonic() - started
        router_after = router_process(namespace, url)
        line = {
            "mode": mode,
            ("clients" if mode == "closed" else "arrival_rps"): level
            if mode == "open"
            else int(level),
            "seconds": round(elapsed, 1),
            **step.summary(args.seconds),
            "router_rss_bytes": int(router_after["rss"]),
            "router_cpu_seconds": round(router_after["cpu"] - router_before["cpu"], 1),
            "loadgen_cpu_seconds": round(cpu_seconds() - cpu, 1),
            "leaked_blocks": leaked_blocks(namespace),
        }
        print(json.dumps(line), flush=True)
        if mode == "closed":
            closed.append(line)
    if closed:
        best = max(line["goodput_rps"] for line in closed)
        most = max(closed, key=lambda line: line["clients"])
        print(
            json.dumps(
                {
                    "summary": "closed loop",
                    "best_goodput_rps": best,
                    "goodput_at_most_clients_rps": most["goodput_rps"],
                    "clients": most["clients"],
                    "ratio_to_best": round(most["goodput_rps"] / best, 3) if best else None,
                    "target_ratio": 0.9,
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines (the only output)")
    parser.add_argument("--router-url", help="an existing demo's router (else one is brought up)")
    parser.add_argument(
        "--namespace", help="the existing demo's namespace (none: local servers, pods not read)"
    )
    parser.add_argument(
        "--clients", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 256, 512]
    )
    parser.add_argument(
        "--rates", type=lambda s: [float(x) for x in s.split(",")], default=[2, 4, 8, 16]
    )
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    if args.router_url:
        run(args.router_url, args.namespace, args)
        return
    with demo() as (url, namespace):
        run(url, namespace, args)


if __name__ == "__main__":
    main()
