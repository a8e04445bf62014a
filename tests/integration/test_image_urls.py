"""Images by http URL: fetched by the router from an image server on 127.0.0.1 that this
test runs, under router.mediaUrlDomains (--image-url-domain): the allowlist, private
addresses, redirects, size and time limits, each refusal a 400 with its reason."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from deepstack_runtime.servers.images import FETCH_TIMEOUT_SECONDS, MAX_IMAGE_BYTES
from devkit.runtime import (
    ServerProcess,
    data_url,
    png,
    post,
    tiny_stack,
)

IMAGE = png(64, 48, (10, 200, 30))


class ImageServer(BaseHTTPRequestHandler):
    """/cat.png; /redirect/N (N hops, then the image); /to/HOST (a redirect to the image
    on HOST); /missing; /big (over the size limit, no Content-Length); /slow."""

    def do_GET(self) -> None:
        port = self.connection.getsockname()[1]
        path = self.path
        if path == "/cat.png":
            self._send(200, IMAGE)
        elif path.startswith("/redirect/"):
            hops = int(path.rsplit("/", 1)[1])
            self._redirect(f"/redirect/{hops - 1}" if hops > 1 else "/cat.png")
        elif path.startswith("/to/"):
            self._redirect(f"http://{path.removeprefix('/to/')}:{port}/cat.png")
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            chunk = b"\0" * (1024 * 1024)
            try:
                for _ in range(MAX_IMAGE_BYTES // len(chunk) + 2):
                    self.wfile.write(chunk)
            except OSError:
                pass  # the router hung up at its limit
            self.close_connection = True
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(int(FETCH_TIMEOUT_SECONDS) + 5):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                pass
        else:
            self._send(404, b"no such image")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("image-urls")
    with tiny_stack(root, "--image-url-domain", "127.0.0.1") as servers:
        yield servers


def chat(url: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    return {"max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": content}]}


def refusal(router: str, url: str) -> str:
    status, answer = post(f"{router}/v1/chat/completions", chat(url))
    assert status == 400, answer
    return str(answer["error"]["message"])


def test_an_image_by_url_answers_like_the_same_image_inline(
    stack: dict[str, Any], images: str
) -> None:
    client = openai.OpenAI(base_url=f"{stack['router'].url}/v1", api_key="-", max_retries=0)

    def answer(url: str) -> str:
        reply = client.chat.completions.create(
            model="tiny-qwen3-vl-moe", max_tokens=6, temperature=0, messages=chat(url)["messages"]
        )
        return str(reply.choices[0].message.content)

    inline = answer(data_url(IMAGE))
    assert answer(f"{images}/cat.png") == inline
    assert answer(f"{images}/redirect/3") == inline  # within the redirect limit


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/redirect/4", "more than 3 redirects"),
        ("/to/localhost", "localhost is not in router.mediaUrlDomains"),
        ("/missing", "the server answered 404"),
        ("/big", f"over the limit of {MAX_IMAGE_BYTES} bytes"),
    ],
)
def test_what_the_rules_refuse_is_a_400_with_the_reason(
    stack: dict[str, Any], images: str, path: str, reason: str
) -> None:
    assert reason in refusal(stack["router"].url, images + path)


def test_a_slow_image_server_is_cut_off_at_the_timeout(stack: dict[str, Any], images: str) -> None:
    started = time.monotonic()
    assert f"took over {FETCH_TIMEOUT_SECONDS:g} s" in refusal(
        stack["router"].url, f"{images}/slow"
    )
    assert time.monotonic() - started < FETCH_TIMEOUT_SECONDS + 5


def test_a_listed_name_that_resolves_to_a_private_address_is_refused(
    stack: dict[str, Any], images: str
) -> None:
    """localhost is on this router's list, but its address is loopback and is not."""
    port = images.rsplit(":", 1)[1]
    with ServerProcess(
        "router", stack["config"], stack["root"] / "router-localhost.log",
        "--encode-url", stack["encode"].url, "--language-url", stack["language"].url,
        "--image-url-domain", "localhost",
    ) as router:  # fmt: skip
        reason = refusal(router.url, f"http://localhost:{port}/cat.png")
    assert "localhost resolves to 127.0.0.1, which is not a public address" in reason


def test_without_a_list_no_url_is_fetched(stack: dict[str, Any], images: str) -> None:
    with ServerProcess(
        "router", stack["config"], stack["root"] / "router-no-list.log",
        "--encode-url", stack["encode"].url, "--language-url", stack["language"].url,
    ) as router:  # fmt: skip
        reason = refusal(router.url, f"{images}/cat.png")
        assert "fetches no image or video URLs" in reason
        assert "only data: and http(s) URLs" in refusal(router.url, "ftp://127.0.0.1/cat.png")
