"""Serving benchmark: the tiny model on CPU, disaggregated vs monolithic, side by side.

  disaggregated  our router -> encode server -> Mooncake tcp -> language server (3 processes)
  monolithic     --backend reference: one process running the undivided transformers model
                 behind the same HTTP request (same preprocessing, same greedy decoding);
                 --backend sglang: SGLang's own single server (vision and language in one
                 engine) on the same CPU, while our language server runs SGLang's engine
For 1..8 concurrent clients, each sending --requests requests with one image, prints one
JSON object per concurrency level with requests/s and p50/p99 latency of both, and the
overhead ratio (disaggregated latency / monolithic latency at p50).

With --video (reference backend): one client sends --requests clips of each length in
--video-seconds (10 fps, 128x96, each clip another, so no cache hit on either side) and
one JSON object per length gives both p50 latencies, the overhead ratio, the resumed
rounds and encode seconds per request, and the clip seconds served per wall second.
SGLang's own server is no baseline for video here: its environment has no video decoder
(torchcodec or decord), and it samples and resizes clips its own way, not as the
checkpoint's processor does.

    python benchmarks/serving.py [--backend reference|sglang] [--video] --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from deepstack_runtime.config import DEFAULT_ENCODE_CACHE_MIB

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_TOKENS = 8


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def request_body() -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    return {
        "model": "tiny-qwen3-vl-moe",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,  # greedy on both sides (the OpenAI default is 1.0)
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


MONOLITHIC_SERVER = """
import asyncio, sys, torch
from aiohttp import web
from deepstack_runtime.backends.reference import load_model
from deepstack_runtime.servers.prompt import parse_messages
from devkit.oracles import MediaPreprocessor, ReferencePreprocessor, media_generate
model_dir, port = sys.argv[1], int(sys.argv[2])
pre = ReferencePreprocessor(model_dir)
media_pre = MediaPreprocessor(model_dir)
model = load_model(model_dir)
lock = asyncio.Lock()

def run(prompt):
    ids = prompt.input_ids.unsqueeze(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=prompt.pixel_values,
                             image_grid_thw=prompt.image_grid_thw,
                             mm_token_type_ids=(ids == model.config.image_token_id).long(),
                             max_new_tokens=int(sys.argv[3]), do_sample=False)
    return out[0, ids.shape[1]:].tolist()

async def chat(request):
    body = await request.json()
    messages, refs = parse_messages(body, 8)
    if any(ref.kind == "video" for ref in refs):  # transformers' own video pipeline
        import base64
        media = [(ref.kind, base64.b64decode(ref.url.split(",", 1)[1])) for ref in refs]
        inputs = await asyncio.to_thread(media_pre.inputs, messages, media)
        async with lock:
            tokens = await asyncio.to_thread(media_generate, model, inputs, int(sys.argv[3]))
        return web.json_response({"choices": [{"message": {"content": media_pre.decode(tokens)}}]})
    images = [ref.url for ref in refs]  # transformers reads the data: URLs
    prompt = await asyncio.to_thread(pre.prepare, messages, images)
    async with lock:
        tokens = await asyncio.to_thread(run, prompt)
    return web.json_response({"choices": [{"message": {"content": pre.decode(tokens)}}]})

async def health(_):
    return web.json_response({"status": "ok"})

