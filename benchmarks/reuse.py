"""Reuse benchmark: what the encode pods' embedding cache saves, cache on against cache off
in one run, on real local servers (router, encode, language; --backend reference or
sglang) serving a tiny Qwen3-VL-MoE with Qwen3-VL's published image processor (1280x960
JPEG photos, 1.2 megapixels, are 1,200 visual tokens).

  conversation  4 conversations of 4 turns; every turn resends the whole history, its
                image included (as OpenAI clients do)
  shared        8 users sending 48 requests with one image each, 20% of the images drawn
                from a small set every user sends

One JSON line per case: the encode pod's CPU seconds per request (for conversations also
turn 1 against turns 2-4), time to first token p50/p99 (streamed), the router's resident
memory under load, and the bytes an image costs on the wire to the encode pod against its
file. A last line checks the targets: turns 2-4 spend at most 5% of turn 1's encode CPU,
the wire carries at most 1.1x the file, the router stays under 250 MB.

    python benchmarks/reuse.py --json [--backend reference|sglang]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_TOKENS = 8
TURNS = 4


WIDTH, HEIGHT = 1280, 960


def photo(seed: int) -> bytes:
    """A JPEG photo with some structure, different for every seed."""
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (WIDTH, HEIGHT), (rng.randrange(256), rng.randrange(256), 128))
    for _ in range(12):
        x, y = rng.randrange(WIDTH), rng.randrange(HEIGHT)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        image.paste(colour, (x, y, min(WIDTH, x + WIDTH // 5), min(HEIGHT, y + HEIGHT // 5)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def user(image: bytes | None, text: str) -> dict[str, Any]:
    import base64

    content: list[dict[str, Any]] = []
    if image is not None:
        url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def metrics(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.labels or s.name.startswith("deepstack_request_size_bytes"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def ask(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]]
) -> tuple[str, float]:
    """The streamed answer and its time to first token."""
    body = {"model": "tiny-qwen3-vl-moe", "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "messages": messages}  # fmt: skip
    started = time.perf_counter()
    first: float | None = None
    text = ""
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise SystemExit(f"{r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if first is None and "content" in delta:
                first = time.perf_counter() - started
            text += delta.get("content") or ""
    return text, first if first is not None else time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def conversations(stack: dict[str, Any]) -> dict[str, Any]:
    router, encode = stack["router"].url, stack["encode"].url
    ttft: list[float] = []
    cpu = {"first": 0.0, "later": 0.0}
    wire = files = images = 0.0
    async with aiohttp.ClientSession() as session:
        for c in range(4):
            image = photo(1000 + c)
            messages = [user(image, "Describe the photo.")]
            for turn in range(TURNS):
                before = metrics(encode)
                text, first = await ask(session, router, messages)
                after = metrics(encode)
                spent = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
                cpu["first" if turn == 0 else "later"] += spent
                wire += wire_bytes(after) - wire_bytes(before)
                files += len(image)
                images += 1
                ttft.append(first)
                messages += [{"role": "assistant", "content": text}, user(None, f"More, {turn}.")]
    first_turn = cpu["first"] / 4
    later_turns = cpu["later"] / (4 * (TURNS - 1))
    return {
        "encode_cpu_seconds_per_request": round((cpu["first"] + cpu["later"]) / images, 4),
        "encode_cpu_seconds_turn_1": round(first_turn, 4),
        "encode_cpu_seconds_turns_2_4": round(later_turns, 4),
        "later_turns_to_first_cpu_ratio": round(later_turns / max(first_turn, 1e-9), 3),
        **latency(ttft), **wire_ratio(wire, files, images),
        "router_rss_bytes": int(metrics(router)["process_resident_memory_bytes"]),
    }  # fmt: skip


async def shared(stack: dict[str, Any]) -> dict[str, Any]:
    router, encode = stack["router"].url, stack["encode"].url
    rng = random.Random(7)
    common = [photo(2000 + i) for i in range(4)]
    bodies = []
    for n in range(48):
        image = rng.choice(common) if rng.random() < 0.2 else photo(3000 + n)
        bodies.append([user(image, "What is in the photo?")])
    ttft: list[float] = []
    before = metrics(encode)
    rss = 0
    async with aiohttp.ClientSession() as session:

        async def one_user(mine: list[list[dict[str, Any]]]) -> None:
            for messages in mine:
                ttft.append((await ask(session, router, messages))[1])

        load = asyncio.gather(*(one_user(bodies[u::8]) for u in range(8)))
        while not load.done():  # the router's memory while it serves
            rss = max(rss, int(metrics(router)["process_resident_memory_bytes"]))
            await asyncio.sleep(0.2)
        await load
    after = metrics(encode)
    files = sum(len(b[0]["content"][0]["image_url"]["url"]) * 3 / 4 for b in bodies)
    spent = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
    return {
        "encode_cpu_seconds_per_request": round(spent / len(bodies), 4),
        **latency(ttft),
        **wire_ratio(wire_bytes(after) - wire_bytes(before), files, len(bodies)),
        "router_rss_bytes": rss,
    }  # fmt: skip


def wire_bytes(encode_metrics: dict[str, float]) -> float:
    """Bytes the encode pod has received in request bodies so far."""
    return encode_metrics.get("deepstack_request_size_bytes_sum", 0.0)


def latency(ttft: list[float]) -> dict[str, float]:
    return {
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 0.99) * 1000, 1),
    }


def wire_ratio(wire: float, files: float, images: float) -> dict[str, float]:
    return {
        "wire_bytes_per_image": round(wire / images),
        "image_file_bytes": round(files / images),
        "wire_to_file_ratio": round(wire / files, 3),
    }


@contextmanager
def stack(root: Path, backend: str, cache_mib: int) -> Iterator[dict[str, Any]]:
    from deepstack_runtime.models.tiny import make_tiny_model
    from devkit.runtime import runtime_config, serving_stack, wait_until_router_sees_both

    model = make_tiny_model(root / "model", seed=0, published_image_processor=True)
    config = dataclasses.replace(
        runtime_config(model, blockTokens=16, defaultAllocationTokens=512, poolBlocks=1024),
        backend=backend,
        encode_cache_mib=cache_mib,
    )
    (root / "config.json").write_text(config.to_json())
    with serving_stack(root / "config.json", root, backend=backend) as (encode, language, router):
        wait_until_router_sees_both(router.url)
        yield {"encode": encode, "language": language, "router": router}


async def measure(servers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    await ask(aiohttp.ClientSession(), servers["router"].url, [user(None, "warm up")])
    return {"conversation": await conversations(servers), "shared": await shared(servers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines (the only output)")
    parser.add_argument("--backend", choices=["reference", "sglang"], default="reference")
    parser.add_argument("--cache-mib", type=int, default=1024, help="the cache when on")
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for label, mib in (("on", args.cache_mib), ("off", 0)):
        with (
            tempfile.TemporaryDirectory(prefix="reuse-bench-") as root,
            stack(Path(root), args.backend, mib) as servers,
        ):
            results[label] = asyncio.run(measure(servers))
        for case, line in results[label].items():
            size = f"{WIDTH}x{HEIGHT}"
            print(json.dumps({"backend": args.backend, "case": case, "cache": label,
                              "image": size, **line}))  # fmt: skip
    on = results["on"]
    print(json.dumps({
        "backend": args.backend,
        "summary": "targets",
        "later_turns_to_first_cpu_ratio": on["conversation"]["later_turns_to_first_cpu_ratio"],
        "later_turns_target": 0.05,
        "wire_to_file_ratio": max(c["wire_to_file_ratio"] for c in on.values()),
        "wire_target": 1.1,
        "router_rss_bytes": max(c["router_rss_bytes"] for r in results.values() for c in r.values()),  # noqa: E501
        "router_rss_target": 250 << 20,
        "shared_encode_cpu_on_to_off": round(
            on["shared"]["encode_cpu_seconds_per_request"]
            / results["off"]["shared"]["encode_cpu_seconds_per_request"], 3
        ),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
