"""The router end to end over HTTP with real encode and language processes."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepstack_runtime.backends.reference import ReferenceEncoder, ReferenceLanguageModel
from deepstack_runtime.config import RuntimeConfig
from deepstack_runtime.routing import Candidate, rendezvous_pick
from deepstack_runtime.sampling import SamplingParams
from deepstack_runtime.servers.wire import content_hash
from devkit.cluster import wait_for
from devkit.metrics import sample, sample_or_zero
from devkit.oracles import ReferencePreprocessor
from devkit.runtime import (
    ServerProcess,
    data_url,
    get,
    png,
    post,
    tiny_stack,
    wait_until_router_sees_both,
)

TRANSFER: dict[str, Any] = {"blockTokens": 4, "defaultAllocationTokens": 8, "poolBlocks": 256}
IMAGE = png(64, 48, (10, 200, 30))


def another_router(
    stack: dict[str, Any], name: str, *args: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """A second router over the stack's encode and language servers, with `args`."""
    return ServerProcess(
        "router", stack["config"], stack["root"] / f"{name}.log",
        "--encode-url", stack["encode"].url, "--language-url", stack["language"].url,
        *args, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("router")
    with tiny_stack(root, "--max-prompt-tokens", "200", **TRANSFER) as servers:
        yield servers


def chat(
    image: bytes | None = IMAGE, text: str = "Describe the image.", **extra: Any
) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    content.append({"type": "text", "text": text})
    return {
        "model": "tiny-qwen3-vl-moe",
        "max_tokens": 8,
        "temperature": 0,  # greedy: compared with the monolithic model's greedy answer
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def expected_answer(model: Path, image: bytes | None) -> str:
    """What the undivided model says, through the same preprocessing."""
    import io

    from PIL import Image

    pre = ReferencePreprocessor(model)
    images = [Image.open(io.BytesIO(image)).convert("RGB")] if image else []
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images] + [
        {"type": "text", "text": "Describe the image."}
    ]
    prompt = pre.prepare([{"role": "user", "content": content}], images)
    item = None
    if prompt.pixel_values is not None and prompt.image_grid_thw is not None:
        item = ReferenceEncoder(model).encode(prompt.pixel_values, prompt.image_grid_thw)
    tokens = ReferenceLanguageModel(model).generate(
        prompt.input_ids, item, prompt.image_grid_thw, SamplingParams(max_tokens=8)
    )
    return pre.decode(tokens)


def test_chat_completion_with_an_image(stack: dict[str, Any]) -> None:
    status, body = post(f"{stack['router'].url}/v1/chat/completions", chat())
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected_answer(stack["model"], IMAGE)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] >= 1


def test_jpeg_images_are_preprocessed_like_png(stack: dict[str, Any]) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG", quality=95)
    body = chat(image=None)
    body["messages"][0]["content"].insert(
        0, {"type": "image_url", "image_url": {"url": data_url(buf.getvalue(), "image/jpeg")}}
    )
    status, answer = post(f"{stack['router'].url}/v1/chat/completions", body)
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == expected_answer(
        stack["model"], buf.getvalue()
    )
    assert answer["usage"]["prompt_tokens"] > 20  # the image's tokens are in the prompt


def test_text_only_chat_needs_no_encoder(stack: dict[str, Any]) -> None:
    status, body = post(f"{stack['router'].url}/v1/chat/completions", chat(image=None))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected_answer(stack["model"], None)


def test_streaming_gives_the_same_answer(stack: dict[str, Any]) -> None:
    import urllib.request

    request = urllib.request.Request(
        f"{stack['router'].url}/v1/chat/completions",
        json.dumps(chat(stream=True)).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().strip() for line in r if line.strip()]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected_answer(stack["model"], IMAGE)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def image_part(url: str) -> dict[str, Any]:
    return {
        "model": "tiny-qwen3-vl-moe",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Hi"},
                ],
            }
        ],
    }


