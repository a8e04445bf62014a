"""Images travel as bytes: the router reads headers only and needs no torch, encode pods
decode, preprocess and cache each image's rows by content, the router routes by content.
Real servers, real Mooncake tcp; every answer checked against the undivided transformers
model's."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deepstack_runtime.models.tiny import make_tiny_model
from deepstack_runtime.servers.wire import MEDIA_TYPE, MediaItem, content_hash, encode_media
from devkit.cluster import REPO, wait_for
from devkit.metrics import sample, sample_or_zero
from devkit.oracles import ReferencePreprocessor, monolithic_generate, split_media
from devkit.runtime import (
    ServerProcess,
    data_url,
    get,
    post,
    runtime_config,
    serving_stack,
    tiny_stack,
    wait_until_router_sees_both,
)

TRANSFER: dict[str, Any] = {"blockTokens": 16, "defaultAllocationTokens": 64, "poolBlocks": 512}
MAX_TOKENS = 8


def picture(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """A picture with some structure (the tower sees more than one colour)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (rng.randrange(256), 90, 160))
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        box = (x, y, min(width, x + width // 4 + 1), min(height, y + height // 4 + 1))
        image.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), box)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def user(image: bytes | None, text: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny-qwen3-vl-moe", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": messages, **extra,
    }  # fmt: skip


def monolithic(model: Path, messages: list[dict[str, Any]]) -> str:
    """The undivided model's greedy answer to the same messages."""
    plain, media = split_media(messages)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in media]
    pre = ReferencePreprocessor(model)
    return pre.decode(monolithic_generate(model, pre.prepare(plain, images), MAX_TOKENS))


def cache(server: ServerProcess) -> dict[str, float]:
    text = server.metrics()
    return {
        kind: sample_or_zero(text, f"deepstack_embedding_cache_{kind}_total")
        for kind in ("hits", "misses", "coalesced")
    }


