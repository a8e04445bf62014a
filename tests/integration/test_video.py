"""Video end to end on real servers (router, encode and language processes, Mooncake tcp):
`video_url` parts as data: and http URLs, clips made here with PyAV, every answer equal to
the undivided transformers model's for the same messages, prepared by transformers alone
(its own video reader and frame sampling); a clip longer than the language side's
allocation in resumed rounds; bad clips refused with the reason before any work."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.cluster import wait_for
from devkit.metrics import sample, sample_or_zero
from devkit.oracles import monolithic_media_generate, split_media
from devkit.runtime import ServerProcess, data_url, post, tiny_stack
from devkit.videos import clip, empty_clip, truncated_clip, unknown_codec_clip

# The language side allocates 64 tokens at first: longer sequences come in resumed rounds.
TRANSFER: dict[str, Any] = {"blockTokens": 16, "defaultAllocationTokens": 64, "poolBlocks": 512}
MAX_TOKENS = 8
MAX_VIDEO_SECONDS = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tiny_stack(
        tmp_path_factory.mktemp("video"),
        "--max-video-seconds", str(MAX_VIDEO_SECONDS),
        "--image-url-domain", "127.0.0.1",
        **TRANSFER,
    ) as servers:  # fmt: skip
        yield servers


def part(kind: str, data: bytes) -> dict[str, Any]:
    mime = "video/mp4" if kind == "video" else "image/png"
    return {"type": f"{kind}_url", f"{kind}_url": {"url": data_url(data, mime)}}


def ask(stack: dict[str, Any], messages: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    body = {
        "model": "tiny-qwen3-vl-moe", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": messages,
    }  # fmt: skip
    status, reply = post(f"{stack['router'].url}/v1/chat/completions", body)
    assert isinstance(reply, dict)
    return status, reply


def monolithic(model: Path, messages: list[dict[str, Any]]) -> str:
    """The undivided model's greedy answer, from the same messages' media bytes."""
    from transformers import PreTrainedTokenizerFast

    plain, media = split_media(messages)
    tokens = monolithic_media_generate(model, plain, media, MAX_TOKENS)
    text: str = PreTrainedTokenizerFast.from_pretrained(model).decode(
        tokens, skip_special_tokens=True
    )
    return text


def user(*parts: dict[str, Any], text: str = "What happens?") -> dict[str, Any]:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def resumptions(language: ServerProcess) -> float:
    return sample_or_zero(language.metrics(), "deepstack_transfer_resumptions_total")


def blocks_held(server: ServerProcess) -> float:
    text = server.metrics()
    return sum(sample(text, "deepstack_buffer_blocks", state=s) for s in ("used", "fenced"))


def by_modality(encode: ServerProcess) -> dict[str, float]:
    text = encode.metrics()
    return {
        name: sample_or_zero(text, f"deepstack_encode_{name}", modality="video")
        for name in ("items_total", "visual_tokens_total", "seconds_count")
    }


def test_a_short_clip_answers_like_the_monolithic_model(stack: dict[str, Any]) -> None:
    before = by_modality(stack["encode"])
    messages = [user(part("video", clip(20, 10.0, 64, 48)))]
    status, reply = ask(stack, messages)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == monolithic(stack["model"], messages)
    # 4 sampled frames, 2 temporal patches of 6 x 8 patches: 24 visual tokens.
    after = by_modality(stack["encode"])
    assert {name: after[name] - before[name] for name in after} == {
        "items_total": 1, "visual_tokens_total": 24, "seconds_count": 1,
    }  # fmt: skip


def test_a_long_clip_arrives_in_resumed_rounds_and_answers_the_same(
    stack: dict[str, Any],
) -> None:
    """8 sampled frames of 128 x 96: 4 temporal patches of 48 tokens, 192 rows with their
    DeepStack features, three times the language side's first allocation (the rest comes
    in one resumed round: the receiver asks for all that is left at once)."""
    before = resumptions(stack["language"])
    messages = [user(part("video", clip(40, 10.0, 128, 96)))]
    status, reply = ask(stack, messages)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == monolithic(stack["model"], messages)
    assert resumptions(stack["language"]) - before == 1


def test_an_image_and_a_video_in_one_request(stack: dict[str, Any]) -> None:
    from tests.integration.test_images_as_bytes import picture

    messages = [
        user(
            part("image", picture(64, 48, seed=3)),
            {"type": "text", "text": "and then"},
            part("video", clip(24, 8.0, 96, 64)),
            text="Compare them.",
        )
    ]
    status, reply = ask(stack, messages)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == monolithic(stack["model"], messages)


def test_a_video_in_turn_one_and_a_question_in_turn_two_hits_the_cache(
    stack: dict[str, Any],
) -> None:
    encode = stack["encode"]
    hits = sample_or_zero(encode.metrics(), "deepstack_embedding_cache_hits_total")
    misses = sample_or_zero(encode.metrics(), "deepstack_embedding_cache_misses_total")
    messages = [user(part("video", clip(30, 10.0, 80, 64)))]
    status, first = ask(stack, messages)
    assert status == 200, first
    answer = first["choices"][0]["message"]["content"]
    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And at the end?"},
    ]
    status, second = ask(stack, messages)
    assert status == 200, second
    assert second["choices"][0]["message"]["content"] == monolithic(stack["model"], messages)
    after = encode.metrics()
    assert sample_or_zero(after, "deepstack_embedding_cache_misses_total") - misses == 1
    assert sample_or_zero(after, "deepstack_embedding_cache_hits_total") - hits == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a video in MP4/QuickTime or Matroska/WebM"),
        (truncated_clip(), "truncated"),
        (empty_clip(), "no video stream with frames"),
        (unknown_codec_clip(), "is not one the decoder has"),
        (clip(1, 10.0, 64, 48), "1 frame to sample"),
        (clip((MAX_VIDEO_SECONDS + 1) * 10, 10.0, 32, 32), f"the limit is {MAX_VIDEO_SECONDS} s"),
    ],
    ids=["not-a-video", "truncated", "zero-frames", "unknown-codec", "one-frame", "too-long"],
)
def test_a_bad_clip_is_a_400_with_its_reason_before_any_work(
    stack: dict[str, Any], data: bytes, reason: str
) -> None:
    encode = stack["encode"]
    encoded = sample_or_zero(encode.metrics(), "deepstack_requests_total", route="/v1/encode")
    status, reply = ask(stack, [user(part("video", data))])
    assert status == 400, reply
    assert reply["error"]["message"].startswith("video 1: ")
    assert reason in reply["error"]["message"], reply
    # Refused at the router, from the container's metadata: the encode pod never saw it.
    assert sample_or_zero(encode.metrics(), "deepstack_requests_total", route="/v1/encode") == (
        encoded
    )
    for role in ("encode", "language"):
        wait_for(lambda r=role: blocks_held(stack[r]) == 0, timeout=30, what=f"{role} blocks")  # type: ignore[misc]


@pytest.fixture
def video_server(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving a clip."""
    (tmp_path / "clip.mp4").write_bytes(clip(20, 10.0, 64, 48))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_video_url_under_the_allowlist_is_fetched_and_others_refused(
    stack: dict[str, Any], video_server: str
) -> None:
    fetched = {"type": "video_url", "video_url": {"url": f"http://{video_server}/clip.mp4"}}
    inline = part("video", clip(20, 10.0, 64, 48))
    status, reply = ask(stack, [user(fetched)])
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == monolithic(stack["model"], [user(inline)])
    port = video_server.rsplit(":", 1)[1]
    unlisted = {"type": "video_url", "video_url": {"url": f"http://localhost:{port}/clip.mp4"}}
    status, reply = ask(stack, [user(unlisted)])
    assert status == 400, reply
    assert reply["error"]["message"].startswith("video 1: http://localhost")