app = web.Application(client_max_size=64 << 20)
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/health", health)
print("READY", flush=True)
web.run_app(app, host="127.0.0.1", port=port, print=None)
"""


def video_body(seconds: int, seed: int) -> dict[str, Any]:
    from devkit.videos import clip

    data = clip(seconds * VIDEO_FPS, VIDEO_FPS, 128, 96, seed=seed)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    return {
        "model": "tiny-qwen3-vl-moe",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
    }


VIDEO_FPS = 10


async def counter(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """A series' value from a server's /metrics (its API port: no metrics port of its own)."""
    from devkit.metrics import sample_or_zero

    async with session.get(f"{url}/metrics") as r:
        return sample_or_zero(await r.text(), name, **labels)


async def timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        await r.read()
        if r.status != 200:
            raise SystemExit(f"{url}: {r.status} {await r.text()}")
    return time.perf_counter() - t0


async def video_rows(
    session: aiohttp.ClientSession, ours: str, base: str, pods: dict[str, str],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for seconds in args.video_seconds:
        bodies = [video_body(seconds, seed=1000 * seconds + i) for i in range(args.requests)]
        resumed = await counter(session, pods["language"], "deepstack_transfer_resumptions_total")
        encode = [
            await counter(session, pods["encode"], f"deepstack_encode_seconds_{part}",
                          modality="video")
            for part in ("sum", "count")
        ]  # fmt: skip
        started = time.perf_counter()
        d = sorted([await timed(session, ours, body) for body in bodies])
        d_wall = time.perf_counter() - started
        started = time.perf_counter()
        m = sorted([await timed(session, base, body) for body in bodies])
        m_wall = time.perf_counter() - started
        resumed = (
            await counter(session, pods["language"], "deepstack_transfer_resumptions_total")
            - resumed
        )
        encode_sum = await counter(
            session, pods["encode"], "deepstack_encode_seconds_sum", modality="video"
        )
        encode_count = await counter(
            session, pods["encode"], "deepstack_encode_seconds_count", modality="video"
        )
        computed = max(1.0, encode_count - encode[1])
        rows.append(
            {
                "backend": args.backend,
                "video_seconds": seconds,
                "requests": len(bodies),
                "disaggregated_p50_ms": round(statistics.median(d) * 1e3, 1),
                "monolithic_p50_ms": round(statistics.median(m) * 1e3, 1),
                "overhead_ratio_p50": round(statistics.median(d) / statistics.median(m), 3),
                "resumed_rounds": round(resumed / len(bodies), 2),
                "encode_seconds": round((encode_sum - encode[0]) / computed, 4),
                "video_seconds_per_second": round(seconds * len(bodies) / d_wall, 2),
                "monolithic_video_seconds_per_second": round(seconds * len(bodies) / m_wall, 2),
            }
        )
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_healthy(session: aiohttp.ClientSession, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/health") as r:
                text = await r.text()
                # Our router lists healthy instances by role; SGLang answers an empty 200.
                body = json.loads(text) if text.strip() else {}
                if r.status == 200 and body.get("language", 1) and body.get("encode", 1):
                    return
        except (aiohttp.ClientError, json.JSONDecodeError):
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy")


async def load(
    session: aiohttp.ClientSession, url: str, clients: int, requests: int
) -> dict[str, float]:
    body = request_body()
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"{url}: {r.status}")
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import dataclasses

    from deepstack_runtime.models.tiny import make_tiny_model
    from devkit.runtime import runtime_config
    from devkit.sglang_on_cpu import SGLANG_CPU_ARGS, SGLANG_ENV, SGLANG_PYTHON

    root = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    model = make_tiny_model(root / "model", seed=0)
    config = root / "config.json"
    config.write_text(
        dataclasses.replace(
            # A 30 s clip is 1,440 visual tokens: more than the example's pool of 1,024.
            runtime_config(model, **({"poolBlocks": 256} if args.video else {})),
            backend=args.backend,
            encode_cache_mib=args.embedding_cache_mib,
        ).to_json()
    )
    python = sys.executable
    ports = {role: free_port() for role in ("encode", "language", "router", "monolithic")}
    common = ["--config", str(config), "--host", "127.0.0.1", "--metrics-port", "0"]
    logs = {role: (root / f"{role}.log").open("w") for role in ports}
    sglang = args.backend == "sglang"
    sglang_env = {**os.environ, **SGLANG_ENV}
    # fmt: off
    language = (
        [SGLANG_PYTHON, "-m", "deepstack_runtime", "language", *common,
         "--port", str(ports["language"]), *SGLANG_CPU_ARGS]
        if sglang else
        [python, "-m", "deepstack_runtime", "language", *common, "--port", str(ports["language"])]
    )
    monolithic = (
        [SGLANG_PYTHON, "-m", "sglang.launch_server", "--model-path", str(model),
         "--host", "127.0.0.1", "--port", str(ports["monolithic"]), *SGLANG_CPU_ARGS]
        if sglang else
        [python, "-c", MONOLITHIC_SERVER, str(model), str(ports["monolithic"]), str(MAX_TOKENS)]
    )
    procs = [
        subprocess.Popen(
            [python, "-m", "deepstack_runtime", "encode", *common,
             "--port", str(ports["encode"]), "--bootstrap-port", "0"],
            stdout=logs["encode"], stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            language, stdout=logs["language"], stderr=subprocess.STDOUT,
            env=sglang_env if sglang else None,
        ),
        subprocess.Popen(
            [python, "-m", "deepstack_runtime", "router", *common, "--port", str(ports["router"]),
             "--encode-url", f"http://127.0.0.1:{ports['encode']}",
             "--language-url", f"http://127.0.0.1:{ports['language']}"],
            stdout=logs["router"], stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            monolithic, stdout=logs["monolithic"], stderr=subprocess.STDOUT, cwd=REPO,
            env=sglang_env if sglang else None,
        ),
    ]
    # fmt: on
    rows = []
    try:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            ours = f"http://127.0.0.1:{ports['router']}"
            base = f"http://127.0.0.1:{ports['monolithic']}"
            await wait_healthy(session, ours, 300)
            await wait_healthy(session, base, 300)
            await load(session, ours, 1, 2)  # warm up both
            await load(session, base, 1, 2)
            if args.video:
                pods = {role: f"http://127.0.0.1:{ports[role]}" for role in ("encode", "language")}
                await timed(session, ours, video_body(1, seed=1))  # warm up the video paths
                await timed(session, base, video_body(1, seed=1))
                return await video_rows(session, ours, base, pods, args)
            for clients in args.clients:
                d = await load(session, ours, clients, args.requests)
                m = await load(session, base, clients, args.requests)
                rows.append(
                    {
                        "backend": args.backend,
                        "embedding_cache_mib": args.embedding_cache_mib,
                        "concurrency": clients,
                        "disaggregated_rps": round(d["rps"], 2),
                        "monolithic_rps": round(m["rps"], 2),
                        "disaggregated_p50_ms": round(d["p50"] * 1e3, 1),
                        "monolithic_p50_ms": round(m["p50"] * 1e3, 1),
                        "disaggregated_p99_ms": round(d["p99"] * 1e3, 1),
                        "monolithic_p99_ms": round(m["p99"] * 1e3, 1),
                        "overhead_ratio_p50": round(d["p50"] / m["p50"], 3),
                    }
                )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--backend", choices=["reference", "sglang"], default="reference")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument(
        "--embedding-cache-mib",
        type=int,
        default=DEFAULT_ENCODE_CACHE_MIB,
        help="the encode pod's cache (every request sends the same image: 0 makes each one "
        "run the vision tower, as the monolithic server does)",
    )
    parser.add_argument("--video", action="store_true", help="clips instead of images")
    parser.add_argument("--video-seconds", type=int, nargs="+", default=[2, 5, 10, 30])
    args = parser.parse_args()
    if args.video and args.backend != "reference":
        parser.error("--video has a baseline on the reference backend only (see above)")
    rows = asyncio.run(run(args))
    for row in rows:
        print(json.dumps(row) if args.json else " ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