def blocks_held(server: ServerProcess) -> float:
    text = server.metrics()
    return sum(sample(text, "deepstack_buffer_blocks", state=s) for s in ("used", "fenced"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tiny_stack(tmp_path_factory.mktemp("bytes"), **TRANSFER) as servers:
        yield servers


def answer(stack: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    status, reply = post(f"{stack['router'].url}/v1/chat/completions", body)
    assert status == 200, reply
    assert isinstance(reply, dict)
    return reply


def test_four_turns_resending_one_image_run_the_tower_once(stack: dict[str, Any]) -> None:
    """As every OpenAI client does: each turn resends the whole conversation, image
    included. The encode pod computes its rows once; every answer is the monolithic one."""
    image = picture(96, 64, seed=1)
    messages = [user(image, "Describe the image.")]
    before = cache(stack["encode"])
    for turn in range(4):
        reply = answer(stack, chat(messages))
        text = reply["choices"][0]["message"]["content"]
        assert text == monolithic(stack["model"], messages), turn
        # The reference backend has no prefix cache: nothing reused, and it says so.
        assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        messages += [{"role": "assistant", "content": text}, user(None, f"And then? {turn}")]
    after = cache(stack["encode"])
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 3


def test_eight_requests_at_once_for_one_cold_image_run_the_tower_once(
    stack: dict[str, Any],
) -> None:
    body = chat([user(picture(80, 80, seed=2), "What is it?")])
    before = cache(stack["encode"])
    replies: list[tuple[int, Any]] = []
    threads = [
        threading.Thread(
            target=lambda: replies.append(post(f"{stack['router'].url}/v1/chat/completions", body))
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [status for status, _ in replies] == [200] * 8, replies
    assert len({reply["choices"][0]["message"]["content"] for _, reply in replies}) == 1
    after = cache(stack["encode"])
    assert after["misses"] - before["misses"] == 1
    assert (after["hits"] + after["coalesced"]) - (before["hits"] + before["coalesced"]) == 7


@pytest.mark.parametrize("size", [(2560, 1440), (997, 41), (41, 997)], ids=str)
def test_large_and_odd_images_answer_like_the_monolithic_model(
    stack: dict[str, Any], size: tuple[int, int]
) -> None:
    messages = [user(picture(*size, seed=3, fmt="JPEG"), "Describe the image.")]
    reply = answer(stack, chat(messages))
    assert reply["choices"][0]["message"]["content"] == monolithic(stack["model"], messages)


def png_promising(width: int, height: int) -> bytes:
    """A PNG whose header promises width x height and whose data holds nearly nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is text, not a picture", "is not a PNG, JPEG, WebP or GIF image"),
        (picture(40, 40, seed=4, fmt="BMP"), "BMP is not a supported image format"),
        (picture(64, 48, seed=5)[:200], "image could not be decoded: image file is truncated"),
        (png_promising(5000, 5000), "25,000,000 pixels; the limit is 16,777,216"),
        (png_promising(100_000, 100_000), "too large to open"),
        (png_promising(64, 48), "could not be decoded"),  # a header with no picture behind
    ],
    ids=["not-an-image", "bmp", "truncated", "over-the-limit", "bomb", "empty-data"],
)
def test_a_bad_image_is_a_400_with_its_reason_and_holds_no_block(
    stack: dict[str, Any], data: bytes, reason: str
) -> None:
    status, reply = post(
        f"{stack['router'].url}/v1/chat/completions", chat([user(data, "What is it?")])
    )
    assert status == 400, reply
    assert "image" in reply["error"]["message"]
    assert reason in reply["error"]["message"], reply
    for role in ("encode", "language"):
        wait_for(lambda r=role: blocks_held(stack[r]) == 0, timeout=30, what=f"{role} blocks")  # type: ignore[misc]


def test_an_encode_request_is_checked_against_its_bytes(stack: dict[str, Any]) -> None:
    """What the encode pod caches under a hash is what has it, and the image must be the
    one described: else a 400 before any work."""
    data = picture(64, 48, seed=6)
    honest = MediaItem(content_hash(data), len(data), "PNG", 64, 48, (1, 6, 8))
    url = f"{stack['encode'].url}/v1/encode"
    # Its rows cached first: a description that differs is still checked, never a hit.
    answer(stack, chat([user(data, "What is it?")]))
    cases = [
        (MediaItem("0" * 64, len(data), "PNG", 64, 48, (1, 6, 8)), "do not have the sha256"),
        (MediaItem(honest.sha256, len(data), "PNG", 48, 64, (1, 8, 6)), "the router described"),
        (MediaItem(honest.sha256, len(data), "PNG", 64, 48, (1, 8, 8)), "the router counted"),
    ]
    for n, (item, reason) in enumerate(cases):
        body = encode_media(f"checked-{n}", [(item, data)])
        status, reply = post(url, body, content_type=MEDIA_TYPE)
        assert status == 400, reply
        assert reason in reply["error"]["message"], reply
    status, reply = post(url, b'{"room": "json"}')
    assert status == 400
    assert MEDIA_TYPE in reply["error"]["message"]
    wait_for(lambda: blocks_held(stack["encode"]) == 0, timeout=30, what="encode blocks")


def test_the_published_processor_serves_a_2560x1440_screenshot(tmp_path: Path) -> None:
    """With Qwen3-VL's own image processor settings a 2560x1440 screenshot is 3,600 visual
    tokens (88 MB of float32 pixels, which no longer travel): the answer through the
    router is the monolithic model's, and the encode pod got about the file's bytes."""
    model = make_tiny_model(tmp_path / "model", seed=0, published_image_processor=True)
    config = tmp_path / "config.json"
    config.write_text(
        runtime_config(model, blockTokens=64, defaultAllocationTokens=1024, poolBlocks=128)
        .to_json()
    )  # fmt: skip
    image = picture(2560, 1440, seed=7)
    messages = [user(image, "Describe the image.")]
    with serving_stack(config, tmp_path) as (encode, _, router):
        wait_until_router_sees_both(router.url)
        status, reply = post(f"{router.url}/v1/chat/completions", chat(messages), timeout=300)
        assert status == 200, reply
        assert reply["usage"]["prompt_tokens"] > 3600
        assert reply["choices"][0]["message"]["content"] == monolithic(model, messages)
        received = sample(
            encode.metrics(), "deepstack_request_size_bytes_sum", role="encode", route="/v1/encode"
        )
        assert len(image) < received < 1.1 * len(image)


def test_a_repeated_image_goes_to_the_same_encode_pod_and_only_its_keys_move(
    tmp_path: Path,
) -> None:
    """Two encode pods: each image always goes to one of them (its rows are cached
    there); when that pod dies only its own images move to the other, and nothing fails."""
    model = make_tiny_model(tmp_path / "model", seed=0)
    config = tmp_path / "config.json"
    config.write_text(runtime_config(model, **TRANSFER).to_json())
    with (
        ServerProcess("encode", config, tmp_path / "encode-a.log") as first,
        ServerProcess("encode", config, tmp_path / "encode-b.log") as second,
        ServerProcess("language", config, tmp_path / "language.log") as language,
        ServerProcess(
            "router",
            config,
            tmp_path / "router.log",
            "--encode-url",
            first.url,
            "--encode-url",
            second.url,
            "--language-url",
            language.url,
        ) as router,  # fmt: skip
    ):
        wait_for(
            lambda: json.loads(get(f"{router.url}/health")[1]).get("encode") == 2,
            timeout=60, what="both encode pods in rotation",
        )  # fmt: skip
        encoders = {"a": first, "b": second}
        images = [picture(48 + 8 * i, 48, seed=10 + i) for i in range(8)]
        owner: dict[int, str] = {}
        for i, image in enumerate(images):
            for _ in range(2):
                before = {name: cache(e) for name, e in encoders.items()}
                body = chat([user(image, "What is it?")])
                assert post(f"{router.url}/v1/chat/completions", body)[0] == 200
                (served,) = [
                    name for name, e in encoders.items()
                    if sum(cache(e).values()) > sum(before[name].values())
                ]  # fmt: skip
                assert owner.setdefault(i, served) == served  # the same pod both times
        assert set(owner.values()) == {"a", "b"}, owner  # both pods have keys
        survivor = "b" if owner[0] == "a" else "a"
        encoders["a" if survivor == "b" else "b"].process.kill()
        start = cache(encoders[survivor])
        for image in images:
            body = chat([user(image, "What is it?")])
            status, reply = post(f"{router.url}/v1/chat/completions", body)
            assert status == 200, reply  # the dead pod's requests went to the survivor
        after = cache(encoders[survivor])
        moved = sum(1 for pod in owner.values() if pod != survivor)
        assert after["misses"] - start["misses"] == moved  # only the dead pod's images
        assert after["hits"] - start["hits"] == len(images) - moved  # the rest stayed


def test_the_router_runs_without_torch(stack: dict[str, Any], tmp_path: Path) -> None:
    """The router's process has no torch to import: it is left out of its packages, and
    the router serves an image request through the stack. Where torch is installed (the
    runtime image), the router does not load it either: it stays small."""
    rss = sample(stack["router"].metrics(), "process_resident_memory_bytes")
    assert rss < 250 * 2**20, f"the stack's router holds {rss / 2**20:.0f} MiB"
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    view = tmp_path / "site-packages"
    view.mkdir()
    left_out = ("torch", "torchvision", "torchaudio", "nvidia", "triton", "functorch")
    for entry in site.iterdir():
        if not entry.name.split("-")[0].split(".")[0].startswith(left_out):
            (view / entry.name).symlink_to(entry)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(view)])}
    with ServerProcess(
        "router", stack["config"], tmp_path / "router.log",
        "--encode-url", stack["encode"].url, "--language-url", stack["language"].url,
        python=str(python), env=env,
    ) as router:  # fmt: skip
        wait_until_router_sees_both(router.url)
        messages = [user(picture(64, 48, seed=20), "Describe the image.")]
        status, reply = post(f"{router.url}/v1/chat/completions", chat(messages))
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == monolithic(stack["model"], messages)
        rss = sample(router.metrics(), "process_resident_memory_bytes")
        print(f"router RSS without torch: {rss / 2**20:.0f} MiB")
        assert rss < 250 * 2**20