BAD: list[tuple[str, Any, int, str]] = [
    ("not-json", b"{nope", 400, "the body is not valid JSON"),
    ("not-an-object", [1, 2], 400, "the body must be a JSON object"),
    ("no-messages", {"model": "tiny-qwen3-vl-moe"}, 400, "messages must be a non-empty list"),
    (
        "bad-role",
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        "needs a role of user, system, assistant",
    ),
    (
        "audio-part",
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        400,
        "unsupported content part 'input_audio'",
    ),
    (
        "http-image",
        image_part("https://example.com/cat.png"),
        400,
        "https://example.com/cat.png: this server fetches no image or video URLs",
    ),
    ("bad-base64", image_part("data:image/png;base64,@@@"), 400, "the base64 data is malformed"),
    (
        "not-an-image",
        image_part(data_url(b"this is text, not a picture")),
        400,
        "image 1: the data (27 bytes) is not a PNG, JPEG, WebP or GIF image",
    ),
    (
        "prompt-too-long",
        chat(image=None, text="the quick brown fox " * 200),
        400,
        "the limit is 200",
    ),
    ("max-tokens-zero", chat(max_tokens=0), 400, "max_tokens must be an integer in [1, 512]"),
    ("wrong-model", {**chat(), "model": "gpt-4o"}, 404, "model 'gpt-4o' is not served here"),
    # What the server does not implement is refused by name, never silently ignored.
    (
        "tools",
        {**chat(), "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools is not supported by this server",
    ),
    (
        "response-format",
        {**chat(), "response_format": {"type": "json_object"}},
        400,
        "response_format is not supported by this server",
    ),
    (
        "unknown-parameter",
        {**chat(), "repetition_penalty": 1.2},
        400,
        "unrecognized request argument: repetition_penalty",
    ),
    # Sampling parameters out of range or of the wrong type, named.
    ("n", {**chat(), "n": 9}, 400, "n must be an integer in [1, 8]"),
    ("temperature", {**chat(), "temperature": 2.5}, 400, "temperature must be in [0, 2]"),
    ("temperature-type", {**chat(), "temperature": "hot"}, 400, "temperature must be a number"),
    ("top-p", {**chat(), "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("top-k", {**chat(), "top_k": -5}, 400, "top_k must be -1 or 0 (off)"),
    ("seed", {**chat(), "seed": -1}, 400, "seed must be in [0, 2^63)"),
    ("penalty", {**chat(), "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]"),
    ("top-logprobs-alone", {**chat(), "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    (
        "top-logprobs",
        {**chat(), "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs must be in [0, 20]",
    ),
    ("stop", {**chat(), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be a string or"),
    ("stop-empty", {**chat(), "stop": ""}, 400, "stop must be a string or"),
    (
        "stream-options",
        {**chat(), "stream_options": {"include_usage": True}},
        400,
        "only for stream: true",
    ),
    # Limits, checked before anything is decoded.
    (
        "too-many-images",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}] * 9,
                }
            ]
        },
        400,
        "the request has 9 images; the limit is 8",
    ),
    (
        "too-many-pixels",
        image_part(data_url(png(4100, 4100, (0, 0, 0)))),
        400,
        "image 1: the image is 4100x4100 = 16,810,000 pixels; the limit is 16,777,216",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_requests_get_a_clear_4xx(
    stack: dict[str, Any], body: Any, status: int, message: str
) -> None:
    got, answer = post(f"{stack['router'].url}/v1/chat/completions", body)
    assert got == status, answer
    assert message in answer["error"]["message"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_B64 = "data:image/png;base64,"
IMAGE_URLS = st.one_of(
    st.binary(max_size=48).map(lambda b: _B64 + base64.b64encode(b).decode()),  # not an image
    st.integers(0, len(IMAGE)).map(lambda n: _B64 + base64.b64encode(IMAGE[:n]).decode()),
    st.text(max_size=24).map(lambda t: _B64 + t),  # not base64
    st.text(max_size=24),  # not a data: URL
    JSON,
)
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=24), JSON)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.one_of(JSON, st.fixed_dictionaries({"url": IMAGE_URLS})),
        }
    ),
    JSON,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "robot"]),
            "content": st.one_of(st.text(max_size=24), st.lists(PARTS, max_size=3), JSON),
        }
    ),
    max_size=3,
)
BODIES = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"messages": st.one_of(MESSAGES, JSON)},
        optional={
            name: JSON | st.integers(-2, 600) | st.floats()
            for name in ("max_tokens", "max_completion_tokens", "model", "n", "ignore_eos",
                         "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty",
                         "frequency_penalty", "logprobs", "top_logprobs", "stream_options",
                         "tools")
        },
    ),
)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_any_body_gets_an_answer_or_a_4xx_with_a_reason(stack: dict[str, Any], body: Any) -> None:
    """Wrong types, huge values, nested garbage, bad base64, truncated images: an answer
    or a 4xx that says why, never a 5xx."""
    status, answer = post(f"{stack['router'].url}/v1/chat/completions", body)
    assert status == 200 or 400 <= status < 500, (status, answer)
    if status != 200:
        assert answer["error"]["message"], answer


def test_no_block_leaks_after_all_that(stack: dict[str, Any]) -> None:
    for role in ("encode", "language"):
        text = stack[role].metrics()
        assert sample(text, "deepstack_buffer_blocks", state="used") == 0, role
        assert sample(text, "deepstack_transfer_inflight_requests") == 0, role


def test_no_healthy_instance_is_a_503_after_a_short_wait(stack: dict[str, Any]) -> None:
    with ServerProcess(
        "router", stack["config"], stack["root"] / "router-alone.log",
        "--encode-url", stack["encode"].url, "--language-url", "http://127.0.0.1:9",
        "--instance-wait-seconds", "1.5",
    ) as lonely:  # fmt: skip
        started = time.monotonic()
        status, body = post(f"{lonely.url}/v1/chat/completions", chat())
        waited = time.monotonic() - started
        client = openai.OpenAI(base_url=f"{lonely.url}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(model="tiny-qwen3-vl-moe", messages=chat()["messages"])
    assert status == 503
    assert body["error"]["message"].startswith("no healthy language instance of contract")
    assert 1.5 <= waited < 10
    assert unavailable.value.status_code == 503
    assert unavailable.value.response.headers["Retry-After"] == "1"
    assert "no healthy language instance" in str(unavailable.value)


def test_a_request_waits_for_a_language_instance_that_is_starting(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """Sent while the only language server is still starting, a request waits for it
    (up to --instance-wait-seconds) instead of failing at once."""
    late = ServerProcess("language", stack["config"], tmp_path / "late.log")  # not waited on
    try:
        with ServerProcess(
            "router", stack["config"], tmp_path / "router-wait.log",
            "--encode-url", stack["encode"].url, "--language-url", late.url,
            "--instance-wait-seconds", "120",
        ) as router:  # fmt: skip
            assert json.loads(get(f"{router.url}/health")[1])["language"] == 0
            status, body = post(f"{router.url}/v1/chat/completions", chat())
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == expected_answer(
                stack["model"], IMAGE
            )
    finally:
        late.stop()


def test_an_unknown_model_is_the_clients_not_found(stack: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{stack['router'].url}/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=chat()["messages"])
    assert "model 'gpt-4o' is not served here; use 'tiny-qwen3-vl-moe'" in str(unknown.value)
    assert [m.id for m in client.models.list()] == ["tiny-qwen3-vl-moe"]


def test_a_router_uses_only_pods_of_its_own_contract(stack: dict[str, Any]) -> None:
    """Pods that run another contract (another buffer layout, here) are never paired
    with this router's requests, and the router is not ready until it sees its own."""
    config = json.loads(stack["config"].read_text())
    config["transfer"]["block_tokens"] *= 2
    other = stack["root"] / "other-contract.json"
    other.write_text(json.dumps(config))
    ours = RuntimeConfig.from_file(stack["config"]).contract_hash()
    theirs = RuntimeConfig.from_file(other).contract_hash()
    assert ours != theirs
    assert get(f"{stack['router'].url}/ready")[0] == 200
    for role in ("encode", "language"):
        health = json.loads(get(f"{stack[role].url}/health")[1])
        assert health["contract"] == ours
    with ServerProcess(
        "router", other, stack["root"] / "router-other.log",
        "--encode-url", stack["encode"].url, "--language-url", stack["language"].url,
    ) as router:  # fmt: skip
        before = sample_or_zero(stack["language"].metrics(), "deepstack_requests_total",
                                role="language", route="/v1/generate", code="200")  # fmt: skip
        status, body = post(f"{router.url}/v1/chat/completions", chat())
        assert status == 503
        assert body["error"]["message"] == f"no healthy language instance of contract {theirs}"
        status, body = post(f"{router.url}/v1/chat/completions", chat(image=None))
        assert status == 503, body
        ready_status, ready_body = get(f"{router.url}/ready")
        assert ready_status == 503
        assert theirs in json.loads(ready_body)["error"]["message"]
        after = sample_or_zero(stack["language"].metrics(), "deepstack_requests_total",
                               role="language", route="/v1/generate", code="200")  # fmt: skip
        assert after == before


def test_graceful_shutdown_finishes_every_request_in_flight(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """A second language instance is stopped while requests run on it: each in-flight
    request is answered in full; the server then exits cleanly."""
    with (
        ServerProcess("language", stack["config"], tmp_path / "language2.log") as language2,
        ServerProcess(
            "router",
            stack["config"],
            tmp_path / "router2.log",
            "--encode-url",
            stack["encode"].url,
            "--language-url",
            language2.url,
        ) as router2,
    ):
        wait_until_router_sees_both(router2.url)
        results: list[tuple[int, Any]] = []

        def one() -> None:
            body = chat(max_tokens=256, ignore_eos=True)
            results.append(post(f"{router2.url}/v1/chat/completions", body))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(
            lambda: (
                sample(language2.metrics(), "deepstack_requests_inflight", role="language") >= 2
            ),
            timeout=30,
            what="requests in flight on the second language server",
        )
        inflight = sample(language2.metrics(), "deepstack_requests_inflight", role="language")
        language2.terminate()
        for t in threads:
            t.join(120)
        language2.process.wait(60)
        assert language2.process.returncode == 0, language2.logs()
    answered = [body for status, body in results if status == 200]
    refused = [body for status, body in results if status != 200]
    assert len(answered) >= inflight
    for body in answered:  # complete answers, not cut short by the shutdown
        assert body["usage"]["completion_tokens"] == 256
    for body in refused:  # arrived after the drain began: a clear error, never a half answer
        assert "error" in body


def test_api_keys_guard_the_openai_routes_but_not_the_probes(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """router.apiKeySecret: the official client without a key, or with a wrong one, gets
    its AuthenticationError (401); with a key it is answered; probes need none. A rotated
    key file reaches the running router."""

    keys = tmp_path / "keys"
    keys.write_text("first-key\n\nsecond-key\n")
    with another_router(stack, "router-keys", "--api-keys-file", str(keys)) as router:
        wait_until_router_sees_both(router.url)
        assert get(f"{router.url}/health")[0] == 200
        assert get(f"{router.url}/ready")[0] == 200
        status, body = post(f"{router.url}/v1/chat/completions", chat())
        assert status == 401
        assert "Authorization: Bearer" in body["error"]["message"]
        for wrong in ("not-a-key", "first-key-and-more"):
            client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=wrong, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as refused:
                client.models.list()
            assert refused.value.status_code == 401
        for key in ("first-key", "second-key"):
            client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0)
            assert [m.id for m in client.models.list()] == ["tiny-qwen3-vl-moe"]
            answer = client.chat.completions.create(**chat(image=None))
            assert answer.choices[0].message.content == expected_answer(stack["model"], image=None)
        rotated = tmp_path / ".rotated"  # as the kubelet swaps in a changed Secret
        rotated.write_text("third-key\n")
        rotated.replace(keys)

        def models(key: str) -> int:
            return get(f"{router.url}/v1/models", {"Authorization": f"Bearer {key}"})[0]

        wait_for(lambda: models("third-key") == 200, timeout=30, what="the rotated key")
        assert models("first-key") == 401


@pytest.mark.parametrize("text", ["", "\n \n"])
def test_a_router_told_to_require_keys_does_not_start_without_any(
    stack: dict[str, Any], tmp_path: Path, text: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(text)
    router = another_router(stack, "router-no-keys", "--api-keys-file", str(keys))
    try:
        assert router.process.wait(60) != 0
        assert f"the API key file {keys} holds no key" in router.logs()
    finally:
        router.stop()


def routed_to(url: str, urls: list[str]) -> bytes:
    """An image the router sends to the encode instance `url` of `urls` (rendezvous
    hashing of its content)."""
    for n in range(1000):
        image = png(64, 48, (n % 256, n // 256, 77))
        if rendezvous_pick([content_hash(image)], [Candidate(u, 0) for u in urls]) == url:
            return image
    raise AssertionError("no image hashes to it")


@pytest.mark.parametrize("role", ["language", "encode"])
def test_a_request_whose_instance_died_is_retried_on_another(
    stack: dict[str, Any], tmp_path: Path, role: str
) -> None:
    """An instance dies while the router still believes it healthy (its next probe is
    far off): a request sent to it is tried again on the other one before any byte
    reached the client, so every one succeeds, and the dead one leaves the pool at once
    (nothing listens there). A dead encode pod is also what the language side reports
    when it cannot reach its bootstrap port (connect_failed): that blames the encode pod."""
    with ServerProcess(role, stack["config"], tmp_path / "doomed.log") as doomed:
        instances = [
            arg
            for r in ("encode", "language")
            for url in (stack[r].url, *([doomed.url] if r == role else []))
            for arg in (f"--{r}-url", url)
        ]
        with ServerProcess(
            "router", stack["config"], tmp_path / "router-retry.log", *instances,
            "--health-interval", "600",
        ) as router:  # fmt: skip
            wait_for(
                lambda: json.loads(get(f"{router.url}/health")[1]).get(role) == 2,
                timeout=30,
                what=f"the router to see both {role} instances",
            )
            doomed.process.kill()
            doomed.process.wait(30)
            # Requests that go to the dead one first: text (no routing key: least loaded,
            # so the second at the latest), or an image whose hash ranks it first.
            image = (
                None
                if role == "language"
                else routed_to(doomed.url, [stack["encode"].url, doomed.url])
            )
            body = chat(image=image)
            results = [post(f"{router.url}/v1/chat/completions", body) for _ in range(6)]
            assert [status for status, _ in results] == [200] * 6, results
            expected = expected_answer(stack["model"], image)
            assert all(body["choices"][0]["message"]["content"] == expected for _, body in results)
            metrics = get(f"{router.url}/metrics")[1]
            assert sample(metrics, "deepstack_router_retries_total", role=role) == 1
            assert json.loads(get(f"{router.url}/health")[1])[role] == 1


def test_visual_token_limit_is_checked_before_encoding(stack: dict[str, Any]) -> None:
    with another_router(stack, "router-limits", "--max-visual-tokens", "4") as router:
        wait_until_router_sees_both(router.url)
        before = sample_or_zero(stack["encode"].metrics(), "deepstack_requests_total",
                                role="encode", route="/v1/encode", code="200")  # fmt: skip
        status, body = post(f"{router.url}/v1/chat/completions", chat())
        assert status == 400
        assert "visual tokens; the limit is 4" in body["error"]["message"]
        after = sample_or_zero(stack["encode"].metrics(), "deepstack_requests_total",
                               role="encode", route="/v1/encode", code="200")  # fmt: skip
        assert after == before  # the encoder never saw it


def test_over_its_limit_the_router_answers_429_with_retry_after(stack: dict[str, Any]) -> None:

    with another_router(stack, "router-admission", "--max-inflight", "1") as router:
        wait_until_router_sees_both(router.url)
        long = threading.Thread(
            target=post,
            args=(f"{router.url}/v1/chat/completions", chat(max_tokens=256, ignore_eos=True)),
        )
        long.start()
        try:
            wait_for(
                lambda: sample(get(f"{router.url}/metrics")[1], "deepstack_requests_inflight",
                               role="router") >= 1,
                timeout=30, what="a request in flight on the router",
            )  # fmt: skip
            client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="-", max_retries=0)
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(**chat(image=None))
            assert refused.value.status_code == 429
            assert refused.value.response.headers["Retry-After"] == "1"
            assert "limit of 1 requests in flight" in str(refused.value)
        finally:
            long.join(120)
        status, _ = post(f"{router.url}/v1/chat/completions", chat(image=None))
        assert status == 200  # free again
